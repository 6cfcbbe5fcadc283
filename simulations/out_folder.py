"""The `--out` folder of a `qana-sim run`: what a new run may replace, and getting it back.

Why: a run's `run/` holds the signed audit log and its key, `plots/` the figures report.md
links to. A new run in the same folder replaces them, but only

- if an earlier qana-sim run made them (its `results.json` is there): a `work/` or `plots/`
  of the user's own in a folder given as `--out` is never deleted;
- once the new run has written its own results: a run refused half-way (a setting only the
  features can show to be impossible, a crash) puts the earlier run's folders back, so the
  folder again holds one consistent run.

While a run is under way the earlier folders wait in `.previous-run/`. If that folder is still
there when the next run starts, a run was killed (power cut, SIGKILL) before it could clean
up; the next run then stops and says so rather than guess which files belong together.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RUN_FOLDERS = ("run", "work", "plots")  # what a qana-sim run writes below --out (besides its files)
MARKER = "results.json"  # written by every run that got as far as its results (simulations.report)
PREVIOUS = ".previous-run"


class OutFolderError(ValueError):
    """An --out folder a run must not write into (one line for the user)."""


def check_out_folder(out: Path) -> None:
    """Refuse, before any work, an --out whose run folders a new run could not safely replace."""
    if out.exists() and not out.is_dir():
        raise OutFolderError(f"--out {out} is a file, not a folder")
    if (out / PREVIOUS).exists():
        raise OutFolderError(
            f"{out / PREVIOUS} holds the folders of the run before the last one: the last run in {out} was stopped "
            "before it finished. Move them back into the folder (or delete them), then run again"
        )
    foreign = [name for name in RUN_FOLDERS if (out / name).exists()]
    if foreign and not (out / MARKER).is_file():
        raise OutFolderError(
            f"{out} already has {', '.join(name + '/' for name in foreign)} but no {MARKER}, so no finished qana-sim run "
            "made them, and a run would replace them: choose another --out (or delete them if they are from a qana-sim "
            "run that never finished)"
        )


@contextmanager
def replacing_earlier_run(out: Path) -> Iterator[None]:
    """Move the earlier run's folders aside for the block; keep the new ones if it ends normally,
    put the earlier ones back if it raises (also on Ctrl-C before the run has written results)."""
    check_out_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    aside = out / PREVIOUS
    earlier = [name for name in RUN_FOLDERS if (out / name).exists()]
    if earlier:
        aside.mkdir()
        for name in earlier:
            (out / name).rename(aside / name)
    try:
        yield
    except BaseException:
        for name in RUN_FOLDERS:
            shutil.rmtree(out / name, ignore_errors=True)
        for name in earlier:
            (aside / name).rename(out / name)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)
