"""benchmarks/learning_curve.py: nested lesion-grouped shares, the per-doubling slope, input errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from benchmark_scripts import load_benchmark

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "learning_curve.py"
learning_curve = load_benchmark("learning_curve")


def _lesions(n_lesions: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lesion_label = rng.choice(7, n_lesions, p=[0.03, 0.05, 0.11, 0.01, 0.11, 0.67, 0.02])
    reps = rng.integers(1, 4, n_lesions)
    return np.repeat(lesion_label, reps), np.repeat(np.arange(n_lesions), reps).astype(str)


def test_shares_keep_whole_lesions_grow_with_the_fraction_and_are_nested() -> None:
    labels, lesions = _lesions()
    quarter, half = (learning_curve.lesion_share(labels, lesions, f, seed=1) for f in (0.25, 0.5))
    assert np.array_equal(learning_curve.lesion_share(labels, lesions, 1.0, seed=1), np.arange(len(labels)))
    for share in (quarter, half):
        inside = set(lesions[share])
        outside = set(lesions[np.setdiff1d(np.arange(len(labels)), share)])
        assert not inside & outside, "a lesion was cut in two"
    assert 0.2 < len(quarter) / len(labels) < 0.3 and 0.45 < len(half) / len(labels) < 0.55
    # Rounding per class may move a lesion at a class boundary; the bulk must be shared.
    assert len(set(lesions[quarter]) & set(lesions[half])) >= 0.95 * len(set(lesions[quarter]))
    for cls in range(7):  # stratified: every class keeps about its share
        if (labels == cls).sum() >= 20:
            assert 0.35 < (labels[half] == cls).sum() / (labels == cls).sum() < 0.65
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        learning_curve.lesion_share(labels, lesions, 0.0, seed=1)


def test_gain_per_doubling_is_the_slope_against_log2_of_the_size() -> None:
    assert learning_curve.gain_per_doubling([1000, 2000, 4000], [0.70, 0.73, 0.76]) == pytest.approx(0.03)
    assert learning_curve.gain_per_doubling([1000, 4000], [0.70, 0.74]) == pytest.approx(0.02)
    with pytest.raises(ValueError, match="two different"):
        learning_curve.gain_per_doubling([1000, 1000], [0.7, 0.8])


def test_bad_arguments_are_refused_before_training(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(SCRIPT), *args], check=False, capture_output=True, text=True, timeout=60)

    result = run("--data", str(tmp_path / "none"), "--out", str(tmp_path / "out"))
    assert result.returncode != 0 and "data folder not found" in result.stderr
    result = run("--data", str(tmp_path), "--out", str(tmp_path / "out"), "--fractions", "1.5")
    assert result.returncode != 0 and "--fractions must be in (0, 1]" in result.stderr
    result = run("--data", str(tmp_path), "--out", str(tmp_path / "out"), "--image-size", "100")
    assert result.returncode != 0 and "--image-size must be a multiple of 8" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_stored_model_of_another_setting_is_refused_not_reused(tmp_path: Path) -> None:
    from types import SimpleNamespace

    images = SimpleNamespace(content_hashes=np.array(["a", "b"]))
    stored = tmp_path / "fraction-0.5"
    stored.mkdir()
    (stored / "result.json").write_text('{"fraction": 0.5, "epochs": 40, "seed": 0, "image_size": 64}')
    assert learning_curve.train_and_score(tmp_path, tmp_path, 0.5, 40, 0, dataset=images)["epochs"] == 40
    with pytest.raises(ValueError, match="trained with .*'epochs': 40.*delete it"):
        learning_curve.train_and_score(tmp_path, tmp_path, 0.5, 20, 0, dataset=images)
    # a result recorded for other images is not reused for these (it was, whatever --data said)
    (stored / "result.json").write_text(
        '{"fraction": 0.5, "epochs": 40, "seed": 0, "image_size": 64, "images": "%s"}' % learning_curve.data_identity(images)
    )
    assert learning_curve.train_and_score(tmp_path, tmp_path, 0.5, 40, 0, dataset=images)["epochs"] == 40
    other = SimpleNamespace(content_hashes=np.array(["a", "c"]))
    with pytest.raises(ValueError, match="trained on other images than"):
        learning_curve.train_and_score(tmp_path, tmp_path, 0.5, 40, 0, dataset=other)
    (stored / "result.json").write_text('{"fraction": 0.5, "epo')
    with pytest.raises(ValueError, match="fraction-0.5/result.json is not valid JSON"):
        learning_curve.train_and_score(tmp_path, tmp_path, 0.5, 40, 0, dataset=images)


def test_both_bars_are_extrapolated() -> None:
    # the README's session-5 curve: +1.7 points top-1 and +3.7 macro-F1 per doubling from 6,068 images
    last = {"top1": 0.757, "macro_f1": 0.528, "balanced_accuracy": 0.558}
    lines = learning_curve.bar_extrapolations(6068, last, {"top1": 0.017, "macro_f1": 0.037, "balanced_accuracy": 0.048})
    assert lines[0].startswith("top1 0.80 at this slope: about 2.5 more doublings (~35,")
    assert lines[1].startswith("macro_f1 0.60 at this slope: about 1.9 more doublings (~23,")


def test_the_recipe_settings_are_passed_to_training_recorded_and_compared_on_reuse(tmp_path: Path, monkeypatch) -> None:
    """The script trained with the library defaults (val 0.15, sqrt weights) whatever the README
    said, and could not do otherwise; the defaults stay those, so the README's command reproduces its curve."""
    from types import SimpleNamespace

    import qana.train
    import qana.views

    trained = []
    labels = np.arange(14) % 7

    class Part(SimpleNamespace):
        def __len__(self) -> int:
            return len(self.labels)

        def subset(self, rows: np.ndarray) -> Part:
            return self

    part = Part(labels=labels, lesion_ids=np.arange(14).astype(str), images=np.zeros((14, 4, 4, 3)))
    monkeypatch.setattr(qana.train, "stage_split", lambda opts, dataset: None)
    monkeypatch.setattr(qana.train, "load_split", lambda opts, dataset: (part, part, part))
    monkeypatch.setattr(qana.train, "stage_float", lambda opts, train, val: trained.append(opts) or {"seconds": 1.0})
    monkeypatch.setattr(qana.train, "load_float", lambda opts: None)
    monkeypatch.setattr(qana.views, "keras_logits", lambda model, images, views: np.eye(7)[labels])
    images = SimpleNamespace(content_hashes=np.array(["a", "b"]))

    shipped = learning_curve.train_and_score(tmp_path, tmp_path / "shipped", 1.0, 40, 0, images, 64, 0.05, "none")
    assert (trained[-1].val_fraction, trained[-1].class_weighting) == (0.05, "none")
    assert (shipped["val_fraction"], shipped["class_weighting"]) == (0.05, "none")
    stored = json.loads((tmp_path / "shipped" / "fraction-1" / "result.json").read_text())
    assert (stored["val_fraction"], stored["class_weighting"]) == (0.05, "none")
    with pytest.raises(ValueError, match="'val_fraction': 0.05, 'class_weighting': 'none'.*not.*'val_fraction': 0.15"):
        learning_curve.train_and_score(tmp_path, tmp_path / "shipped", 1.0, 40, 0, images)
    learning_curve.train_and_score(tmp_path, tmp_path / "measured", 1.0, 40, 0, images)
    assert (trained[-1].val_fraction, trained[-1].class_weighting) == (0.15, "sqrt")  # what the README's curve used
    # a result stored before the options existed was made with 0.15 and sqrt: reused for those only
    old = tmp_path / "old" / "fraction-1"
    old.mkdir(parents=True)
    (old / "result.json").write_text('{"fraction": 1.0, "epochs": 40, "seed": 0, "image_size": 64}')
    assert learning_curve.train_and_score(tmp_path, tmp_path / "old", 1.0, 40, 0, images)["epochs"] == 40
    with pytest.raises(ValueError, match="'class_weighting': 'sqrt'.*not.*'class_weighting': 'none'"):
        learning_curve.train_and_score(tmp_path, tmp_path / "old", 1.0, 40, 0, images, 64, 0.15, "none")


def test_bad_recipe_settings_are_refused_before_training(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(SCRIPT), "--data", str(tmp_path), "--out", str(tmp_path / "out"), *args],
                              check=False, capture_output=True, text=True, timeout=120)

    result = run("--val-fraction", "0.9")
    assert result.returncode == 2 and "--val-fraction must be from 0.02 to 0.5, not 0.9" in result.stderr, result.stderr
    result = run("--class-weighting", "cube")
    assert result.returncode == 2 and "--class-weighting must be one of sqrt, balanced, none, not 'cube'" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()
