"""How every QANA-FL command line reports an expected failure.

Bad input, a missing file or a refused bundle is the user's to fix, not a bug: it becomes one
line on stderr starting with ``error:`` and exit status 2 (`EXIT_ERROR`), never a traceback.
Scripts and the tests rely on that status, so all four CLIs (qana, qana-client, qana-server,
qana-sim) share this module instead of each keeping its own copy.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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
