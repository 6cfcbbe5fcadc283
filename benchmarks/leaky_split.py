"""How much does an image-level split inflate our figures? The same float model, trained twice.

    python benchmarks/leaky_split.py --data ../shared/data/ham10000 --out runs/leaky-split

HAM10000 has several images of many lesions (7,470 lesions, 10,015 images in the full set). A
split that deals out images rather than lesions puts pictures of one lesion on both sides, and
the test part then partly measures recognising a lesion already seen in training. The QANA paper
reports 0.916 top-1 / 0.824 macro-F1 with such a split; every figure of ours is on a split by
`lesion_id` (qana.splits). This script measures what the choice of split alone is worth for our
recipe, on the same images and with the same training:

- arm `grouped`: `qana train`'s split for `--seed` (whole lesions, stratified by diagnosis);
- arm `leaky`: the same train / validation / test shares and the same seed, drawn over images
  (each image its own group, stratified by diagnosis), as a random image-level split does.

Each arm trains the float stage of the shipped command (`qana train --epochs 40 --val-fraction
0.05 --class-weighting none`, its defaults otherwise; checkpoint chosen on the arm's own
validation part, leaky in the leaky arm as it would be in such a study) and is scored on its own
test part with 1 and 8 test-time views (the shipped bundles use 8). The leaky arm's test part is
also scored in two halves: images whose lesion has another image in its training part, and
images whose lesion does not. The halves differ in class mix (lesions photographed several
times are more often melanoma or keratosis than naevus), so their top-1 compares class mixes
too; the class-matched line compares recall within each class instead. Float only: the quantized
and Akida models stay within about a point of float (README model card), and the float stage is
the expensive part (session 40, two cores, both arms at once: 64 and 73 min).

Each arm's model and scores are kept in OUT/<arm>/ and reused on a rerun with the same settings
(delete the folder to retrain; delete only its result.json to score the kept model again); one
made with other settings is refused, not reused. An interrupted float stage continues from its
last finished epoch when rerun with the same settings, and is refused with others. Run the arms
as two processes at once with `--arms grouped` and `--arms leaky`, then once more with no
`--arms` to print the comparison from the stored scores.

The grouped arm is the shipped command's float stage, so a finished run of that command with the
same --seed can stand in for it (`--grouped-from runs/fixaug-seed19`, or its record
`benchmarks/records/fixaug-seed19` on a machine without the run): only the leaky arm is trained,
and the run is used only if its command and its split indices are the grouped arm's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from qana.atomic import write_atomic  # noqa: E402
from qana.splits import TEST_FRACTION, VAL_FRACTION_RANGE, grouped_split, train_val_test  # noqa: E402

ARMS = ("grouped", "leaky")
METRICS = ("top1", "macro_f1", "balanced_accuracy")
VIEWS = (1, 8)
MIN_SUPPORT = 5  # test images a class needs in both leaky halves to enter the class-matched comparison
PAPER = {"top1": 0.916, "macro_f1": 0.824}  # Wang et al. 2025, HAM10000 at 64x64, image-level split
SHIPPED_VAL_FRACTION = 0.05  # the shipped command's --val-fraction
SHIPPED_CLASS_WEIGHTING = "none"  # the shipped command's --class-weighting
# The shipped v2 command (README model card); a run of it on the grouped split may stand in for the grouped arm.
SHIPPED_COMMAND = ("qana train --data DATA --run-dir RUN --target v2 --epochs {epochs} --qat-epochs 2 --test-time-views 8 "
                   "--val-fraction {val_fraction} --class-weighting " + SHIPPED_CLASS_WEIGHTING + " --seed {seed}")


def arm_split(arm: str, labels: np.ndarray, lesions: np.ndarray, val: float, seed: int) -> tuple[np.ndarray, ...]:
    """Train / validation / test row indices of one arm: by lesion (`qana train`'s split) or by image.

    The leaky split is `grouped_split` with every image its own group: the same shares, the
    same stratification by diagnosis and the same seed, and nothing else changed.
    """
    if arm == "grouped":
        return train_val_test(labels, lesions, val, TEST_FRACTION, seed)
    if arm == "leaky":
        return tuple(grouped_split(labels, np.arange(len(labels)), (1.0 - val - TEST_FRACTION, val, TEST_FRACTION), seed))
    raise ValueError(f"unknown arm {arm!r}: one of {', '.join(ARMS)}")


def lesion_seen_in_training(train_lesions: np.ndarray, test_lesions: np.ndarray) -> np.ndarray:
    """For each test image: does its lesion have an image in the training part?"""
    return np.isin(np.asarray(test_lesions), np.asarray(train_lesions))


def _scores(labels: np.ndarray, logits: np.ndarray) -> dict:
    """Top-1, macro-F1, balanced accuracy, n, and each class's recall and support (for class-matched comparisons)."""
    from qana.classes import CLASS_NAMES
    from qana.metrics import classification_metrics

    m = classification_metrics(labels, logits.argmax(1), CLASS_NAMES)
    by_class = {c: {"recall": v["recall"], "support": v["support"]} for c, v in m["per_class"].items()}
    return {**{k: m[k] for k in (*METRICS, "n")}, "by_class": by_class}


def class_matched_gap(seen: dict, unseen: dict, min_support: int = MIN_SUPPORT) -> tuple[float, list[str]] | None:
    """Mean over classes of (recall, lesion in training) minus (recall, lesion not in training).

    The two halves of the leaky test part differ in class mix (lesions with several images are
    more often melanoma or keratosis than naevus), so their top-1 compares class mixes as much as
    memory; within a class the mix is the same. Only classes with `min_support` images in both
    halves count; None if none does. Returns the mean gap and the classes used.
    """
    classes = [c for c in seen["by_class"]
               if min(seen["by_class"][c]["support"], unseen["by_class"][c]["support"]) >= min_support]
    if not classes:
        return None
    gaps = [seen["by_class"][c]["recall"] - unseen["by_class"][c]["recall"] for c in classes]
    return float(np.mean(gaps)), classes


def stored_result(result_path: Path, wanted: dict) -> dict | None:
    """The arm's stored scores if made with `wanted` settings; None if there are none; refused otherwise."""
    if not result_path.is_file():
        return None
    try:
        stored = json.loads(result_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{result_path} is not valid JSON ({exc}): delete it and run again") from None
    found = {k: stored.get(k) for k in wanted}
    if found != wanted:
        if found["images"] != wanted["images"]:
            raise ValueError(f"{result_path.parent} holds a model trained on other data: delete it or choose another --out")
        differ = [k for k in wanted if found[k] != wanted[k]]
        raise ValueError(f"{result_path.parent} holds a model trained with "
                         + ", ".join(f"{k} {found[k]!r}" for k in differ) + ", not "
                         + ", ".join(f"{k} {wanted[k]!r}" for k in differ) + ": delete it or choose another --out")
    return stored


def claim_float_stage(run_dir: Path, wanted: dict, backup_dir: Path) -> None:
    """Record the settings a float stage starts with, or refuse to continue one started with others.

    The float stage continues from its epoch backup whatever fit was stopped in `run_dir`; without
    this record a rerun with another --epochs would finish the first fit and label its scores with
    the second run's settings. A backup without a record (left by an older version of this script)
    is refused too, and kept: only the user knows which settings made it.
    """
    started = run_dir / "float-started.json"
    if stored_result(started, wanted) is not None:
        return  # the same settings: continue from the last finished epoch
    if backup_dir.exists():
        raise ValueError(f"{run_dir} holds a float stage stopped mid-way whose settings are not recorded: "
                         "delete it or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(started, json.dumps(wanted, indent=2).encode())


def train_and_score(data: Path, out: Path, arm: str, epochs: int, seed: int, val_fraction: float, dataset) -> dict:
    """Float stage of the shipped command on one arm's split; scores on its test part (and the leaky halves)."""
    from qana.train import TrainOptions, data_fingerprint, load_float, stage_backup_dir, stage_float
    from qana.views import keras_logits

    run_dir = out / arm
    result_path = run_dir / "result.json"
    wanted = {"arm": arm, "epochs": epochs, "seed": seed, "val_fraction": val_fraction, "images": data_fingerprint(dataset)}
    stored = stored_result(result_path, wanted)
    if stored is not None:
        return stored

    train_idx, val_idx, test_idx = arm_split(arm, dataset.labels, dataset.lesion_ids, val_fraction, seed)
    train, val, test = dataset.subset(train_idx), dataset.subset(val_idx), dataset.subset(test_idx)
    opts = TrainOptions(data=data, run_dir=run_dir, epochs=epochs, seed=seed, val_fraction=val_fraction,
                        class_weighting=SHIPPED_CLASS_WEIGHTING)
    trained_path = run_dir / "float-trained.json"  # the float stage finished with these settings: score, do not retrain
    trained = stored_result(trained_path, wanted)
    if trained is None:
        claim_float_stage(run_dir, wanted, stage_backup_dir(opts, "float"))
        np.savez(run_dir / "split.npz", train=train_idx, val=val_idx, test=test_idx, image_ids=dataset.image_ids)
        info = stage_float(opts, train, val)
        trained = {**wanted, "seconds": info["seconds"]}
        write_atomic(trained_path, json.dumps(trained, indent=2).encode())
        shutil.rmtree(stage_backup_dir(opts, "float"), ignore_errors=True)  # as `qana train` does once the stage is finished
    model = load_float(opts)
    seen = lesion_seen_in_training(train.lesion_ids, test.lesion_ids)
    result = {**wanted, "seconds": trained["seconds"], "train_images": len(train), "val_images": len(val),
              "test_images": len(test), "test_images_lesion_in_training": int(seen.sum())}
    for views in VIEWS:
        logits = keras_logits(model, test.images, views)
        result[f"test_{views}v"] = _scores(test.labels, logits)
        if seen.any():  # the leaky arm: its test part in two halves
            result[f"test_{views}v_lesion_in_training"] = _scores(test.labels[seen], logits[seen])
            result[f"test_{views}v_lesion_not_in_training"] = _scores(test.labels[~seen], logits[~seen])
    write_atomic(result_path, json.dumps(result, indent=2).encode())  # a killed run leaves no half-written result
    return result


def recorded_grouped_arm(run: Path, labels: np.ndarray, lesions: np.ndarray, epochs: int, seed: int, val_fraction: float) -> dict:
    """The grouped arm's scores read from a finished `qana train` run instead of training it again.

    The run (a run directory, or its record in benchmarks/records once the directory is gone) is
    accepted only if its recorded command is the shipped command with these --epochs,
    --val-fraction and --seed (compared as `qana train` reads its options) and its train,
    validation and test indices are this arm's, index for index. Its bundle stage recorded the
    float model's test scores with its 8 test-time views, so the 1-view column stays empty.
    """
    from record_run import RecordError, folder_split_fingerprint, indices_fingerprint
    from seed_spread import command_differences, load_run

    options, metrics = load_run(run)  # exits naming the file when it is no finished run
    wanted = SHIPPED_COMMAND.format(epochs=epochs, val_fraction=val_fraction, seed=seed)
    differ = command_differences(wanted, options.get("command", ""))
    if options.get("seed") != seed:
        differ.append(f"its seed is {options.get('seed')!r}")
    if differ:
        raise ValueError(f"{run} is not a run of the shipped command with --epochs {epochs} --val-fraction {val_fraction:g} "
                         f"--seed {seed}: " + ", ".join(differ))
    parts = arm_split("grouped", labels, lesions, val_fraction, seed)
    try:
        recorded = folder_split_fingerprint(run)
    except RecordError as exc:
        raise ValueError(str(exc)) from None
    if recorded is None:
        raise ValueError(f"{run} holds no split indices (split.npz or split-indices.sha256): cannot show it used the grouped arm's split")
    if recorded != indices_fingerprint(parts):
        raise ValueError(f"{run} was trained on another split than the grouped arm's for seed {seed} (other data, or another version of the split)")
    scores = metrics["test"]["float"]
    if scores.get("n") != len(parts[2]):
        raise ValueError(f"{run} records float test scores on {scores.get('n')} images, not the grouped arm's {len(parts[2])}")
    return {"arm": "grouped", "from_run": str(run), "epochs": epochs, "seed": seed, "val_fraction": val_fraction,
            "train_images": len(parts[0]), "val_images": len(parts[1]), "test_images": len(parts[2]),
            "test_images_lesion_in_training": 0, "test_8v": {m: scores[m] for m in (*METRICS, "n")}}


def _triple(scores: dict) -> str:
    return "/".join(f"{scores[k]:.3f}" for k in METRICS)


def report(results: dict[str, dict]) -> list[str]:
    """The comparison table: each arm's test scores, the leaky arm's halves, and leaky minus grouped."""
    lines = [f"{'arm':<8} {'train':>6} {'val':>5} {'test':>5} {'lesion in train':>15} "
             + " ".join(f"{f'test {v} view(s) top-1/mF1/bal':>32}" for v in VIEWS)]
    for arm, r in results.items():
        seen = r["test_images_lesion_in_training"]
        share = f"{seen} ({seen / r['test_images']:.0%})"
        lines.append(f"{arm:<8} {r['train_images']:>6} {r['val_images']:>5} {r['test_images']:>5} {share:>15} "
                     + " ".join(f"{_triple(r[f'test_{v}v']) if f'test_{v}v' in r else '-':>32}" for v in VIEWS))
        if "from_run" in r:
            lines.append(f"  {arm}: the float model of {r['from_run']} (its bundle stage's test scores; the same split, index for index)")
    leaky = results.get("leaky")
    if leaky and "test_8v_lesion_in_training" in leaky:
        halves = {"lesion in training": leaky["test_8v_lesion_in_training"],
                  "lesion not in training": leaky["test_8v_lesion_not_in_training"]}
        for label, scores in halves.items():
            recalls = ", ".join(f"{c} {v['recall']:.2f} ({v['support']})" for c, v in scores["by_class"].items())
            lines.append(f"  leaky test, {label} ({scores['n']} images), 8 views: {_triple(scores)}; recall (images) {recalls}")
        matched = class_matched_gap(*halves.values())
        if matched is not None:
            gap, classes = matched
            lines.append(f"  class-matched, 8 views: recall with the lesion in training minus without, mean over "
                         f"{', '.join(classes)}: {100 * gap:+.1f} points")
    if len(results) == 2:
        g, k = results["grouped"]["test_8v"], results["leaky"]["test_8v"]
        lines.append("leaky minus grouped, 8 views: " + ", ".join(f"{m} {100 * (k[m] - g[m]):+.1f} points" for m in METRICS))
        lines.append("the paper (image-level split): " + ", ".join(f"{m} {v:.3f}" for m, v in PAPER.items())
                     + "; minus our grouped arm: " + ", ".join(f"{m} {100 * (v - g[m]):+.1f} points" for m, v in PAPER.items()))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="HAM10000-style folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for each arm's model and scores")
    parser.add_argument("--arms", nargs="+", help="which arms to train/score: grouped, leaky (default both)")
    parser.add_argument("--grouped-from", type=Path, metavar="RUN",
                        help="read the grouped arm from a finished run of the shipped command with this --seed (a run "
                             "directory or its benchmarks/records copy) instead of training it")
    parser.add_argument("--epochs", type=int, default=40, help="float epochs per arm (the shipped command: 40)")
    parser.add_argument("--seed", type=int, default=0, help="split and training seed (0 = the shipped model's split)")
    parser.add_argument("--val-fraction", type=float, default=SHIPPED_VAL_FRACTION,
                        help="share held out for validation (the shipped command: 0.05)")
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"error: data folder not found: {args.data}")
    if args.grouped_from is not None and args.arms and "grouped" in args.arms:
        sys.exit("error: --grouped-from reads the grouped arm from a run: give --arms leaky (or no --arms), not grouped")
    args.arms = args.arms or (["leaky"] if args.grouped_from is not None else list(ARMS))
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        sys.exit(f"error: --arms takes {' and '.join(ARMS)}, not {', '.join(unknown)}")
    if args.epochs < 1:
        sys.exit(f"error: --epochs must be at least 1, not {args.epochs}")
    if not VAL_FRACTION_RANGE[0] <= args.val_fraction <= VAL_FRACTION_RANGE[1]:
        sys.exit(f"error: --val-fraction must be from {VAL_FRACTION_RANGE[0]:g} to {VAL_FRACTION_RANGE[1]:g}, not {args.val_fraction}")

    from qana.data import load_dataset

    dataset = load_dataset(args.data, size=64)
    try:
        results = {}
        if args.grouped_from is not None:  # checked before any training, so a wrong run costs no hour of it
            results["grouped"] = recorded_grouped_arm(args.grouped_from, dataset.labels, dataset.lesion_ids, args.epochs,
                                                      args.seed, args.val_fraction)
        results.update({arm: train_and_score(args.data, args.out, arm, args.epochs, args.seed, args.val_fraction, dataset)
                        for arm in ARMS if arm in args.arms})
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    print(f"{len(dataset)} images of {len(np.unique(dataset.lesion_ids))} lesions, {args.epochs} float epochs, seed {args.seed}, "
          f"validation share {args.val_fraction:g}, test share {TEST_FRACTION:g}")
    for line in report(results):
        print(line)


if __name__ == "__main__":
    from qana.cli_errors import script_main

    script_main(main)
