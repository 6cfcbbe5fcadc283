"""Backbone features, computed once per backbone version and cached on disk.

The backbone is frozen during federation, so a clinic runs it over its images once per
bundle and reuses the integer features every round; each round only trains the head. The
cache is keyed by the sha256 of each image's JPEG bytes (`Dataset.content_hashes`) and the
bundle id, so a folder that grows only sends its new images through the backbone, and a
renamed file is not recomputed. One file per bundle, replaced atomically.
"""

from __future__ import annotations

import io
import logging
import zipfile
from pathlib import Path
from typing import Protocol

import numpy as np

from qana.atomic import write_atomic
from qana.bundle import Bundle
from qana.data import Dataset

log = logging.getLogger(__name__)


class FeatureExtractor(Protocol):
    def features(self, images: np.ndarray) -> np.ndarray: ...


class FeatureCache:
    """Features of one bundle's backbone, by image content hash."""

    def __init__(self, root: Path | str, bundle: Bundle) -> None:
        self.bundle = bundle
        self.path = Path(root) / "features" / f"{bundle.bundle_id}.npz"
        self.damaged = False  # set when a cache file was there but could not be used (it is rebuilt)

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        empty = (np.zeros(0, dtype="U64"), np.zeros((0, self.bundle.feature_dim), np.int16))
        if not self.path.is_file():
            return empty
        try:
            with np.load(self.path, allow_pickle=False) as z:
                hashes, feats = z["hashes"], z["features"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:  # empty or truncated: a cache, so rebuild
            return self._discard(f"is unreadable ({exc})", empty)
        if hashes.ndim != 1 or hashes.dtype.kind != "U":
            return self._discard(f"has image hashes of shape {hashes.shape} and type {hashes.dtype}", empty)
        if feats.ndim != 2 or feats.shape != (len(hashes), self.bundle.feature_dim) or feats.dtype.kind not in "iu":
            return self._discard(f"has features of shape {feats.shape} and type {feats.dtype}", empty)
        return hashes, feats

    def _discard(self, problem: str, empty: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        if not self.damaged:  # `cached` and `features` both read the file: say it once
            log.warning("feature cache %s %s; recomputing it", self.path, problem)
        self.damaged = True
        return empty

    def _save(self, hashes: np.ndarray, feats: np.ndarray) -> None:
        # Built in memory (a few MB for a whole clinic) and written by write_atomic: a stop
        # mid-write leaves the old cache, and a killed writer's temporary file is removed later.
        buffer = io.BytesIO()
        np.savez(buffer, hashes=hashes, features=feats)
        write_atomic(self.path, buffer.getvalue())

    def cached(self, hashes: np.ndarray) -> np.ndarray:
        """Which of these image content hashes already have features (bool mask, nothing computed).

        `qana-client learn` uses it to tell the clinic's earlier images from the ones that
        arrived since, before `features` fills the cache in.
        """
        known = set(self._load()[0].tolist())
        return np.array([h in known for h in np.asarray(hashes).tolist()], dtype=bool)

    def features(self, dataset: Dataset, extractor: FeatureExtractor) -> tuple[np.ndarray, int]:
        """Features aligned with `dataset` rows, and how many had to be computed now."""
        hashes, feats = self._load()
        index = {h: i for i, h in enumerate(hashes.tolist())}
        wanted = dataset.content_hashes.tolist()
        missing_rows = [i for i, h in enumerate(wanted) if h not in index]
        unique_missing: dict[str, int] = {}
        for i in missing_rows:
            unique_missing.setdefault(wanted[i], i)
        if unique_missing:
            rows = np.array(list(unique_missing.values()), dtype=np.int64)
            new = np.asarray(extractor.features(dataset.images[rows]))
            new = new.reshape(len(rows), -1)
            if new.shape[1] != self.bundle.feature_dim:
                raise ValueError(
                    f"backbone produced {new.shape[1]} features per image, bundle declares {self.bundle.feature_dim}"
                )
            hashes = np.concatenate([hashes, np.array(list(unique_missing), dtype="U64")])
            feats = np.concatenate([feats, new.astype(np.int16)])
            self._save(hashes, feats)
            index = {h: i for i, h in enumerate(hashes.tolist())}
        aligned = feats[[index[h] for h in wanted]] if wanted else feats[:0]
        return aligned, len(unique_missing)
