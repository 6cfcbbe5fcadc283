"""The command line this process was started with, as a record anyone can paste to rerun it.

`qana train`, `qana split` and `qana-sim` write their invoking command into what they produce
(bundle.json, a split folder's record, a simulation's result). Each argument is shell-quoted,
so a path with spaces reruns as written.
"""

from __future__ import annotations

import shlex
import sys


def invoked_command(program: str, subcommand: str | None = None) -> str:
    """`program` followed by this process's shell-quoted arguments.

    With `subcommand`, a process not started as that subcommand (a library caller, a test
    runner) is recorded as just `program subcommand` rather than with arguments of its own.
    """
    args = sys.argv[1:]
    if subcommand is not None and args[:1] != [subcommand]:
        return f"{program} {subcommand}"
    return " ".join([program, *(shlex.quote(a) for a in args)])
