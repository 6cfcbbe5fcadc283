"""The `--out` folder of a `qana-sim run`: what a new run may replace, and getting it back.

Why: a run's `run/` holds the signed audit log and its key, `plots/` the figures report.md
links to, and the result files say what the run found. A new run in the same folder replaces
them, but only

- if an earlier qana-sim run made them (its `results.json` is there): a `work/` or `plots/`
  of the user's own in a folder given as `--out` is never deleted;
- once the new run has written all its results (`results.json`, written last): a run refused
  or stopped half-way puts the earlier run back, so the folder always holds one whole run;
- by one run at a time: a lock (`.qana-sim.lock`, held while the run lasts and released by
  the system if the process dies) refuses a second run in the same folder.

While a run is under way the earlier run waits in `.previous-run/`. If that folder is still
there when no run holds the lock, a run was killed (power cut, SIGKILL) before it could tidy
up; the next run stops and says which run is where rather than guess.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qana.atomic import try_lock
from simulations.report import RESULT_FILES

RUN_FOLDERS = ("run", "work", "plots")  # what a qana-sim run writes below --out besides RESULT_FILES
MARKER = "results.json"  # written last by every run that got as far as its results (simulations.report)
PREVIOUS = ".previous-run"
LOCK = ".qana-sim.lock"


class OutFolderError(ValueError):
    """An --out folder a run must not write into (one line for the user)."""


def _take_lock(out: Path, create: bool) -> int | None:
    """The folder's lock, taken: an open descriptor (closing it releases the lock, as the system
    does if the process dies). None when `create` is off and no run ever locked the folder.
    OutFolderError when a live run holds it."""
    try:
        return try_lock(out / LOCK, create)
    except BlockingIOError:
        raise OutFolderError(f"another qana-sim run is writing into {out}; wait for it or choose another --out") from None


def check_out_folder(out: Path) -> None:
    """Refuse, before any work, an --out whose earlier run a new run could not safely replace."""
    if out.exists() and not out.is_dir():
        raise OutFolderError(f"--out {out} is a file, not a folder")
    fd = _take_lock(out, create=False)  # creates nothing; refuses a folder a live run is writing into
    if fd is not None:
        os.close(fd)
    _check_earlier_run(out)


def _check_earlier_run(out: Path) -> None:
    """Refuse a folder whose earlier run is not one whole, finished qana-sim run."""
    if (out / PREVIOUS).exists():
        if (out / MARKER).is_file():
            raise OutFolderError(
                f"{out / PREVIOUS} holds the run before the last one: the last run finished but was stopped while "
                "tidying up. Delete that folder (or move it elsewhere to keep it), then run again"
            )
        raise OutFolderError(
            f"the last run in {out} was stopped before it finished; {out / PREVIOUS} holds the run before it. "
            f"Move its contents back into {out} (replacing the unfinished run's) or delete it, then run again"
        )
    foreign = [name for name in RUN_FOLDERS if (out / name).exists()]
    if foreign and not (out / MARKER).is_file():
        raise OutFolderError(
            f"{out} already has {', '.join(name + '/' for name in foreign)} but no {MARKER}, so no finished qana-sim run "
            "made them, and a run would replace them: choose another --out (or delete them if they are from a qana-sim "
            "run that never finished)"
        )


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    fd = _take_lock(out, create=True)
    try:
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race with a run taking it)


@contextmanager
def replacing_earlier_run(out: Path) -> Iterator[None]:
    """Hold the folder's lock and move the earlier run aside for the block; keep the new run if
    the block ends normally, put the earlier one back if it raises (Ctrl-C included)."""
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        _check_earlier_run(out)  # again: the folder may have changed since the run's first check
        aside = out / PREVIOUS
        names = RUN_FOLDERS + RESULT_FILES
        earlier = [name for name in names if (out / name).exists() or (out / name).is_symlink()]
        if earlier:
            aside.mkdir()
            for name in earlier:
                (out / name).rename(aside / name)
        try:
            yield
        except BaseException:
            for name in names:
                path = out / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                elif path.exists() or path.is_symlink():
                    path.unlink()
            for name in earlier:
                (aside / name).rename(out / name)
            shutil.rmtree(aside, ignore_errors=True)
            raise
        shutil.rmtree(aside, ignore_errors=True)
