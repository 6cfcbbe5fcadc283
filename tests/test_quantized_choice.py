"""The quantized stage keeps QAT unless it moved away from the float model and calibration alone did not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qana.train import FAITHFUL, keep_fine_tuned, shortfall


def scores(top1: float, macro_f1: float) -> dict:
    return {"top1": top1, "macro_f1": macro_f1}


def test_shortfall_is_the_worse_of_the_two_deficits_and_never_negative() -> None:
    assert shortfall(scores(0.76, 0.54), scores(0.725, 0.564)) == pytest.approx(0.035)
    assert shortfall(scores(0.76, 0.54), scores(0.748, 0.528)) == pytest.approx(0.012)
    assert shortfall(scores(0.76, 0.54), scores(0.80, 0.60)) == 0.0


def test_fine_tuning_within_the_bar_is_kept_even_if_calibration_is_closer() -> None:
    # the shipped v2 run (validation): QAT -0.2 top-1, +0.5 macro-F1; calibration -0.1 / -0.2
    assert keep_fine_tuned(scores(0.760, 0.589), scores(0.759, 0.587), scores(0.758, 0.594))
    assert FAITHFUL == 0.01


def test_calibration_replaces_fine_tuning_that_traded_top1_away() -> None:
    # seed 2 (validation): QAT gave up 3.1 points of top-1 for 2 of macro-F1; calibration fell 1.6 short at most
    assert not keep_fine_tuned(scores(0.756, 0.544), scores(0.748, 0.528), scores(0.725, 0.564))


def test_at_4_bits_fine_tuning_stays_when_calibration_is_further_off() -> None:
    # the shipped v1 run (validation): calibration alone loses 7-8 points, QAT 1.1-1.6
    assert keep_fine_tuned(scores(0.756, 0.566), scores(0.686, 0.482), scores(0.740, 0.555))


# ----------------------------------------------------------------------------- --keep-quantized agreement


def test_agreement_keeps_fine_tuning_only_when_it_agrees_better_with_float() -> None:
    from qana.train import keep_fine_tuned_by_agreement

    assert keep_fine_tuned_by_agreement({"agreement": 0.95, "macro_f1": 0.90}, {"agreement": 0.94, "macro_f1": 0.91})
    assert not keep_fine_tuned_by_agreement({"agreement": 0.95, "macro_f1": 0.90}, {"agreement": 0.97, "macro_f1": 0.89})
    assert not keep_fine_tuned_by_agreement({"agreement": 0.95, "macro_f1": 0.90}, {"agreement": 0.95, "macro_f1": 0.90})


def test_agreement_scores_count_a_rare_class_the_candidate_drops() -> None:
    from qana.train import agreement_scores

    float_pred = np.array([5] * 18 + [4, 4])
    drops_mel = agreement_scores(float_pred, np.array([5] * 20))
    assert drops_mel["agreement"] == pytest.approx(0.9)
    assert drops_mel["macro_f1"] < 0.5  # half the classes float predicts are never predicted
    assert agreement_scores(float_pred, float_pred) == {"agreement": 1.0, "macro_f1": 1.0}


def _numbered(n: int, first: int):
    """A Dataset whose image k is filled with the value first + k, so images can be told apart."""
    from qana.data import Dataset

    images = np.arange(first, first + n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8)
    ids = np.array([f"i{first + k}" for k in range(n)])
    return Dataset(images=images, labels=np.arange(n) % 7, lesion_ids=ids, centres=ids, image_ids=ids, content_hashes=ids)


def test_agreement_images_are_all_of_validation_and_training_images_calibration_did_not_see(monkeypatch: pytest.MonkeyPatch) -> None:
    import qana.train

    monkeypatch.setattr(qana.train, "CALIBRATION_IMAGES", 10)
    monkeypatch.setattr(qana.train, "AGREEMENT_TRAIN_IMAGES", 20)
    train, val = _numbered(50, 0), _numbered(30, 200)
    opts = qana.train.TrainOptions(data=Path("."), run_dir=Path("."), seed=3)
    compared = qana.train.agreement_images(opts, train, val)
    assert len(compared) == 30 + 20
    np.testing.assert_array_equal(compared[:30], val.images)
    calibrated_on = set(qana.train.calibration_images(opts, train)[:, 0, 0, 0].tolist())
    extra = compared[30:, 0, 0, 0].tolist()
    assert len(calibrated_on) == 10 and len(set(extra)) == 20
    assert not calibrated_on & set(extra) and set(extra) <= set(range(50))
    smaller = qana.train.agreement_images(opts, _numbered(15, 0), val)  # fewer training images than both parts
    assert len(smaller) == 30 + 5


@pytest.mark.parametrize("mode, qat_moves_weights, kept", [
    ("validation", False, "fine-tuned"),  # QAT that changed nothing is exactly as faithful: kept
    ("agreement", False, "calibrated"),  # a tie in agreement keeps calibration
    ("agreement", True, "calibrated"),  # QAT that wrecked the model disagrees with float
])
def test_the_quantized_stage_keeps_the_model_its_rule_chooses_and_records_both_agreements(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest, mode: str, qat_moves_weights: bool, kept: str
) -> None:
    pytest.importorskip("tensorflow")
    import tf_keras as keras

    import qana.train
    from qana.model import ModelSpec, build_model
    from tests.test_weight_ema import _data

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    train, val = _data(40, 0), _data(14, 1)
    train.images = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    val.images = rng.integers(0, 256, (14, 32, 32, 3), dtype=np.uint8)
    build_model(ModelSpec(target="v2", input_size=32, width=8, feature_dim=32, attention="none")).save(tmp_path / "float.h5")
    opts = qana.train.TrainOptions(data=tmp_path, run_dir=tmp_path, image_size=32, qat_epochs=1, keep_quantized=mode)

    def fake_qat(qmodel, *args, **kwargs):
        if qat_moves_weights:
            qmodel.set_weights([np.zeros_like(w) for w in qmodel.get_weights()])
        return []

    monkeypatch.setattr(qana.train, "_fit", fake_qat)
    if not qat_moves_weights:
        # which model is kept does not depend on how it was quantized; the case that puts the
        # calibrated weights back and saves them uses the real quantizer
        request.getfixturevalue("float_copy_quantizer")
    info = qana.train.stage_quantized(opts, train, val)
    assert info["kept"] == kept and info["keep_quantized"] == mode
    assert info["agreement_images"] == 14  # 40 training images: calibration takes them all
    assert info["agreement_calibrated"]["agreement"] == pytest.approx(1.0, abs=0.2)
    assert set(info["agreement_fine_tuned"]) == {"agreement", "macro_f1"}
    if qat_moves_weights:
        assert info["agreement_fine_tuned"]["macro_f1"] < info["agreement_calibrated"]["macro_f1"]
        saved = qana.train.load_quantized(opts)
        assert any(np.any(w != 0) for w in saved.get_weights())  # the calibrated weights were put back
        # and the saved file is the calibrated model the stage scored, not a mix
        assert qana.train._val_scores(saved, val.images, val.labels) == pytest.approx(info["val_calibrated"])


def test_an_unknown_keep_quantized_is_refused_before_any_stage_runs(tmp_path: Path) -> None:
    from qana.train import TrainOptions, run

    with pytest.raises(ValueError, match="--keep-quantized must be validation or agreement, not 'best'"):
        run(TrainOptions(data=tmp_path, run_dir=tmp_path / "run", keep_quantized="best"))
    assert not (tmp_path / "run").exists()
