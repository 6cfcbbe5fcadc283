"""The one error-reporting helper all four CLIs share (qana.cli_errors)."""

import pytest
import typer

from qana.cli_errors import EXIT_ERROR, fail, reported_errors


class ExpectedError(Exception):
    pass


def test_expected_errors_become_one_line_and_exit_2(capsys):
    with pytest.raises(typer.Exit) as info:
        with reported_errors(ExpectedError):
            raise ExpectedError("bundle.json is missing")
    assert info.value.exit_code == EXIT_ERROR == 2
    assert capsys.readouterr().err == "error: bundle.json is missing\n"


def test_os_errors_name_the_file(capsys, tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(typer.Exit):
        with reported_errors():
            missing.read_text()
    assert capsys.readouterr().err == f"error: No such file or directory: {missing}\n"


def test_unexpected_errors_keep_their_traceback():
    with pytest.raises(KeyError):
        with reported_errors(ExpectedError):
            raise KeyError("a bug")


def test_fail_returns_the_exit_to_raise(capsys):
    exit_ = fail("no clinic named x", code=1)
    assert isinstance(exit_, typer.Exit) and exit_.exit_code == 1
    assert capsys.readouterr().err == "error: no clinic named x\n"
