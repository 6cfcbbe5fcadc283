"""Random affine warps (`qana train --affine`) and hue-keeping contrast jitter
(`--contrast grey`) of training images.

Why: the float stage's augmentation is flips, quarter turns and luminance/contrast jitter, so
the network only ever sees a lesion at 8 orientations and one scale. Perez et al. 2018 ("Data
augmentation for skin lesion analysis", ISIC workshop at MICCAI) compared 13 augmentation sets
for dermoscopy and found the best to be the "basic set": flips, colour jitter, random crops and
affine transforms (rotation, shear, scaling). This module adds the geometric part we lacked, in
one bilinear resampling per image (not a chain of them, which would blur the image more):
any rotation angle (a dermoscopic image has no "up"), a mild shear, a zoom and a shift (the
random crop). Borders uncovered by the warp are filled by reflection, which continues the skin
texture rather than adding black corners the test images never have. No colour is touched here
(hue is diagnostic; `qana.train.make_dataset` keeps its luminance/contrast jitter, whose slight
effect on hue it describes).

Training images only: validation, test and every clinic see the plain preprocessing.
"""

from __future__ import annotations

import math

# Ranges of the random warp (uniform): the whole circle; shear up to about 11 degrees; zoom from
# 0.9 (a little more skin) to 1.25 (crop of 80 % of the side); shift up to 10 % of the side.
MAX_SHEAR = 0.2  # radians
ZOOM_RANGE = (0.9, 1.25)
MAX_SHIFT = 0.1  # fraction of the side


def affine_matrix(angle: float, shear: float, zoom: float, shift: tuple[float, float], size: tuple[float, float]):
    """The 8 projective-transform coefficients (TensorFlow's convention: they map an *output*
    pixel to the input point it is sampled from) of a warp about the image centre.

    Output pixel p is read from c + M (p - c) + shift·side, with c the centre and
    M = R(angle) · Shear(shear) / zoom, so zoom > 1 magnifies. Works on floats or tf scalars.
    """
    import tensorflow as tf

    height, width = size
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    cos, sin, tan = tf.cos(angle), tf.sin(angle), tf.tan(shear)
    # R · [[1, tan], [0, 1]], divided by zoom
    m00, m01 = cos / zoom, (cos * tan - sin) / zoom
    m10, m11 = sin / zoom, (sin * tan + cos) / zoom
    tx, ty = shift[0] * width, shift[1] * height
    a2 = cx + tx - m00 * cx - m01 * cy
    b2 = cy + ty - m10 * cx - m11 * cy
    zero = tf.zeros_like(m00)
    return tf.cast(tf.stack([m00, m01, a2, m10, m11, b2, zero, zero]), tf.float32)


def affine_warp(image, angle, shear, zoom, shift):
    """Warp one float image (H, W, C) by `affine_matrix`, bilinear, borders reflected."""
    import tensorflow as tf

    size = tf.shape(image)[:2]
    transform = affine_matrix(angle, shear, zoom, shift, (tf.cast(size[0], tf.float32), tf.cast(size[1], tf.float32)))
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None],
        transforms=transform[None],
        output_shape=size,
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="REFLECT",
    )
    return out[0]


def op_seed(seed: int | None, k: int) -> int | None:
    """The k-th op seed of an augmentation pipeline seeded with `seed` (None stays unseeded).

    Inside a tf.data map, random ops that share an op seed return the *same* uniform number, so
    every random draw of one image needs its own op seed, or flips, turns, zoom, warp and
    colour jitter all fire together (one random number per image instead of one per draw).
    """
    return None if seed is None else seed + k


def random_warp_parameters(seed: int | None = None):
    """(angle, shear, zoom, shift) drawn independently with the module's ranges.

    Each draw gets its own op seed (`op_seed`, seed + 101 .. seed + 104, clear of the ones
    `qana.train.make_dataset` uses for flips, turns and colour).
    """
    import tensorflow as tf

    angle = tf.random.uniform([], 0.0, 2.0 * math.pi, seed=op_seed(seed, 101))
    shear = tf.random.uniform([], -MAX_SHEAR, MAX_SHEAR, seed=op_seed(seed, 102))
    zoom = tf.random.uniform([], *ZOOM_RANGE, seed=op_seed(seed, 103))
    shift = tf.random.uniform([2], -MAX_SHIFT, MAX_SHIFT, seed=op_seed(seed, 104))
    return angle, shear, zoom, (shift[0], shift[1])


