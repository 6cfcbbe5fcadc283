"""Self-supervised pretraining of the backbone on the run's own training images (VICReg).

Why: the paper starts from ImageNet knowledge (its saliency teacher is an ImageNet ResNet-50),
and ImageNet weights cannot be downloaded here. The one source of "pretraining" that needs no
download is the training images themselves without their labels. VICReg (Bardes, Ponce and
LeCun, ICLR 2022) learns features that stay the same across two random views of one image
(invariance), while every feature keeps a spread over the batch (variance) and features carry
different information (covariance). Unlike SimCLR it needs no negative pairs, so it works with
the small batches a 2-core machine can afford.

What crosses from here into `qana train`: only the backbone's weights (everything up to the
`features` layer). The float stage then trains the whole network, head included, with the
usual recipe from those weights instead of a random start. Only the run's *training* images
are used, so validation and test lesions stay unseen, labels or not.

The two views of an image differ by a random square crop (35-100 % of the area, resized back),
flips and quarter turns, luminance and contrast, and with probability 0.2 a grey version of the
image. No hue-rotation augmentation is used (no tf.image.random_hue: colour is diagnostic).
Brightness adds the same amount to all three channels. Contrast (factors 0.6-1.4) follows
`qana train --contrast`, as in the float stage. The default is tf.image's per-channel contrast,
about each channel's own mean, so it moves a pixel's hue: on a pink image with a blue-grey
region, that region's hue moves by up to 80 degrees (towards a purplish grey) at the factors used
here and by up to 16 degrees at the float stage's 0.8-1.2 (skin by about 1 degree). The shipped
runs were trained with these ops, so they stay the default. `--contrast grey` jitters about one
grey level instead (qana.augment.random_grey_contrast), which keeps every pixel's hue; the crop's
resize still blends neighbouring pixels, as any resampling does. Clipping at 255 can move a hue
too (+40 on (240, 200, 180): 20 -> 34 degrees). The grey view removes colour from one of the two
views so that "same colour histogram" alone cannot match them.
"""

from __future__ import annotations

import numpy as np

from qana.augment import check_contrast, op_seed, random_contrast
from qana.model import backbone

# VICReg's loss weights (the paper's defaults): invariance, variance, covariance.
INVARIANCE_WEIGHT = 25.0
VARIANCE_WEIGHT = 25.0
COVARIANCE_WEIGHT = 1.0
EXPANDER_UNITS = 1024  # the paper uses 8192 for ResNet-50's 2048 features; 4 x our 256 features
MIN_CROP_AREA = 0.35
CONTRAST_RANGE = (0.6, 1.4)  # the factors of VICReg's own views (ColorJitter contrast 0.4); the float stage uses 0.8-1.2
GREY_PROBABILITY = 0.2


def vicreg_terms(z1, z2):
    """(invariance, variance, covariance) of two batches of embeddings (N, D), as in VICReg.

    invariance: mean squared distance between the two views' embeddings;
    variance: mean over dimensions of max(0, 1 - std), for each view, summed: it is 0 once
      every dimension has a standard deviation of at least 1 over the batch (no collapse);
    covariance: squared off-diagonal covariances / D, for each view, summed.
    Works on tf tensors (training) and numpy arrays alike.
    """
    import tensorflow as tf

    z1, z2 = tf.convert_to_tensor(z1, tf.float32), tf.convert_to_tensor(z2, tf.float32)
    invariance = tf.reduce_mean(tf.square(z1 - z2))
    n = tf.cast(tf.shape(z1)[0], tf.float32)
    d = tf.cast(tf.shape(z1)[1], tf.float32)
    variance = 0.0
    covariance = 0.0
    for z in (z1, z2):
        z = z - tf.reduce_mean(z, axis=0)
        std = tf.sqrt(tf.reduce_mean(tf.square(z), axis=0) * n / tf.maximum(n - 1.0, 1.0) + 1e-4)
        variance += tf.reduce_mean(tf.nn.relu(1.0 - std))
        cov = tf.matmul(z, z, transpose_a=True) / tf.maximum(n - 1.0, 1.0)
        off_diagonal = cov - tf.linalg.diag(tf.linalg.diag_part(cov))
        covariance += tf.reduce_sum(tf.square(off_diagonal)) / d
    return invariance, variance, covariance


