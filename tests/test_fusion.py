"""Lesion fusion (`qana.fusion`) and `qana evaluate --lesion-fusion`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import qana.evaluate
from qana.bundle import load_bundle
from qana.cli import app
from qana.data import load_dataset
from qana.fusion import FusionError, describe_lesions, fuse_by_lesion
from tests.synthetic import make_synthetic_ham

TINY = Path(__file__).parent / "fixtures" / "bundles" / "tiny-v2"
runner = CliRunner()


def test_images_of_a_lesion_share_the_mean_of_their_logits_and_single_images_keep_theirs() -> None:
    logits = np.array([[3.0, 0.0], [0.0, 1.0], [0.0, 2.0], [1.0, 5.0]])
    lesions = np.array(["L1", "L2", "L1", "L3"])
    fused = fuse_by_lesion(logits, lesions)
    np.testing.assert_allclose(fused, [[1.5, 1.0], [0.0, 1.0], [1.5, 1.0], [1.0, 5.0]])
    # L1's two images disagreed (class 0 vs 1); fused, both get class 0
    assert fused.argmax(1).tolist() == [0, 1, 0, 1]


def test_fusion_does_not_depend_on_the_order_of_the_images() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(40, 7))
    lesions = np.array([f"L{i}" for i in rng.integers(0, 15, 40)])
    order = rng.permutation(40)
    np.testing.assert_allclose(fuse_by_lesion(logits, lesions)[order], fuse_by_lesion(logits[order], lesions[order]))


def test_bad_inputs_name_the_problem() -> None:
    with pytest.raises(FusionError, match="one lesion id per image"):
        fuse_by_lesion(np.zeros((3, 7)), np.array(["a", "b"]))
    with pytest.raises(FusionError, match="images, classes"):
        fuse_by_lesion(np.zeros(3), np.array(["a", "b", "c"]))
    with pytest.raises(FusionError, match="lesion id is empty"):
        fuse_by_lesion(np.zeros((2, 7)), np.array(["a", " "]))
    assert fuse_by_lesion(np.zeros((0, 7)), np.array([], dtype=str)).shape == (0, 7)


def test_describe_lesions_counts_the_images_fusion_acts_on() -> None:
    assert describe_lesions(np.array(["a", "b", "a", "c", "c", "c"])) == "6 images of 3 lesions; 5 images share a lesion with another image"


def test_evaluate_bundle_scores_the_fused_decision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clinic = make_synthetic_ham(tmp_path / "ham", n_images=30, image_size=40, seed=3)
    bundle = load_bundle(TINY)
    dataset = load_dataset(clinic.root, size=bundle.input_shape[0], progress=False)
    lesions, first = np.unique(dataset.lesion_ids, return_index=True)
    assert (np.bincount(np.unique(dataset.lesion_ids, return_inverse=True)[1]) > 1).any()
    # the first image of each lesion confidently right, every other image mildly wrong
    logits = np.zeros((len(dataset.labels), 7))
    wrong = (dataset.labels + 1) % 7
    logits[np.arange(len(wrong)), wrong] = 1.0
    logits[first] = 0.0
    logits[first, dataset.labels[first]] = 10.0
    monkeypatch.setattr(qana.evaluate, "bundle_logits", lambda *args, **kwargs: logits)
    alone = qana.evaluate.evaluate_bundle(bundle, dataset, use_prior=False)
    fused = qana.evaluate.evaluate_bundle(bundle, dataset, use_prior=False, lesion_fusion=True)
    assert alone["top1"] == pytest.approx(len(lesions) / len(dataset.labels))
    assert fused["top1"] == 1.0
    assert set(fused) == set(alone)


def test_qana_evaluate_says_whether_it_fused(tmp_path: Path) -> None:
    clinic = make_synthetic_ham(tmp_path / "ham", n_images=20, image_size=40, seed=4)
    out = tmp_path / "m.json"
    result = runner.invoke(app, ["evaluate", "--data", str(clinic.root), "--model", str(TINY), "--lesion-fusion", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert f"lesion fusion: on (20 images of {len(set(clinic.lesion_ids))} lesions;" in result.output
    assert set(json.loads(out.read_text())) == {"top1", "macro_f1", "balanced_accuracy", "per_class", "confusion", "n", "backend"}
    result = runner.invoke(app, ["evaluate", "--data", str(clinic.root), "--model", str(TINY), "--no-lesion-fusion"])
    assert result.exit_code == 0, result.output
    assert "lesion fusion: off" in result.output


def test_the_benchmark_scores_what_qana_evaluate_scores(tmp_path: Path, capsys) -> None:
    from benchmark_scripts import load_benchmark

    clinic = make_synthetic_ham(tmp_path / "ham", n_images=24, image_size=40, seed=5)
    load_benchmark("lesion_fusion").report(TINY, clinic.root, resamples=20)
    out = capsys.readouterr().out
    bundle = load_bundle(TINY)
    dataset = load_dataset(clinic.root, size=bundle.input_shape[0], progress=False)
    alone = qana.evaluate.evaluate_bundle(bundle, dataset, use_prior=True)
    fused = qana.evaluate.evaluate_bundle(bundle, dataset, use_prior=True, lesion_fusion=True)
    name = "akida+prior" if bundle.load_clinical_prior() is not None else "akida"
    row = next(line for line in out.splitlines() if line.strip().startswith(name + " "))
    assert row.split()[1:3] == ["/".join(f"{m[k]:.3f}" for k in ("top1", "macro_f1", "balanced_accuracy")) for m in (alone, fused)]
    assert "20 lesion resamples, share clearing" in out
