"""Rebuild a shipped bundle's training run from the bundle itself, so its later stages can be redone.

    python benchmarks/rerun_from_bundle.py qana/bundles/v2 runs/v2-rebuilt [--data ../shared/data/ham10000]
    then run the `qana train` command it prints (the bundle's own, with --run-dir runs/v2-rebuilt)

A bundle that ships its Keras models (float.h5, quantized.h5) carries everything its training
run made before the Akida stage, and a new machine no longer has that run. This script splits
the data as the bundle's recorded command does (that command plus `--stop-after split`, in a
new run directory), checks the split has the bundle's recorded sizes, copies the two models in
and marks the stages up to `quantized` finished. Resuming the bundle's command in that
directory then redoes the `akida`, `head`, `clinical` and `bundle` stages with today's code:
how session 25 rebuilt qana/bundles/v2 after the conversion fix
(qana.convert.keep_output_headroom). The rebuilt bundle's test `quantized` figures must equal
the shipped bundle's: that is the proof it is the same model on the same split.

Refused: a bundle without Keras models, a command with a pretraining or saliency stage (their
outputs are not in the bundle), and a run directory that already exists.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qana.cli_errors import EXIT_ERROR  # noqa: E402  (after the path insert: this checkout's qana)

SHARED_HAM = Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000"
KERAS_MODELS = ("float.h5", "quantized.h5")
# Options whose stages' outputs a bundle does not carry.
NOT_IN_A_BUNDLE = ("--pretrain-epochs", "--saliency-teacher")


def replace_option(words: list[str], option: str, value: str) -> list[str]:
    """`words` with `option`'s value set to `value` (added when absent)."""
    out, i = [], 0
    while i < len(words):
        if words[i] == option:
            i += 2
            continue
        if words[i].startswith(option + "="):
            i += 1
            continue
        out.append(words[i])
        i += 1
    return [*out, option, value]


def rerun_command(manifest: dict, run_dir: Path, data: Path) -> list[str]:
    """The bundle's recorded `qana train` command, pointed at `run_dir` and `data`."""
    command = manifest.get("training", {}).get("command")
    if not isinstance(command, str) or not command.startswith("qana train"):
        raise SystemExit(f"the bundle records no `qana train` command (found {command!r})")
    words = shlex.split(command)
    for option in NOT_IN_A_BUNDLE:
        if any(w == option or w.startswith(option + "=") for w in words):
            raise SystemExit(f"the bundle's command uses {option}: that stage's output is not in the bundle, so it cannot be resumed from it")
    return replace_option(replace_option(words, "--run-dir", str(run_dir)), "--data", str(data))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="a bundle directory that ships float.h5 and quantized.h5 (e.g. qana/bundles/v2)")
    parser.add_argument("run_dir", type=Path, help="a new run directory (must not exist)")
    parser.add_argument("--data", type=Path, default=SHARED_HAM)
    args = parser.parse_args(argv)

    from qana.bundle import BundleError, load_bundle

    try:
        bundle = load_bundle(args.bundle)  # checks every file's sha256
    except BundleError as exc:
        parser.error(str(exc))
    missing = [name for name in KERAS_MODELS if not (bundle.path / name).is_file()]
    if missing:
        parser.error(f"{args.bundle} does not ship {', '.join(missing)}: its run cannot be rebuilt from it")
    if args.run_dir.exists():
        parser.error(f"{args.run_dir} already exists: give a new run directory")
    command = rerun_command(bundle.manifest, args.run_dir, args.data)

    split = [sys.executable, "-m", "qana.cli", *command[1:], "--stop-after", "split"]
    if subprocess.run(split).returncode != 0:
        print(f"error: the split step failed: {shlex.join(split)}", file=sys.stderr)
        return EXIT_ERROR
    recorded = bundle.manifest["training"]["split"]
    made = json.loads((args.run_dir / "split.json").read_text())
    differs = {k: (recorded[k], made.get(k)) for k in ("n_images", "n_lesions", "train", "val", "test") if recorded.get(k) != made.get(k)}
    if differs:
        print(f"error: the split differs from the bundle's (recorded, now): {differs}; is --data the data it was trained on?", file=sys.stderr)
        return EXIT_ERROR
    for name in KERAS_MODELS:
        shutil.copy2(bundle.path / name, args.run_dir / name)
    origin = f"copied from {bundle.path} (bundle {bundle.bundle_id[:8]}) by benchmarks/rerun_from_bundle.py"
    markers = {
        "saliency": {"enabled": False},
        "pretrain": {"enabled": False},
        "float": {"rebuilt": f"float.h5 {origin}"},
        "quantized": {"rebuilt": f"quantized.h5 {origin}"},
    }
    for stage, info in markers.items():
        (args.run_dir / f"{stage}.json").write_text(json.dumps(info, indent=2) + "\n")
    print("run directory ready; redo its akida, head, clinical and bundle stages with:")
    print(shlex.join(command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
