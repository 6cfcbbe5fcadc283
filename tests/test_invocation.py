"""The recorded command line reruns as typed: quoted arguments, and no stray argv of a test runner."""

from __future__ import annotations

import shlex
import sys

import pytest

from qana.invocation import invoked_command


def test_arguments_are_shell_quoted_so_the_record_reruns_as_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["/venv/bin/qana", "split", "--out", "a b", "--part", "test"])
    line = invoked_command("qana", "split")
    assert line == "qana split --out 'a b' --part test"
    assert shlex.split(line)[1:] == sys.argv[1:]
    assert invoked_command("qana-sim") == "qana-sim split --out 'a b' --part test"


def test_a_process_not_started_as_the_subcommand_records_just_the_subcommand(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["pytest", "-q", "tests"])
    assert invoked_command("qana", "split") == "qana split"
    assert invoked_command("qana") == "qana -q tests"
