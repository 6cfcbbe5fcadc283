"""Pixel preprocessing after decoding, shared by training and every deployment path.

Colour constancy: dermoscopy images from different centres and devices differ in illumination
and white balance, and HAM10000's four centres are strongly non-IID (the federation's clinics
will be too). Shades of Gray (Finlayson & Trezzi 2004) estimates each image's illuminant as
the Minkowski p-norm mean of each channel and rescales the channels so that estimate becomes
neutral grey; p = 6 is the setting Barata et al. 2015 found best for dermoscopy and which many
ISIC challenge entries use. It is a fixed per-image function of the uint8 pixels, so a clinic
computes exactly what training saw; it cannot run on Akida (a global mean and a division), so
`qana.runtime.AkidaRuntime` applies it on the CPU before the chip, as the bundle says.

"none" leaves the pixels as decoded (every bundle made before this option, and the default).
"""

from __future__ import annotations

import numpy as np

COLOUR_CONSTANCY = ("none", "shades-of-gray")
SHADES_OF_GRAY_P = 6


def check_colour_constancy(name: str) -> str:
    if name not in COLOUR_CONSTANCY:
        raise ValueError(f"unknown colour constancy {name!r} (use one of {', '.join(COLOUR_CONSTANCY)})")
    return name


def shades_of_gray(images: np.ndarray, p: int = SHADES_OF_GRAY_P, chunk: int = 512) -> np.ndarray:
    """(N, H, W, 3) uint8 -> the same images with each one's estimated illuminant made grey.

    A channel's gain is 1 / (sqrt(3) * e_c) with e the unit-norm vector of channel p-means, so a
    grey-lit image keeps its pixels. A black image (no illuminant to estimate) is left as it is.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
    out = np.empty_like(images)
    for start in range(0, len(images), chunk):
        x = images[start : start + chunk].astype(np.float64)
        illuminant = np.mean(x**p, axis=(1, 2), keepdims=True) ** (1.0 / p)  # (n, 1, 1, 3)
        norm = np.linalg.norm(illuminant, axis=-1, keepdims=True)
        gain = np.where(norm > 0, 1.0 / (np.sqrt(3.0) * np.maximum(illuminant, 1e-12) / np.maximum(norm, 1e-12)), 1.0)
        out[start : start + chunk] = np.clip(np.rint(x * gain), 0, 255).astype(np.uint8)
    return out


def preprocess(images: np.ndarray, colour_constancy: str = "none") -> np.ndarray:
    """Apply the named preprocessing to decoded uint8 images ("none": returned unchanged)."""
    if check_colour_constancy(colour_constancy) == "none":
        return images
    return shades_of_gray(images)
