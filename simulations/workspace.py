"""Turning one dataset into N clinics on disk, as a deployed clinic would hold its data.

Each simulated clinic gets what `qana-client start` gets in a real deployment: a HAM10000-style
folder (its own `HAM10000_metadata.csv` and `images/`, symlinks to the source JPEGs) and its
own cache directory. The ClientApp reads them exactly as it reads a real clinic's folder.

The backbone runs once per image per backbone version, here, before the federation starts:
features go into a feature cache shared by all experiments on this machine (keyed by the
sha256 of each JPEG and the bundle id, `client.features.FeatureCache`), and each clinic's own
feature cache is filled from it. When the coordinator deploys the bundle, every clinic finds
its features cached and never runs the backbone; neither do rounds 2..R, nor the baselines,
nor the next experiment on the same images. Decoded images are shared the same way (the
clinics' image-cache directory is a link to one content-addressed cache).
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import qana
from client.clinic import HELD_OUT, SPLIT_FILE, TRAIN, write_split
from client.features import FeatureCache
from qana.bundle import Bundle, BundleError, default_bundle_path, load_bundle
from qana.data import METADATA_FILE, Dataset, ImageCache, describe_skipped, find_images, find_metadata, load_dataset, metadata_rows
from simulations.config import SimConfig
from simulations.partition import Partition

EMBEDDED_DATA = Path(qana.__file__).resolve().parent / "samples" / "ham10000-sample"
FEATURE_BATCH = 256


class SourceError(RuntimeError):
    """The data or bundle to simulate with is missing or unusable; the message says what to do."""


@dataclass
class Source:
    """The dataset all clinics are cut from, the bundle they run, and what to tell the user about it."""

    data_dir: Path
    embedded: bool
    dataset: Dataset
    bundle: Bundle
    description: str


def resolve_bundle(cfg: SimConfig) -> Bundle:
    """The bundle named in the config, or the shipped v2 (akida-edge: v1) bundle; SourceError if it is missing, altered or unfit."""
    edge = cfg.learning == "akida-edge"
    path = (Path(cfg.bundle).expanduser() if cfg.bundle else default_bundle_path("v1" if edge else "v2")).resolve()
    if not (path / "bundle.json").is_file():
        if cfg.bundle:
            raise SourceError(f"no model bundle at {path} (expected bundle.json, model.fbz, head.npz)")
        raise SourceError(
            f"the shipped {'v1' if edge else 'v2'} bundle is not installed ({path} is missing); pass --bundle DIR "
            "(e.g. tests/fixtures/bundles/tiny-v2 for a smoke test)"
        )
    from qana.runtime import load_akida_model

    try:
        bundle = load_bundle(path)
        load_akida_model(bundle)  # now, not in a Ray worker after the run has started
    except BundleError as exc:
        raise SourceError(str(exc)) from None
    if edge and bundle.target != "v1":
        raise SourceError(f"--learning akida-edge needs a v1 bundle (Akida 1.0 learns on-chip); {path} targets {bundle.target!r}")
    return bundle


def load_source(cfg: SimConfig, cache_root: Path, progress: bool = False) -> Source:
    """Load the dataset at the bundle's input size (decoded images cached under cache_root)."""
    from qana.data import DataError

    bundle = resolve_bundle(cfg)
    embedded = cfg.data is None
    data_dir = EMBEDDED_DATA if embedded else Path(cfg.data).expanduser().resolve()  # type: ignore[arg-type]
    if embedded and not (data_dir / METADATA_FILE).is_file():
        raise SourceError(
            f"the embedded HAM10000 sample is not installed ({data_dir} is missing); pass --data DIR "
            "with a HAM10000-style folder (HAM10000_metadata.csv and ISIC_*.jpg)"
        )
    size = bundle.input_shape[0]
    try:
        dataset = load_dataset(data_dir, size=size, cache_dir=cache_root, class_names=bundle.classes, progress=progress)
    except DataError as exc:
        raise SourceError(str(exc)) from None
    n_lesions = len(np.unique(dataset.lesion_ids))
    centres = sorted(set(dataset.centres.tolist()))
    what = "the embedded sample of real HAM10000 images" if embedded else "HAM10000-style folder"
    description = (
        f"{what} at {data_dir}: {len(dataset)} images of {n_lesions} lesions from {len(centres)} source "
        f"centre(s) ({', '.join(centres)}), decoded at {size}x{size}"
        + (f"; {describe_skipped(dataset.skipped, limit=3)}" if dataset.skipped else "")
    )
    return Source(data_dir, embedded, dataset, bundle, description)