def weighted_loss(invariance, variance, covariance):
    """VICReg's loss from its three terms (`vicreg_terms`), with the paper's weights."""
    return INVARIANCE_WEIGHT * invariance + VARIANCE_WEIGHT * variance + COVARIANCE_WEIGHT * covariance


def vicreg_loss(z1, z2):
    """The weighted VICReg loss of two views' embeddings."""
    return weighted_loss(*vicreg_terms(z1, z2))


def random_view(x, seed: int | None, stream: int, contrast: str = "per-channel"):
    """One random view of a float image (H, W, 3) in 0..255 (see the module docstring).

    `stream` separates the op seeds of the two views of a pair, so they are drawn independently.
    `contrast` is `qana train --contrast`: "per-channel" (tf.image's) or "grey" (keeps hue).
    """
    import tensorflow as tf

    def s(k: int) -> int | None:
        return op_seed(seed, 200 + 20 * stream + k)

    side = tf.shape(x)[0]
    area = tf.random.uniform([], MIN_CROP_AREA, 1.0, seed=s(0))
    crop = tf.maximum(tf.cast(tf.round(tf.cast(side, tf.float32) * tf.sqrt(area)), tf.int32), 8)
    x = tf.image.random_crop(x, tf.stack([crop, crop, 3]), seed=s(1))
    x = tf.image.resize(x, tf.stack([side, side]))
    x = tf.image.random_flip_left_right(x, seed=s(2))
    x = tf.image.random_flip_up_down(x, seed=s(3))
    x = tf.image.rot90(x, tf.random.uniform([], 0, 4, dtype=tf.int32, seed=s(4)))
    x = tf.image.random_brightness(x, 40.0, seed=s(5))
    x = random_contrast(x, contrast, *CONTRAST_RANGE, seed=s(6))
    grey = tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(x))
    x = tf.where(tf.random.uniform([], seed=s(7)) < GREY_PROBABILITY, grey, x)
    return tf.clip_by_value(x, 0.0, 255.0)


def view_pairs(images: np.ndarray, batch: int, seed: int, contrast: str = "per-channel"):
    """tf.data of (view 1, view 2) batches of the uint8 images, reshuffled every epoch.

    The last partial batch is dropped: VICReg's variance and covariance need a full batch.
    """
    import tensorflow as tf

    check_contrast(contrast)  # an unknown name must not fall back to per-channel unnoticed

    ds = tf.data.Dataset.from_tensor_slices(images)
    ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)

    def pair(x):
        x = tf.cast(x, tf.float32)
        return random_view(x, seed, 0, contrast), random_view(x, seed, 1, contrast)

    # one call at a time: parallel calls would hand the stateful draws out in scheduling order
    return ds.map(pair).batch(batch, drop_remainder=True).prefetch(2)


def build_pretrainer(model):
    """A tf_keras model whose `fit` trains `model`'s backbone with VICReg.

    The backbone is `model` up to its `features` layer and shares its weights: after fitting,
    `model` itself holds the pretrained backbone (its head is untouched and unused).
    """
    import tensorflow as tf
    import tf_keras as keras
    from tf_keras import layers

    encoder = backbone(model)
    expander = keras.Sequential(
        [
            layers.Dense(EXPANDER_UNITS, use_bias=False),
            layers.BatchNormalization(),
            layers.ReLU(),
            layers.Dense(EXPANDER_UNITS, use_bias=False),
            layers.BatchNormalization(),
            layers.ReLU(),
            layers.Dense(EXPANDER_UNITS),
        ],
        name="expander",
    )

    class VICReg(keras.Model):
        def __init__(self) -> None:
            super().__init__(name="vicreg")
            self.encoder, self.expander = encoder, expander

        def call(self, x, training=False):
            return self.expander(self.encoder(x, training=training), training=training)

        def train_step(self, data):
            v1, v2 = data
            with tf.GradientTape() as tape:
                z1, z2 = self(v1, training=True), self(v2, training=True)
                invariance, variance, covariance = vicreg_terms(z1, z2)  # each logged per epoch
                loss = weighted_loss(invariance, variance, covariance)
            grads = tape.gradient(loss, self.trainable_variables)
            self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
            return {"loss": loss, "invariance": invariance, "variance": variance, "covariance": covariance}

    pretrainer = VICReg()
    side = model.input_shape[1]
    pretrainer(tf.zeros((2, side, side, 3)))  # build the weights
    return pretrainer
