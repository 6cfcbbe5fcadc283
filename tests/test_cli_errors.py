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


def test_scripts_end_expected_failures_with_one_line_and_exit_2(capsys, tmp_path):
    import argparse
    import subprocess
    import sys
    from pathlib import Path

    from qana.bundle import BundleError
    from qana.cli_errors import at_least, int_list, script_main

    def refused():
        raise BundleError("not a model bundle: x has no bundle.json")

    with pytest.raises(SystemExit) as done:
        script_main(refused)
    assert done.value.code == EXIT_ERROR and capsys.readouterr().err == "error: not a model bundle: x has no bundle.json\n"
    with pytest.raises(SystemExit) as done:
        script_main(lambda: open(tmp_path / "missing"))
    assert done.value.code == EXIT_ERROR and "No such file or directory" in capsys.readouterr().err
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        script_main(lambda: 1 / 0)
    with pytest.raises(SystemExit) as done:
        script_main(lambda: 3)
    assert done.value.code == 3

    assert at_least(1)("4") == 4 and int_list(1)("4, 16,") == [4, 16]
    for parse, text in ((at_least(1), "0"), (at_least(1), "x"), (int_list(1), "2,x"), (int_list(1), ",")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)

    # a benchmark script, as run from a checkout: a missing bundle is one line, not a traceback
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "federation.py"
    run = subprocess.run([sys.executable, str(script), "--bundle", str(tmp_path / "none")], capture_output=True, text=True, timeout=120)
    assert run.returncode == EXIT_ERROR and "bundle folder not found" in run.stderr and "Traceback" not in run.stderr


def test_a_scripts_own_error_exit_has_status_2(capsys, tmp_path):
    """`sys.exit("error: ...")` in a benchmark script used to end with Python's status 1."""
    import subprocess
    import sys
    from pathlib import Path

    from qana.cli_errors import script_main

    with pytest.raises(SystemExit) as done:
        script_main(lambda: sys.exit("error: no such run"))
    assert done.value.code == EXIT_ERROR and capsys.readouterr().err == "error: no such run\n"
    for other in (0, 3, "a message without the prefix"):  # other exits are left as they are
        with pytest.raises(SystemExit) as done:
            script_main(lambda other=other: sys.exit(other))
        assert done.value.code == other

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "seed_spread.py"
    run = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == EXIT_ERROR and run.stderr.startswith("error: ") and "bundle.json not found" in run.stderr