class _ProgressExtractor:
    """The Akida backbone in batches, advancing a progress callback (features for many images take a while)."""

    def __init__(self, runtime: object, advance: Callable[[int], None] | None) -> None:
        self.runtime = runtime
        self.advance = advance

    def features(self, images: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(images), FEATURE_BATCH):
            batch = images[start : start + FEATURE_BATCH]
            out.append(self.runtime.features(batch))  # type: ignore[attr-defined]
            if self.advance is not None:
                self.advance(len(batch))
        return np.concatenate(out) if out else np.zeros((0, 0), np.int32)


class _KnownFeatures:
    """An 'extractor' that returns already computed features, looked up by the image's pixels."""

    def __init__(self, images: np.ndarray, features: np.ndarray) -> None:
        self.by_pixels = {self.key(img): row for img, row in zip(images, features)}

    @staticmethod
    def key(image: np.ndarray) -> str:
        return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()

    def features(self, images: np.ndarray) -> np.ndarray:
        return np.stack([self.by_pixels[self.key(img)] for img in images])


def source_features(
    source: Source, cache_root: Path, device: str, advance: Callable[[int], None] | None = None
) -> tuple[np.ndarray, int]:
    """Backbone features of every source image (cached across experiments); and how many were computed now."""
    from qana.runtime import AkidaRuntime

    cache = FeatureCache(cache_root / "sim", source.bundle)

    class _Lazy:
        """Start the Akida runtime only if some image is not cached yet."""

        runtime: _ProgressExtractor | None = None

        def features(self, images: np.ndarray) -> np.ndarray:
            if self.runtime is None:
                self.runtime = _ProgressExtractor(AkidaRuntime(source.bundle, device), advance)
            return self.runtime.features(images)

    return cache.features(source.dataset, _Lazy())


@dataclass
class ClinicSite:
    clinic_id: str
    data_dir: Path
    cache_dir: Path

    def node_config(self, cfg: SimConfig, new_class_from: int | None = None) -> dict[str, str | int | float]:
        """What `flower-supernode --node-config` would carry for this clinic in a deployment.

        `new_class_from`: this clinic introduces `cfg.new_class` from that round
        (`qana-client start --new-class`; the new-class scenario).
        """
        config: dict[str, str | int | float] = {
            "data-dir": str(self.data_dir),
            "clinic-id": self.clinic_id,
            "device": cfg.device,
            "cache-dir": str(self.cache_dir),
            "eval-fraction": float(cfg.eval_fraction),
            "split-seed": int(cfg.seed),
        }
        if new_class_from is not None:
            config["new-classes"] = cfg.new_class
            config["new-classes-from-round"] = int(new_class_from)
        return config


def build_clinics(
    source: Source, partition: Partition, features: np.ndarray, work: Path, cache_root: Path,
    eval_fraction: float = 0.2, seed: int = 0,
) -> list[ClinicSite]:
    """Write each clinic's folder and cache (features and the partition's local split pre-filled) under `work`."""
    columns, meta = metadata_rows(find_metadata(source.data_dir))
    files = find_images(source.data_dir)
    size = source.bundle.input_shape[0]
    shared_images = ImageCache(cache_root, size).root
    assert shared_images is not None
    shared_images.mkdir(parents=True, exist_ok=True)
    ds = source.dataset
    sites = []
    for part in partition.clinics:
        folder = work / "clinics" / part.clinic_id
        images = folder / "images"
        images.mkdir(parents=True, exist_ok=True)
        with (folder / METADATA_FILE).open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            for row in part.rows:
                image_id = str(ds.image_ids[row])
                writer.writerow(meta[image_id])
                link = images / f"{image_id}.jpg"
                if not link.is_symlink():
                    link.symlink_to(files[image_id].resolve())
        cache = work / "cache" / part.clinic_id
        cache.mkdir(parents=True, exist_ok=True)
        image_link = cache / shared_images.name
        if not image_link.is_symlink():
            image_link.symlink_to(shared_images.resolve(), target_is_directory=True)
        subset = ds.subset(part.rows)
        FeatureCache(cache, source.bundle).features(subset, _KnownFeatures(subset.images, features[part.rows]))
        # The clinic keeps exactly the partition's local split (persistent_split honours a recorded split).
        sides = {str(lesion): TRAIN for lesion in ds.lesion_ids[part.train]}
        sides.update({str(lesion): HELD_OUT for lesion in ds.lesion_ids[part.test]})
        write_split(cache / SPLIT_FILE, sides, eval_fraction, seed)
        sites.append(ClinicSite(part.clinic_id, folder, cache))
    return sites


def feature_cache_file(site: ClinicSite, bundle: Bundle) -> Path:
    """Where a clinic keeps its features (tests check the file is not rewritten during the federation)."""
    return FeatureCache(site.cache_dir, bundle).path


def disk_usage(path: Path) -> int:
    """Bytes under path (not following symlinks)."""
    total = 0
    for root, _dirs, names in os.walk(path):
        for name in names:
            p = Path(root) / name
            if not p.is_symlink():
                total += p.stat().st_size
    return total
