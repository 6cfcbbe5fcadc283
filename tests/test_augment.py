"""The random affine warp (qana.augment): its matrix does what its docstring says; the grey contrast keeps hue."""

import math

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from qana.augment import ZOOM_RANGE, affine_warp, op_seed, random_affine, random_warp_parameters  # noqa: E402
from qana.train import make_dataset  # noqa: E402
from qana.views import dihedral_view  # noqa: E402


def _image(side: int = 16) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.uniform(0, 255, (side, side, 3)).astype(np.float32)


def _warp(img, angle=0.0, shear=0.0, zoom=1.0, shift=(0.0, 0.0)) -> np.ndarray:
    return affine_warp(tf.constant(img), angle, shear, zoom, shift).numpy()


def test_identity_warp_returns_the_image():
    img = _image()
    np.testing.assert_allclose(_warp(img), img, atol=1e-3)


def test_quarter_turn_is_an_exact_rotation():
    img = _image()
    out = _warp(img, angle=math.pi / 2)
    # a quarter turn about the centre lands on pixel centres: no interpolation
    matches = [np.allclose(out, np.rot90(img, k, axes=(0, 1)), atol=1e-3) for k in (1, 3)]
    assert sum(matches) == 1


def test_zoom_magnifies_about_the_centre():
    side = 17  # odd: the centre is a pixel
    img = np.zeros((side, side, 3), np.float32)
    img[6:11, 6:11] = 200.0  # a 5x5 "lesion" in the middle
    out = _warp(img, zoom=2.0)
    assert out[8, 8, 0] == pytest.approx(200.0)
    assert (out[..., 0] > 100).sum() > 4 * (img[..., 0] > 100).sum() * 0.8  # about 4x the area


def test_shift_moves_the_image():
    img = _image()
    out = _warp(img, shift=(0.25, 0.0))  # output x reads input x + 4
    np.testing.assert_allclose(out[:, :8], img[:, 4:12], atol=1e-3)


def test_random_warps_stay_in_range_and_differ():
    img = _image(32)
    a = random_affine(tf.constant(img), seed=1).numpy()
    b = random_affine(tf.constant(img), seed=2).numpy()
    assert a.shape == img.shape and np.isfinite(a).all()
    assert a.min() >= -1e-3 and a.max() <= 255 + 1e-3  # bilinear + reflection: a convex mix of pixels
    assert not np.allclose(a, b)
    assert ZOOM_RANGE[0] < 1 < ZOOM_RANGE[1]


def test_training_pipeline_with_the_warp_keeps_images_valid():
    images = np.stack([_image(16).astype(np.uint8)] * 4)
    labels = np.arange(4)
    plain = next(iter(make_dataset(images, labels, 4, False, 0)))[0].numpy()
    warped = next(iter(make_dataset(images, labels, 4, True, 0, affine=True)))[0].numpy()
    assert warped.shape == plain.shape and warped.dtype == np.float32
    assert np.isfinite(warped).all() and warped.min() >= 0 and warped.max() <= 255


def test_warp_parameters_are_drawn_independently_inside_a_data_pipeline():
    # tf.data traces the map: random ops sharing an op seed would draw the same uniform number
    ds = tf.data.Dataset.range(200).map(lambda i: random_warp_parameters(0))
    angle, shear, zoom, shift = zip(*[(a.numpy(), s.numpy(), z.numpy(), d[0].numpy()) for a, s, z, d in ds])
    for other in (shear, zoom, shift):
        assert abs(np.corrcoef(angle, other)[0, 1]) < 0.3
    flips = tf.data.Dataset.range(200).map(lambda i: tf.random.uniform([], seed=op_seed(0, 1)))  # make_dataset's first flip
    assert abs(np.corrcoef(angle, [f.numpy() for f in flips])[0, 1]) < 0.3


def test_training_pipeline_shows_all_eight_orientations():
    # Flips and quarter turns with a shared op seed fired together: 394 of 400 draws were plain
    # rotations. Brightness and contrast are affine in pixel value, so correlation still finds
    # the orientation; values stay in 60..190 so clipping never bites.
    rng = np.random.default_rng(0)
    image = rng.integers(60, 190, size=(8, 8, 3)).astype(np.uint8)
    candidates = [dihedral_view(image[None], i)[0].astype(np.float64).ravel() for i in range(8)]
    ds = make_dataset(np.repeat(image[None], 400, axis=0), np.zeros(400, np.int64), 400, True, 0)
    batch = next(iter(ds))[0].numpy().astype(np.float64)
    seen = np.zeros(8, int)
    for x in batch:
        seen[int(np.argmax([np.corrcoef(x.ravel(), c)[0, 1] for c in candidates]))] += 1
    assert seen.min() >= 25, f"orientation counts {seen.tolist()} (expected about 50 each)"


def _hues(images: np.ndarray) -> np.ndarray:
    """Every pixel's hue (0..1), sorted: flips and quarter turns only reorder pixels."""
    return np.sort(tf.image.rgb_to_hsv(np.asarray(images, np.float32) / 255.0).numpy()[..., 0].ravel())


def _pink(n: int, side: int = 8) -> np.ndarray:
    """Skin-like images with a colour cast (no grey pixel, whose hue would be undefined), in a
    range the brightness and contrast jitter never clip."""
    rng = np.random.default_rng(5)
    return np.stack([rng.integers(lo, lo + 40, (n, side, side)) for lo in (150, 60, 100)], axis=-1).astype(np.uint8)


def test_grey_contrast_keeps_every_pixels_hue_and_tf_images_per_channel_contrast_does_not():
    from qana.augment import random_grey_contrast

    image = tf.constant(_pink(1)[0], tf.float32)
    for factor in (0.8, 1.2):
        grey = random_grey_contrast(image, factor, factor, seed=0).numpy()
        np.testing.assert_allclose(_hues(grey), _hues(image.numpy()), atol=1e-5)
        assert np.abs(grey - image.numpy()).max() > 5  # the contrast did change
        per_channel = tf.image.adjust_contrast(image, factor).numpy()
        assert np.abs(_hues(per_channel) - _hues(image.numpy())).max() > 0.005  # about 2 degrees and more


def test_the_training_pipeline_with_grey_contrast_changes_no_hue():
    """Flips, quarter turns, brightness (the same on all channels) and grey contrast: every
    augmented image has its original's hues; with the default per-channel contrast it does not."""
    images = _pink(16)
    labels = np.arange(16) % 7
    grey = next(iter(make_dataset(images, labels, 16, True, 0, contrast="grey")))[0].numpy()
    plain = next(iter(make_dataset(images, labels, 16, True, 0)))[0].numpy()

    def has_an_originals_hues(x: np.ndarray) -> bool:  # the batch is shuffled: any original will do
        return any(np.allclose(_hues(x), _hues(o), atol=1e-4) for o in images)

    assert all(has_an_originals_hues(x) for x in grey)
    assert not any(has_an_originals_hues(x) for x in plain)


def test_an_unknown_contrast_is_refused_before_anything_runs(tmp_path):
    from qana.train import TrainOptions, run

    with pytest.raises(ValueError, match="--contrast must be one of per-channel, grey, not 'gray'"):
        run(TrainOptions(data=tmp_path, run_dir=tmp_path / "run", contrast="gray"))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="--contrast must be one of"):
        make_dataset(_pink(2), np.arange(2), 2, True, 0, contrast="gray")
