"""benchmarks/leaky_split.py: the two arms' splits, the seen-lesion halves, stored scores, the table, input errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from benchmark_scripts import load_benchmark
from test_learning_curve import _lesions  # HAM10000-like class shares, 1-3 images per lesion

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "leaky_split.py"
leaky_split = load_benchmark("leaky_split")


def test_the_grouped_arm_keeps_lesions_whole_and_the_leaky_arm_cuts_them_at_the_same_shares() -> None:
    labels, lesions = _lesions(900)
    grouped = leaky_split.arm_split("grouped", labels, lesions, 0.05, seed=3)
    leaky = leaky_split.arm_split("leaky", labels, lesions, 0.05, seed=3)
    for parts in (grouped, leaky):  # every image in exactly one part
        assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    g_train, _, g_test = grouped
    k_train, _, k_test = leaky
    assert not set(lesions[g_train]) & set(lesions[g_test])
    cut = leaky_split.lesion_seen_in_training(lesions[k_train], lesions[k_test])
    assert cut.sum() > 0.3 * len(k_test), "an image-level split must put many test lesions in training too"
    assert not leaky_split.lesion_seen_in_training(lesions[g_train], lesions[g_test]).any()
    for (a, b) in zip(grouped, leaky):  # the same shares, up to whole lesions
        assert abs(len(a) - len(b)) <= 0.02 * len(labels)
    for cls in range(7):  # both stratified by diagnosis
        if (labels == cls).sum() >= 40:
            for _, _, test in (grouped, leaky):
                assert 0.10 < (labels[test] == cls).sum() / (labels == cls).sum() < 0.20
    with pytest.raises(ValueError, match="unknown arm 'random'"):
        leaky_split.arm_split("random", labels, lesions, 0.05, seed=3)


def test_seen_lesions_are_those_with_an_image_in_training() -> None:
    seen = leaky_split.lesion_seen_in_training(np.array(["a", "b", "b"]), np.array(["b", "c", "a", "d"]))
    assert seen.tolist() == [True, False, True, False]


def test_stored_scores_are_reused_only_for_the_same_settings_and_data(tmp_path: Path) -> None:
    wanted = {"arm": "leaky", "epochs": 40, "seed": 0, "val_fraction": 0.05, "images": "abc"}
    path = tmp_path / "leaky" / "result.json"
    assert leaky_split.stored_result(path, wanted) is None
    path.parent.mkdir()
    path.write_text(json.dumps({**wanted, "test_8v": {"top1": 0.9}}))
    assert leaky_split.stored_result(path, wanted)["test_8v"]["top1"] == 0.9
    with pytest.raises(ValueError, match="trained with epochs 40, not epochs 20: delete it"):
        leaky_split.stored_result(path, {**wanted, "epochs": 20})
    with pytest.raises(ValueError, match="trained on other data"):
        leaky_split.stored_result(path, {**wanted, "images": "xyz"})
    path.write_text('{"arm": ')
    with pytest.raises(ValueError, match="not valid JSON"):
        leaky_split.stored_result(path, wanted)
    assert path.read_text() == '{"arm": ', "a refused result is left as it was"


def _scores(top1: float, macro_f1: float, n: int = 100, recall: dict | None = None) -> dict:
    by_class = {c: {"recall": r, "support": sup} for c, (r, sup) in (recall or {}).items()}
    return {"top1": top1, "macro_f1": macro_f1, "balanced_accuracy": 0.5, "n": n, "by_class": by_class}


def _result(top1: float, macro_f1: float, seen: int) -> dict:
    return {"train_images": 800, "val_images": 50, "test_images": 100, "test_images_lesion_in_training": seen,
            "test_1v": _scores(top1, macro_f1), "test_8v": _scores(top1, macro_f1)}


def test_the_class_matched_gap_compares_recall_within_classes_that_both_halves_have() -> None:
    # The seen half has more melanoma, which is harder: its top-1 is lower although every class is recalled better.
    seen = _scores(0.70, 0.6, 60, {"mel": (0.60, 30), "nv": (0.95, 30), "df": (1.0, 2)})
    unseen = _scores(0.85, 0.6, 110, {"mel": (0.50, 10), "nv": (0.90, 100), "df": (0.0, 3)})
    gap, classes = leaky_split.class_matched_gap(seen, unseen)
    assert classes == ["mel", "nv"], "df has fewer than 5 images in a half"
    assert gap == pytest.approx(0.075)
    assert leaky_split.class_matched_gap(seen, unseen, min_support=40) is None


def test_the_report_gives_leaky_minus_grouped_and_the_gap_to_the_paper() -> None:
    leaky = {**_result(0.86, 0.72, 40),
             "test_8v_lesion_in_training": _scores(0.95, 0.9, 40, {"mel": (0.9, 10), "nv": (1.0, 30)}),
             "test_8v_lesion_not_in_training": _scores(0.8, 0.6, 60, {"mel": (0.5, 10), "nv": (0.9, 50)})}
    lines = leaky_split.report({"grouped": _result(0.80, 0.60, 0), "leaky": leaky})
    text = "\n".join(lines)
    assert "40 (40%)" in text and "lesion in training (40 images), 8 views: 0.950/0.900/0.500; recall (images) mel 0.90 (10)" in text
    assert "mean over mel, nv: +25.0 points" in text
    assert "leaky minus grouped, 8 views: top1 +6.0 points, macro_f1 +12.0 points" in text
    assert "minus our grouped arm: top1 +11.6 points, macro_f1 +22.4 points" in text
    assert not any("leaky minus grouped" in line or "the paper" in line for line in leaky_split.report({"leaky": leaky})), "one arm: no difference"


def test_bad_arguments_are_refused_before_training(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(SCRIPT), *args], check=False, capture_output=True, text=True, timeout=60)

    result = run("--data", str(tmp_path / "none"), "--out", str(tmp_path / "out"))
    assert result.returncode != 0 and "data folder not found" in result.stderr
    result = run("--data", str(tmp_path), "--out", str(tmp_path / "out"), "--arms", "grouped", "random")
    assert result.returncode != 0 and "--arms takes grouped and leaky, not random" in result.stderr
    result = run("--data", str(tmp_path), "--out", str(tmp_path / "out"), "--arms", "grouped", "--grouped-from", str(tmp_path))
    assert result.returncode != 0 and "--grouped-from reads the grouped arm from a run: give --arms leaky" in result.stderr
    result = run("--data", str(tmp_path), "--out", str(tmp_path / "out"), "--val-fraction", "0.9")
    assert result.returncode != 0 and "--val-fraction must be from" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_stopped_float_stage_is_continued_only_with_the_settings_it_started_with(tmp_path: Path) -> None:
    wanted = {"arm": "leaky", "epochs": 40, "seed": 0, "val_fraction": 0.05, "images": "abc"}
    run_dir, backup = tmp_path / "leaky", tmp_path / "leaky" / "float.backup"
    leaky_split.claim_float_stage(run_dir, wanted, backup)
    assert json.loads((run_dir / "float-started.json").read_text()) == wanted
    backup.mkdir()  # the stage was stopped after some epochs
    leaky_split.claim_float_stage(run_dir, wanted, backup)  # the same settings continue
    with pytest.raises(ValueError, match="trained with epochs 40, not epochs 20: delete it"):
        leaky_split.claim_float_stage(run_dir, {**wanted, "epochs": 20}, backup)
    (run_dir / "float-started.json").unlink()  # a backup left by the script before it kept this record
    with pytest.raises(ValueError, match="stopped mid-way whose settings are not recorded"):
        leaky_split.claim_float_stage(run_dir, wanted, backup)
    assert backup.is_dir() and not (run_dir / "float-started.json").exists(), "a refused backup is kept as it was"


def _shipped_run(folder: Path, parts: tuple[np.ndarray, ...], seed: int = 3, extra: str = "") -> Path:
    """A record of a finished run of the shipped command (what benchmarks/record_run.py keeps)."""
    from record_run import indices_fingerprint

    command = (f"qana train --data ../shared/data/ham10000 --run-dir runs/fixaug-seed{seed} --target v2 --epochs 40 "
               f"--qat-epochs 2 --test-time-views 8 --val-fraction 0.05 --class-weighting none --seed {seed}{extra}")
    scores = {"top1": 0.8, "macro_f1": 0.6, "balanced_accuracy": 0.55, "n": len(parts[2])}
    metrics = {part: {m: dict(scores) for m in ("float", "quantized", "akida")} for part in ("val", "test")}
    folder.mkdir()
    (folder / "bundle.json").write_text(json.dumps({"metrics": metrics}))
    (folder / "options.json").write_text(json.dumps({"seed": seed, "command": command}))
    (folder / "split-indices.sha256").write_text(indices_fingerprint(parts) + "  train+val+test indices (int64) of split.npz\n")
    return folder


def test_a_run_of_the_shipped_command_on_the_same_split_stands_in_for_the_grouped_arm(tmp_path: Path) -> None:
    labels, lesions = _lesions(900)
    parts = leaky_split.arm_split("grouped", labels, lesions, 0.05, seed=3)
    run = _shipped_run(tmp_path / "fixaug-seed3", parts)
    grouped = leaky_split.recorded_grouped_arm(run, labels, lesions, 40, 3, 0.05)
    assert grouped["test_8v"] == {"top1": 0.8, "macro_f1": 0.6, "balanced_accuracy": 0.55, "n": len(parts[2])}
    assert (grouped["train_images"], grouped["test_images"], grouped["test_images_lesion_in_training"]) == (len(parts[0]), len(parts[2]), 0)
    row = leaky_split.report({"grouped": grouped})[1].split()
    assert "test_1v" not in grouped and row[-2:] == ["-", "0.800/0.600/0.550"], "no 1-view figure is made up"
    with pytest.raises(ValueError, match="not a run of the shipped command with --epochs 20 .*: command --epochs"):
        leaky_split.recorded_grouped_arm(run, labels, lesions, 20, 3, 0.05)
    with pytest.raises(ValueError, match="its seed is 3"):
        leaky_split.recorded_grouped_arm(run, labels, lesions, 40, 4, 0.05)
    mixup = _shipped_run(tmp_path / "mixup-seed3", parts, extra=" --mixup 0.2")
    with pytest.raises(ValueError, match="command --mixup"):
        leaky_split.recorded_grouped_arm(mixup, labels, lesions, 40, 3, 0.05)
    leaky = leaky_split.arm_split("leaky", labels, lesions, 0.05, seed=3)
    other = _shipped_run(tmp_path / "other-split", leaky)
    with pytest.raises(ValueError, match="trained on another split than the grouped arm's for seed 3"):
        leaky_split.recorded_grouped_arm(other, labels, lesions, 40, 3, 0.05)
    recorded = json.loads((run / "bundle.json").read_text())
    recorded["metrics"]["test"]["float"]["n"] += 1
    (run / "bundle.json").write_text(json.dumps(recorded))
    with pytest.raises(ValueError, match=f"float test scores on {len(parts[2]) + 1} images, not the grouped arm's {len(parts[2])}"):
        leaky_split.recorded_grouped_arm(run, labels, lesions, 40, 3, 0.05)
    (run / "split-indices.sha256").unlink()
    with pytest.raises(ValueError, match="holds no split indices"):
        leaky_split.recorded_grouped_arm(run, labels, lesions, 40, 3, 0.05)
