"""Keep the small records of a finished `qana train` run in benchmarks/records/, where git keeps them.

    python benchmarks/record_run.py runs/fixaug-seed19            # -> benchmarks/records/fixaug-seed19/

A run directory holds gigabytes and lives on one machine; the benchmarks that compare runs
(`seed_spread.py`, `judge_rule.py`) need only its `bundle.json` (metrics and command),
`options.json` (settings), `quantized.json` (which quantized model was kept) and `split.json`
(part sizes). Beside them goes `split-indices.sha256`: the sha256 of the split's train,
validation and test indices (int64, in that order) from `split.npz`, so that a run remade on
another machine from the same seed can be shown to have the same split (`split_fingerprint`).

Nothing is printed of the metrics: a record is committed before a rule judges it. An existing
record with other contents is not overwritten (a record may already be part of a judgement).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qana.head import NPZ_ERRORS  # noqa: E402  (numpy only: what reading a damaged .npz raises)

RECORDS = Path(__file__).resolve().parent / "records"
RECORDED_FILES = ("bundle.json", "options.json", "quantized.json", "split.json")
SPLIT_FINGERPRINT = "split-indices.sha256"


class RecordError(Exception):
    """A run that cannot be recorded, or a record that would be overwritten."""


SPLIT_PARTS = ("train", "val", "test")


def read_split_indices(split_npz: Path) -> dict[str, np.ndarray]:
    """The train, validation and test indices of a run's split.npz. A damaged file (a cut-off
    copy raises BadZipFile or EOFError, not only OSError) is a RecordError naming it, so no
    script that reads a split ends with a traceback."""
    try:
        with np.load(split_npz) as z:
            return {part: np.asarray(z[part]).copy() for part in SPLIT_PARTS}
    except NPZ_ERRORS as exc:  # zipfile raises a bare EOFError(): name the type then
        raise RecordError(f"{split_npz}: not a readable split ({str(exc) or type(exc).__name__})") from None


def split_fingerprint(split_npz: Path) -> str:
    """sha256 of the train, validation and test indices of a run's split.npz, as int64."""
    try:
        return indices_fingerprint(read_split_indices(split_npz).values())
    except (TypeError, ValueError) as exc:  # e.g. names where indices belong
        raise RecordError(f"{split_npz}: not a readable split ({exc})") from None


def indices_fingerprint(parts: Iterable[np.ndarray]) -> str:
    """sha256 of a split's train, validation and test indices (in that order), as int64: what
    split-indices.sha256 holds, so a split made in memory can be matched with a record's."""
    digest = hashlib.sha256()
    for indices in parts:
        digest.update(np.ascontiguousarray(indices, dtype=np.int64).tobytes())
    return digest.hexdigest()


def folder_split_fingerprint(folder: Path) -> str | None:
    """The split fingerprint of a record (its split-indices.sha256) or of a run directory (computed
    from its split.npz, which every run has but only a record's fingerprint used to be compared);
    None for a folder holding neither (a shipped bundle), whose split only its seed tells."""
    recorded = folder / SPLIT_FINGERPRINT
    if recorded.is_file():
        try:
            words = recorded.read_text().split()
        except UnicodeDecodeError:
            words = []
        if not words or len(words[0]) != 64:
            raise RecordError(f"{recorded} holds no split fingerprint (expected a sha256 in hex)")
        return words[0]
    if (folder / "split.npz").is_file():
        return split_fingerprint(folder / "split.npz")
    return None


def record_contents(run: Path) -> dict[str, bytes]:
    """The files a record of `run` holds, by name; refuses a run whose bundle stage has not finished."""
    missing = [name for name in (*RECORDED_FILES, "split.npz") if not (run / name).is_file()]
    if missing:
        raise RecordError(f"{run} has no {', '.join(missing)}: not a finished `qana train` run (its bundle stage writes bundle.json)")
    contents = {name: (run / name).read_bytes() for name in RECORDED_FILES}
    contents[SPLIT_FINGERPRINT] = f"{split_fingerprint(run / 'split.npz')}  train+val+test indices (int64) of split.npz\n".encode()
    return contents


def write_record(run: Path, out: Path) -> Path:
    """Write `run`'s record into `out`; an identical record is left as it is, another one refused."""
    contents = record_contents(run)
    if out.exists():
        differing = [name for name, data in contents.items() if not (out / name).is_file() or (out / name).read_bytes() != data]
        if differing:
            raise RecordError(f"{out} already holds another record ({', '.join(differing)} differ): remove it first if it should go")
        return out
    partial = out.with_name(f".partial-{out.name}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name, data in contents.items():
        (partial / name).write_bytes(data)
    partial.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="finished `qana train` run directories")
    parser.add_argument("--records", type=Path, default=RECORDS, help="where the record folders go (one per run, named as the run)")
    args = parser.parse_args()
    for run in args.runs:
        try:
            print(f"recorded {run} in {write_record(run, args.records / run.resolve().name)}")
        except RecordError as exc:
            sys.exit(f"error: {exc}")


if __name__ == "__main__":
    from qana.cli_errors import script_main

    script_main(main)
