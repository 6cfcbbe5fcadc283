"""Test-time views: orientations of an image, and the runtime's averaged features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qana.bundle import BundleError, load_bundle
from qana.views import (
    averaged_features,
    averaged_logits,
    check_view_count,
    dihedral_view,
)
from tests.live_bundles import FIXTURES, spiking_tiny_v1, with_test_time_views


def _images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_the_eight_views_are_the_distinct_flips_and_turns_of_the_image() -> None:
    x = _images(2, size=5)
    views = [dihedral_view(x, i) for i in range(8)]
    flat = {v.tobytes() for v in views}
    assert len(flat) == 8, "every view must be a different orientation"
    for v in views:  # each view moves pixels, never changes them
        assert v.flags["C_CONTIGUOUS"] and v.shape == x.shape
        np.testing.assert_array_equal(np.sort(v.reshape(2, -1, 3), axis=1), np.sort(x.reshape(2, -1, 3), axis=1))
    # the first four are closed under composition (identity, both mirrors, half turn)
    group = {dihedral_view(x, i).tobytes() for i in range(4)}
    for i in range(4):
        for j in range(4):
            assert dihedral_view(dihedral_view(x, i), j).tobytes() in group
    np.testing.assert_array_equal(views[0], x)


def test_averaging_rounds_half_up_and_one_view_is_the_plain_features() -> None:
    x = _images(3)
    calls = []

    def feats(batch: np.ndarray) -> np.ndarray:
        calls.append(batch)
        return np.full((len(batch), 2), len(calls) - 1, np.int32)  # view i -> feature value i

    assert averaged_features(x, 1, feats).tolist() == [[0, 0]] * 3 and len(calls) == 1
    calls.clear()
    assert averaged_features(x, 2, feats).tolist() == [[1, 1]] * 3  # mean 0.5 -> 1
    calls.clear()
    assert averaged_features(x, 4, feats).tolist() == [[2, 2]] * 3  # mean 1.5 -> 2
    np.testing.assert_allclose(averaged_logits(x, 4, lambda b: np.full((len(b), 1), float(b[0, 0, 0, 0]))),
                               np.mean([[[float(dihedral_view(x, i)[0, 0, 0, 0])]] * 3 for i in range(4)], axis=0))


@pytest.mark.parametrize("bad", [0, 3, 16, True, 2.0, "4"])
def test_bad_view_counts_are_refused(bad, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="test-time views must be one of 1, 2, 4, 8"):
        check_view_count(bad)
    with pytest.raises(ValueError, match="square"):
        dihedral_view(np.zeros((1, 4, 5, 3), np.uint8), 1)
    bundle = with_test_time_views(FIXTURES / "tiny-v2", tmp_path / "b", 2)
    manifest = json.loads((bundle / "bundle.json").read_text())
    manifest["test_time_views"] = bad
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="test_time_views must be one of"):
        load_bundle(bundle)


@pytest.mark.parametrize("target", ["v2", "v1"])
def test_runtime_averages_the_views_features_and_the_chip_head_runs_on_the_mean(target: str, tmp_path: Path) -> None:
    from qana import head as head_math
    from qana.runtime import AkidaRuntime

    source = FIXTURES / "tiny-v2" if target == "v2" else spiking_tiny_v1(tmp_path / "spiking")
    single = AkidaRuntime(load_bundle(source), device="software")
    multi = AkidaRuntime(load_bundle(with_test_time_views(source, tmp_path / "views4", 4)), device="software")
    assert load_bundle(source).test_time_views == 1
    images = _images(24, seed=1)
    per_view = np.stack([single.features(dihedral_view(images, i)) for i in range(4)]).astype(np.int64)
    assert len({v.tobytes() for v in per_view}) > 1, "the views must give different features for this test to mean anything"
    expected = np.floor(per_view.mean(0) + 0.5).astype(np.int64)
    feats = multi.features(images)
    np.testing.assert_array_equal(feats, expected)
    if target == "v1":
        assert set(np.unique(feats)) <= {0, 1}, "a rounded mean of spikes is a majority vote: still binary"
    # the whole model with views = the chip head on the averaged features = the integer reference
    q = head_math.quantize_head(multi.bundle.load_head(), target)
    multi.write_head(q)
    chip = multi.logits(images)
    np.testing.assert_allclose(chip, multi.head_logits(feats), rtol=1e-6)
    reference = head_math.quantized_logits(q, feats)
    np.testing.assert_allclose(chip, reference, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(reference).max())))


def test_on_chip_image_learning_refuses_a_multi_view_bundle(tmp_path: Path) -> None:
    from qana.edge import bundle_edge_model

    bundle = load_bundle(with_test_time_views(FIXTURES / "tiny-v1", tmp_path / "b", 2))
    with pytest.raises(ValueError, match="averages 2 test-time views"):
        bundle_edge_model(bundle, units=14)
