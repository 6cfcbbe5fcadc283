"""benchmarks/chip_ensemble.py: a group's logits are the mean of its runs', runs split differently
are refused, and the clinical prior is weighted on the Akida ensemble and shared with float."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from benchmark_scripts import load_benchmark

from qana import clinical
from qana.classes import CLASS_NAMES
from qana.metrics import classification_metrics

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "chip_ensemble.py"
C = len(CLASS_NAMES)


def _module():
    return load_benchmark("chip_ensemble")


def _part(ids: list[str], labels: list[int]) -> SimpleNamespace:
    n = len(ids)
    return SimpleNamespace(
        image_ids=np.array(ids),
        lesion_ids=np.array([f"lesion-{i}" for i in ids]),
        labels=np.array(labels),
        images=np.zeros((n, 4, 4, 3), np.uint8),
        metadata=None,
    )


def _fake_runs(monkeypatch, akida: dict[str, np.ndarray], test_ids: dict[str, list[str]]) -> None:
    """qana.train's loaders and qana.run_record's settings reader replaced by fakes: run name ->
    its Akida logits on every part."""
    import qana.run_record
    import qana.train
    import qana.views

    def options(run, data):
        return SimpleNamespace(run_dir=run, image_size=8, colour_constancy=run.name, test_time_views=1, seed=0)

    def split(opts, dataset):
        ids = test_ids[opts.run_dir.name]
        return _part(["t0", "t1"], [0, 1]), _part(ids, list(range(len(ids)))), _part(ids, list(range(len(ids))))

    monkeypatch.setattr(qana.run_record, "recorded_options", options)
    monkeypatch.setattr(qana.train, "run_dataset", lambda opts: None)
    monkeypatch.setattr(qana.train, "load_split", split)
    monkeypatch.setattr(qana.train, "load_float", lambda opts: opts.run_dir.name)
    monkeypatch.setattr(qana.train, "akida_features", lambda opts, part: opts.run_dir.name)
    monkeypatch.setattr(qana.train, "akida_head_logits", lambda model_path, feats: akida[feats])
    monkeypatch.setattr(qana.views, "keras_logits", lambda model, images, views: akida[model] + 1.0)
    monkeypatch.setattr(clinical, "encode_dataset", lambda part: None)


def test_group_logits_are_the_mean_of_its_runs(monkeypatch, tmp_path: Path) -> None:
    a, b = np.eye(3, C) * 4.0, np.ones((3, C))
    _fake_runs(monkeypatch, {"a": a, "b": b}, {"a": ["x", "y", "z"], "b": ["x", "y", "z"]})
    mean, labels, _ = _module().group_logits([tmp_path / "a", tmp_path / "b"], tmp_path, {})
    np.testing.assert_allclose(mean[("akida", "test")], (a + b) / 2)
    np.testing.assert_allclose(mean[("float", "val")], (a + b) / 2 + 1.0)
    np.testing.assert_array_equal(labels["test"], [0, 1, 2])


def test_runs_split_differently_are_refused(monkeypatch, tmp_path: Path) -> None:
    logits = np.zeros((3, C))
    _fake_runs(monkeypatch, {"a": logits, "b": logits}, {"a": ["x", "y", "z"], "b": ["x", "z", "y"]})
    with pytest.raises(SystemExit, match="split differently"):
        _module().group_logits([tmp_path / "a", tmp_path / "b"], tmp_path, {})


def test_prior_is_weighted_on_the_akida_ensemble_and_shared_with_float() -> None:
    rng = np.random.default_rng(0)
    n = 140
    train_labels = np.arange(n) % C
    sites = np.array(clinical.SITES)

    def encoded(labels: np.ndarray) -> np.ndarray:
        # body site tells the class apart: the prior is informative
        return clinical.encode([50] * len(labels), ["female"] * len(labels), list(sites[labels % len(sites)]))

    val_labels, test_labels = rng.integers(0, C, 60), rng.integers(0, C, 60)
    noise = lambda labels: rng.normal(0, 1, (len(labels), C)) + 0.5 * np.eye(C)[labels]  # noqa: E731
    mean = {
        ("akida", "val"): noise(val_labels),
        ("akida", "test"): noise(test_labels),
        ("float", "val"): np.zeros((60, C)),  # alone, float's validation would choose the largest weight
        ("float", "test"): noise(test_labels),
    }
    enc = {"train": encoded(train_labels), "val": encoded(val_labels), "test": encoded(test_labels)}
    inputs = {"encoded": enc, "train_labels": train_labels, "seed": 0}
    metrics, weight = _module().score_group(mean, {"val": val_labels, "test": test_labels}, inputs)

    from qana.train import selection_score

    fitted = clinical.fit_prior(enc["train"], train_labels, CLASS_NAMES, seed=0)
    chosen, _ = clinical.choose_weight(fitted, mean[("akida", "val")], enc["val"], val_labels, selection_score)
    assert weight == chosen.weight
    float_with_prior = clinical.adjust(chosen, mean[("float", "test")], enc["test"]).argmax(1)
    expected = classification_metrics(test_labels, float_with_prior, CLASS_NAMES)
    assert metrics[("float+prior", "test")]["macro_f1"] == expected["macro_f1"]
    assert metrics[("akida", "test")]["top1"] == float(np.mean(mean[("akida", "test")].argmax(1) == test_labels))


def test_unfinished_run_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "bundle.json").write_text("{}")
    (tmp_path / "half").mkdir()
    group = f"{tmp_path / 'done'},{tmp_path / 'half'}"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--data", str(tmp_path), group], check=False, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "half" in done.stderr and "bundle stage has finished" in done.stderr


def _finished(root: Path, name: str, seed: int, **settings: object) -> Path:
    run = root / name
    run.mkdir()
    (run / "options.json").write_text(json.dumps({"seed": seed, "colour_constancy": "none", **settings}))
    m = {"top1": 0.8, "macro_f1": 0.6, "balanced_accuracy": 0.6}
    (run / "bundle.json").write_text(json.dumps({"metrics": {part: {k: m for k in ("float", "quantized", "akida")} for part in ("val", "test")}}))
    return run


def test_two_groups_of_one_split_are_refused_and_other_recipes_warned_about(tmp_path: Path, capsys) -> None:
    """One group per split, one recipe: two groups on one split counted twice in the sd, silently."""
    a, b = _finished(tmp_path, "fixaug-seed19", 19), _finished(tmp_path, "mixlate-seed19", 19, mixup=0.2)
    done = subprocess.run([sys.executable, str(SCRIPT), "--data", str(tmp_path), str(a), str(b)], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "both have seed 19, i.e. the same split" in done.stderr, done.stderr
    sog19 = _finished(tmp_path, "sog-seed19", 19, colour_constancy="shades-of-gray")
    fix20, mix20 = _finished(tmp_path, "fixaug-seed20", 20), _finished(tmp_path, "mix-seed20", 20, colour_constancy="shades-of-gray", mixup=0.2)
    _module().check_groups_are_splits([[a, sog19], [fix20, mix20]])  # run by run: fixaug with fixaug, sog with sog
    out = capsys.readouterr().out
    assert "mix-seed20 differs from" in out and "mixup" in out and "fixaug-seed20" not in out, out
    _module().check_groups_are_splits([[a, sog19], [fix20]])
    assert "has 1 runs, the first group 2" in capsys.readouterr().out
