"""Colour constancy (qana.preprocess): what it does to pixels, and that training and the runtime apply it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from qana.bundle import Bundle, BundleError, load_bundle
from qana.preprocess import SHADES_OF_GRAY_P, preprocess, shades_of_gray

TINY = Path(__file__).parent / "fixtures" / "bundles"


def _cast(n: int, gains=(1.0, 0.8, 0.55), seed: int = 0) -> np.ndarray:
    """Grey-world images seen under a coloured light (each channel scaled by its gain)."""
    rng = np.random.default_rng(seed)
    grey = rng.integers(40, 200, (n, 16, 16, 1)).repeat(3, axis=-1).astype(np.float64)
    return np.clip(np.rint(grey * np.array(gains)), 0, 255).astype(np.uint8)


def _p_means(images: np.ndarray) -> np.ndarray:
    return np.mean(images.astype(np.float64) ** SHADES_OF_GRAY_P, axis=(1, 2)) ** (1 / SHADES_OF_GRAY_P)


def test_a_colour_cast_is_removed_and_grey_light_is_left_alone() -> None:
    cast = _cast(4)
    before, after = _p_means(cast), _p_means(shades_of_gray(cast))
    assert np.all(before.max(1) / before.min(1) > 1.7)  # red light: the blue channel is far darker
    assert np.all(after.max(1) / after.min(1) < 1.03)  # after: the illuminant estimate is grey
    grey = _cast(3, gains=(1.0, 1.0, 1.0), seed=1)
    np.testing.assert_array_equal(shades_of_gray(grey), grey)
    black = np.zeros((1, 8, 8, 3), np.uint8)
    np.testing.assert_array_equal(shades_of_gray(black), black)


def test_bad_input_and_unknown_names_are_named() -> None:
    with pytest.raises(ValueError, match="uint8"):
        shades_of_gray(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="unknown colour constancy 'retinex'"):
        preprocess(_cast(1), "retinex")
    images = _cast(2)
    assert preprocess(images, "none") is images


def _with_colour_constancy(bundle: Bundle) -> Bundle:
    manifest = json.loads(json.dumps(bundle.manifest))
    manifest.setdefault("preprocessing", {})["colour_constancy"] = "shades-of-gray"
    return Bundle(bundle.path, manifest)


@pytest.mark.parametrize("views", [1, 4])
def test_the_runtime_applies_the_bundles_preprocessing(views: int) -> None:
    from qana.runtime import AkidaRuntime

    plain = load_bundle(TINY / "tiny-v2")
    plain = Bundle(plain.path, {**plain.manifest, "test_time_views": views})
    corrected = _with_colour_constancy(plain)
    assert corrected.colour_constancy == "shades-of-gray" and plain.colour_constancy == "none"
    images = _cast(6, seed=2)
    images = np.repeat(np.repeat(images, 2, axis=1), 2, axis=2)  # the tiny bundles take 32x32
    want = AkidaRuntime(plain, "software")
    got = AkidaRuntime(corrected, "software")
    np.testing.assert_array_equal(got.features(images), want.features(shades_of_gray(images)))
    np.testing.assert_array_equal(got.logits(images), want.logits(shades_of_gray(images)))
    assert not np.array_equal(want.features(images), want.features(shades_of_gray(images)))  # it does change something


def test_a_bundle_naming_an_unknown_preprocessing_is_refused(tmp_path: Path) -> None:
    bundle_dir = Path(shutil.copytree(TINY / "tiny-v2", tmp_path / "b"))
    manifest = json.loads((bundle_dir / "bundle.json").read_text())
    manifest.setdefault("preprocessing", {})["colour_constancy"] = "retinex"
    (bundle_dir / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="unknown colour constancy 'retinex'"):
        load_bundle(bundle_dir)


def test_a_run_sees_its_images_with_its_preprocessing(tmp_path: Path) -> None:
    pytest.importorskip("tensorflow")
    from dataclasses import replace

    from qana.train import TrainOptions, run, run_dataset
    from tests.synthetic import make_synthetic_ham

    clinic = make_synthetic_ham(tmp_path / "ham", n_images=12, image_size=40, seed=3)
    opts = TrainOptions(data=clinic.root, run_dir=tmp_path / "run", image_size=16, cache_dir=tmp_path / "cache", command="test")
    plain = run_dataset(opts)
    corrected = run_dataset(replace(opts, colour_constancy="shades-of-gray"))
    np.testing.assert_array_equal(corrected.images, shades_of_gray(plain.images))
    assert list(corrected.content_hashes) == list(plain.content_hashes)  # caches stay keyed by the JPEG bytes
    with pytest.raises(ValueError, match="Akida 2.0 runtime only"):
        run(replace(opts, target="v1", colour_constancy="shades-of-gray"), progress=lambda m: None)


def test_the_centre_colour_benchmark_prints_every_centre(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.synthetic import make_synthetic_ham

    clinic = make_synthetic_ham(tmp_path / "ham", n_images=12, image_size=40, seed=4)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "centre_colour.py"
    done = subprocess.run([sys.executable, str(script), "--data", str(clinic.root), "--image-size", "16"],
                          check=True, capture_output=True, text=True, timeout=120)
    from qana.data import load_dataset

    centres = sorted(set(load_dataset(clinic.root, size=16, cache_dir=None).centres.tolist()))
    lines = done.stdout.splitlines()
    assert "shades-of-gray R/G/B" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == centres
