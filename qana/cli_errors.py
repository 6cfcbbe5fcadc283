"""How every QANA-FL command line reports an expected failure.

Bad input, a missing file or a refused bundle is the user's to fix, not a bug: it becomes one
line on stderr starting with ``error:`` and exit status 2 (`EXIT_ERROR`), never a traceback.
Scripts and the tests rely on that status, so all four CLIs (qana, qana-client, qana-server,
qana-sim) and the argparse scripts in benchmarks/ share this module instead of each keeping its own copy.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn

import typer

EXIT_ERROR = 2  # the command could not do its job


def fail(message: str, code: int = EXIT_ERROR) -> typer.Exit:
    """Print `message` as an error and return the exit to raise (``raise fail(...)``), so the
    caller's control flow stays visible to readers and type checkers."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def describe_os_error(exc: OSError) -> str:
    """'No such file or directory: /path' rather than Python's '[Errno 2] ...' form."""
    if exc.filename and exc.filename2:  # a rename or link: both ends, so the user sees which file is meant
        return f"{exc.strerror or exc}: {exc.filename} -> {exc.filename2}"
    return f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)


@contextmanager
def reported_errors(*expected: type[Exception]) -> Iterator[None]:
    """Inside the block, the `expected` exception types and any OSError end the command with
    their message and `EXIT_ERROR`; anything else is a bug and keeps its traceback."""
    try:
        yield
    except expected as exc:
        raise fail(str(exc)) from None
    except OSError as exc:
        raise fail(describe_os_error(exc)) from None


# --------------------------------------------------------------------------- argparse scripts (benchmarks/)

# The project's expected-failure types, by module. When a script fails, only the modules it has
# already imported can have raised one, so they are looked up in sys.modules rather than imported
# here: importing them all would need every install at once (server.audit brings SQLAlchemy, the
# coordinator's `[server]` extra, which a clinic's machine does not have).
EXPECTED_ERRORS = {
    "qana.data": ("DataError",),
    "qana.bundle": ("BundleError",),
    "qana.run_record": ("RunSettingsError", "RunRecordError"),
    "qana.clinical": ("ClinicalDataError",),
    "qana.fusion": ("FusionError",),
    "qana.split_export": ("SplitExportError",),
    "simulations.config": ("ConfigError",),
    "simulations.partition": ("PartitionError",),
    "simulations.scenario": ("ScenarioError",),
    "server.audit.errors": ("AuditError",),
}


def _expected(exc: BaseException) -> bool:
    import sys

    for module_name, names in EXPECTED_ERRORS.items():
        module = sys.modules.get(module_name)
        if module is not None and isinstance(exc, tuple(getattr(module, name) for name in names)):
            return True
    return False


def script_main(main: Callable[[], int | None]) -> NoReturn:
    """Run a benchmark script's `main`: the project's expected failures and any OSError end with
    one `error:` line and EXIT_ERROR, as in the CLIs; anything else is a bug and keeps its traceback.

    A script's own checks end with ``sys.exit("error: ...")``, which Python turns into status 1;
    here they end with EXIT_ERROR too, so a caller tells bad input from a crash the same way for
    every script without each check spelling out its status."""
    import sys

    try:
        code = main()
    except SystemExit as exc:
        if not (isinstance(exc.code, str) and exc.code.startswith("error:")):
            raise
        print(exc.code, file=sys.stderr)
        sys.exit(EXIT_ERROR)
    except OSError as exc:
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    except Exception as exc:
        if not _expected(exc):
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    sys.exit(code or 0)


def at_least(least: int) -> Callable[[str], int]:
    """argparse type: an integer >= `least` (argparse names the option and exits 2 otherwise)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, not {value}")
        return value

    return parse


def int_list(least: int = 1) -> Callable[[str], list[int]]:
    """argparse type: comma-separated integers, each >= `least` ("4,16,100")."""
    one = at_least(least)

    def parse(text: str) -> list[int]:
        values = [one(part.strip()) for part in text.split(",") if part.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"{text!r} lists no number")
        return values

    return parse