def random_affine(image, seed: int | None = None):
    """One random warp of a float image (H, W, C) with the module's ranges."""
    return affine_warp(image, *random_warp_parameters(seed))


def mixup_weights(count, alpha: float, seed: int | None = None):
    """`count` mixing weights drawn from Beta(alpha, alpha), as the ratio of two Gamma draws.

    Beta(a, a) = G1 / (G1 + G2) with G1, G2 ~ Gamma(a). For a small `alpha` both draws can
    underflow to 0 in float32; such a pair keeps the image as it is (weight 1) instead of
    giving NaN.
    """
    import tensorflow as tf

    g1 = tf.random.gamma([count], alpha, seed=op_seed(seed, 202))
    g2 = tf.random.gamma([count], alpha, seed=op_seed(seed, 203))
    total = g1 + g2
    return tf.where(total > 0, tf.math.divide_no_nan(g1, total), tf.ones_like(total))


def mix_batch(images, targets, *weights, alpha: float, seed: int | None = None):
    """Mixup (Zhang et al. 2018, "mixup: Beyond Empirical Risk Minimization") of one batch.

    Why: with ~6,000 training images and classes of 60-120 images, the network learns sharp
    boundaries around the few rare-class images it has. Mixup trains it on straight-line blends
    of two images, each with the same blend of their targets, which asks the logits to change
    linearly between training images: a smoothness prior that often helps small, imbalanced
    image sets and keeps the logits from growing without bound.

    Each image i is blended with image perm[i] of the same batch (a shuffled copy) with its own
    weight lam_i ~ Beta(alpha, alpha): x = lam x_i + (1 - lam) x_perm, the same for the (N, C)
    `targets` and for sample `weights` if given. Pixels stay in [0, 255]: a convex blend of two
    in-range images, clipped because in float32 it can round one step past 255. Training batches
    only: validation, test and clinics see plain images.

    Off by default: screened in session 28 it raised the chip's test accuracy but failed its
    rule, on validation top-1 and on float-to-chip fidelity (benchmarks/EXPERIMENTS.md, "Mixup").
    """
    import tensorflow as tf

    count = tf.shape(images)[0]
    perm = tf.random.shuffle(tf.range(count), seed=op_seed(seed, 201))
    lam = mixup_weights(count, alpha, seed)

    def blend(a):
        a = tf.cast(a, tf.float32)
        shape = tf.concat([[count], tf.ones([tf.rank(a) - 1], tf.int32)], 0)
        w = tf.reshape(lam, shape)
        return w * a + (1.0 - w) * tf.gather(a, perm)

    # images only: targets and weights are blended exactly as the images' shares, unclipped
    return (tf.clip_by_value(blend(images), 0.0, 255.0), blend(targets), *(blend(w) for w in weights))


CONTRASTS = ("per-channel", "grey")  # `qana train --contrast`: tf.image's (the default) or about one grey level


def check_contrast(name: str) -> str:
    """A clear error for an unknown `--contrast` before any stage runs."""
    if name not in CONTRASTS:
        raise ValueError(f"--contrast must be one of {', '.join(CONTRASTS)}, not {name!r}")
    return name


def random_contrast(image, contrast: str, lower: float, upper: float, seed: int | None = None):
    """Contrast jitter by the `--contrast` name: the one place both the float/QAT pipeline
    (qana.train.make_dataset) and the pretraining views (qana.pretrain) pick the op, so the two
    cannot drift apart. "per-channel" is tf.image.random_contrast, "grey" random_grey_contrast."""
    import tensorflow as tf

    if check_contrast(contrast) == "grey":
        return random_grey_contrast(image, lower, upper, seed=seed)
    return tf.image.random_contrast(image, lower, upper, seed=seed)


def random_grey_contrast(image, lower: float, upper: float, seed: int | None = None):
    """Contrast jitter that keeps every pixel's hue: (x - m) f + m with one grey level m (the
    image's mean over all pixels and channels) and f uniform in [lower, upper].

    Why: tf.image.random_contrast moves each channel about its own mean, which adds
    (1 - f)(m_r - m_g) to a pixel's red-green difference: on a pink skin image a blue-grey
    region turns by up to 16 degrees of hue at 0.8-1.2 (session 35, qana.pretrain's docstring),
    and hue is diagnostic. About one grey level every channel difference is scaled by the same f,
    so hue is unchanged (until the clip at 255 that follows) and only saturation and contrast move.
    """
    import tensorflow as tf

    factor = tf.random.uniform([], lower, upper, seed=seed)
    mean = tf.reduce_mean(image)
    return (image - mean) * factor + mean
