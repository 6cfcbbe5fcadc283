"""qana.metrics.grouped_bootstrap: resamples lesions (not images), pairs the models, and says
how wide one test part's uncertainty is."""

import numpy as np
import pytest

from qana.metrics import clears_bar, grouped_bootstrap, interval, mean_interval

CLASSES = ("a", "b")


def test_whole_lesions_are_resampled_not_images() -> None:
    # Lesion A: 9 images, all right; lesion B: 1 image, wrong. Drawing two lesions gives top-1
    # 1.0 (A, A), 0.9 (A, B) or 0.0 (B, B) and nothing else; drawing images would give any tenth.
    labels = np.zeros(10, dtype=int)
    predictions = np.array([0] * 9 + [1])
    lesions = np.array(["A"] * 9 + ["B"])
    top1 = grouped_bootstrap(labels, {"m": predictions}, lesions, CLASSES, resamples=400, seed=1)["m"]["top1"]
    assert set(np.round(top1, 6)) == {0.0, 0.9, 1.0}
    assert 0.35 < np.mean(np.isclose(top1, 0.9)) < 0.65  # (A, B) or (B, A): half the draws


def test_models_share_their_resamples() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    lesions = np.arange(200) // 2
    pred = np.where(rng.random(200) < 0.8, labels, 1 - labels)
    boot = grouped_bootstrap(labels, {"chip": pred, "float": pred.copy()}, lesions, CLASSES, resamples=50, seed=0)
    np.testing.assert_array_equal(boot["chip"]["macro_f1"], boot["float"]["macro_f1"])  # paired: difference exactly 0
    assert np.ptp(boot["chip"]["macro_f1"]) > 0  # while each one does move between resamples


def test_interval_narrows_with_more_lesions_and_holds_the_figure() -> None:
    rng = np.random.default_rng(0)

    def width(n: int) -> float:
        labels = rng.integers(0, 2, n)
        pred = np.where(rng.random(n) < 0.8, labels, 1 - labels)
        low, high = interval(grouped_bootstrap(labels, {"m": pred}, np.arange(n), CLASSES, resamples=500)["m"]["top1"])
        assert low <= np.mean(pred == labels) <= high
        return high - low

    small, large = width(50), width(2000)
    assert large < small / 3  # about sqrt(40) narrower
    assert 0.15 < small < 0.35  # binomial: 2 * 1.96 * sqrt(0.16 / 50) = 0.22


def test_perfect_predictions_are_perfect_in_every_resample() -> None:
    labels = np.array([0, 1, 0, 1, 1])
    boot = grouped_bootstrap(labels, {"m": labels}, np.array(list("vwxyz")), CLASSES, resamples=20)
    for metric in ("top1", "balanced_accuracy"):
        np.testing.assert_array_equal(boot["m"][metric], 1.0)


def test_same_seed_same_resamples() -> None:
    labels = np.array([0, 1, 0, 1, 1, 0])
    pred = np.array([0, 0, 0, 1, 1, 1])
    a = grouped_bootstrap(labels, {"m": pred}, np.arange(6), CLASSES, resamples=30, seed=7)
    b = grouped_bootstrap(labels, {"m": pred}, np.arange(6), CLASSES, resamples=30, seed=7)
    np.testing.assert_array_equal(a["m"]["top1"], b["m"]["top1"])


@pytest.mark.parametrize(
    ("labels", "pred", "groups", "resamples", "message"),
    [
        ([0, 1], [0, 1], [0], 10, "labels and groups differ"),
        ([0, 1], [0], [0, 1], 10, "predictions of 'm' differ"),
        ([0, 1], [0, 1], [0, 1], 0, "resamples must be at least 1"),
        ([], [], [], 10, "no images"),
        ([0, 1], [0, 4], [0, 1], 10, "predictions of 'm' must be class indices"),  # counted in another row before
        ([-1, 1], [0, 1], [0, 1], 10, "labels must be class indices"),
    ],
)
def test_bad_input_is_named(labels, pred, groups, resamples, message) -> None:
    with pytest.raises(ValueError, match=message):
        grouped_bootstrap(np.array(labels, dtype=int), {"m": np.array(pred, dtype=int)}, np.array(groups), CLASSES, resamples=resamples)


def test_mean_interval_is_the_student_t_interval_of_the_runs() -> None:
    mean, low, high = mean_interval([0.70, 0.80])
    # sd 0.0707, t(0.975, 1 df) = 12.706: half-width 12.706 * 0.0707 / sqrt(2) = 0.635
    assert mean == pytest.approx(0.75) and low == pytest.approx(0.75 - 0.6353, abs=1e-3) and high == pytest.approx(0.75 + 0.6353, abs=1e-3)
    mean, low, high = mean_interval([0.80, 0.80, 0.80])
    assert low == pytest.approx(0.80) and high == pytest.approx(0.80)
    with pytest.raises(ValueError, match="at least two"):
        mean_interval([0.80])


def test_clears_bar_needs_every_part_of_the_bar() -> None:
    draws = {"top1": np.array([0.80, 0.81, 0.79, 0.85]), "macro_f1": np.array([0.60, 0.59, 0.70, 0.61])}
    assert clears_bar(draws).tolist() == [True, False, False, True]  # the bar itself counts as cleared
    assert bool(clears_bar({"top1": 0.803, "macro_f1": 0.578})) is False
