"""What a clinic does in a federation, independent of how messages reach it.

`ClinicConfig.from_node_config` reads the SuperNode's node config (`--node-config` of
`flower-supernode`, or the simulation engine's per-node config), so the same `Clinic` runs
under `qana-client start`, under Flower's simulation engine and in tests. Nothing here is a
CLI global, and nothing here imports TensorFlow.

Per backbone version the clinic runs the backbone once over its images (cached features);
per round it trains only the head (SMOTE on PCA-whitened features, `client.learning`),
quantizes it for the Akida target, writes it into the Akida model and checks that the
chip's predictions agree with the reference quantized head before anything is sent.
Evaluation uses a held-out, lesion-grouped part of the clinic's own data.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from client.bundle_cache import BundleCache
from client.features import FeatureCache
from client.learning import train_local_head
from protocols.messages import (
    M_BALANCED_ACCURACY,
    M_DEVICE_AGREEMENT,
    M_MACRO_F1,
    M_NUM_EXAMPLES,
    M_NUM_SYNTHETIC,
    M_TOP1,
    M_TRAIN_TOP1,
    PROTOCOL_VERSION,
    ClinicInfo,
    EvaluateSettings,
    HeadSpec,
    TrainSettings,
)
from qana.bundle import Bundle
from qana.data import Dataset, load_dataset
from qana.head import Head, QuantizedHead, TrainConfig, head_to_npz, predict, quantize_head
from qana.metrics import classification_metrics
from qana.splits import grouped_split

DEFAULT_CACHE_ROOT = Path(os.environ.get("QANA_CACHE_DIR", Path.home() / ".cache" / "qana")) / "clinics"
NODE_CONFIG_KEYS = ("data-dir", "clinic-id", "device", "cache-dir", "eval-fraction", "split-seed")


class ClinicError(RuntimeError):
    """The clinic cannot do what was asked; the message says why (it becomes the error reply)."""


@dataclass(frozen=True)
class ClinicConfig:
    """A clinic's local settings (never sent anywhere except `clinic_id`)."""

    data_dir: Path
    clinic_id: str
    device: str = "auto"
    cache_dir: Path | None = None
    eval_fraction: float = 0.2
    split_seed: int = 0

    @property
    def cache(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else DEFAULT_CACHE_ROOT / self.clinic_id

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> ClinicConfig:
        """Read and check the node config; ClinicError names the key that is wrong."""
        unknown = sorted(k for k in node_config if k not in NODE_CONFIG_KEYS and not k.startswith("x-"))
        if unknown:
            raise ClinicError(f"unknown node-config key(s) {', '.join(unknown)}; known: {', '.join(NODE_CONFIG_KEYS)}")
        for key in ("data-dir", "clinic-id"):
            if not isinstance(node_config.get(key), str) or not str(node_config[key]).strip():
                raise ClinicError(f"node-config lacks {key} (e.g. --node-config 'data-dir=\"/data\" clinic-id=\"clinic-a\"')")
        device = str(node_config.get("device", "auto"))
        if device not in ("auto", "software"):
            raise ClinicError(f"node-config device={device!r}: use 'auto' or 'software'")
        fraction = node_config.get("eval-fraction", 0.2)
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < float(fraction) < 1.0:
            raise ClinicError(f"node-config eval-fraction={fraction!r}: must be a number between 0 and 1")
        seed = node_config.get("split-seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ClinicError(f"node-config split-seed={seed!r}: must be an integer")
        cache = node_config.get("cache-dir")
        return cls(
            data_dir=Path(str(node_config["data-dir"])).expanduser(),
            clinic_id=str(node_config["clinic-id"]),
            device=device,
            cache_dir=Path(str(cache)).expanduser() if cache else None,
            eval_fraction=float(fraction),
            split_seed=int(seed),
        )


@dataclass
class Prepared:
    """One bundle's view of the clinic's data: images, cached features and the split."""

    bundle: Bundle
    spec: HeadSpec
    dataset: Dataset
    features: np.ndarray
    train_idx: np.ndarray
    eval_idx: np.ndarray
    computed: int  # images that went through the backbone just now
    runtime: Any  # qana.runtime.AkidaRuntime


def head_spec(bundle: Bundle) -> HeadSpec:
    """The run's head shape, from the bundle's own head (both sides derive it the same way)."""
    head = bundle.load_head()
    if head.num_features != bundle.feature_dim or head.classes != bundle.classes:
        raise ClinicError(f"bundle {bundle.path}: head does not match the manifest (features/classes)")
    return HeadSpec.from_head(head, bundle.target)


class Clinic:
    """The clinic's side of every QANA-FL message."""

    def __init__(self, config: ClinicConfig) -> None:
        self.config = config
        self.bundles = BundleCache(config.cache)

    # ------------------------------------------------------------------ setup

    def device_description(self) -> str:
        from qana.runtime import choose_device

        return choose_device(self.config.device).description

    def info(self, bundle_id: str | None = None, head_id: str | None = None, with_cache: bool = False) -> ClinicInfo:
        return ClinicInfo(
            clinic_id=self.config.clinic_id,
            protocol_version=PROTOCOL_VERSION,
            bundle_id=bundle_id,
            cached_bundles=tuple(self.bundles.ids()) if with_cache else (),
            device=self.device_description() if with_cache else "",
            head_id=head_id,
        )

    def hello(self) -> ClinicInfo:
        """Which bundles this clinic already has (so the backbone is only sent when missing)."""
        return self.info(with_cache=True)

    def deploy(self, bundle_id: str, packed: bytes) -> ClinicInfo:
        """Install a received bundle and run its backbone over the local images once."""
        self.bundles.install(bundle_id, packed)
        self.prepare(bundle_id)
        return replace(self.info(bundle_id), device=self.device_description())

    def prepare(self, bundle_id: str) -> Prepared:
        """Load the bundle, the data and the (cached) features; split train/held-out by lesion."""
        from qana.runtime import AkidaRuntime

        bundle = self.bundles.get(bundle_id)
        spec = head_spec(bundle)
        h, w, c = bundle.input_shape
        if h != w or c != 3:
            raise ClinicError(f"bundle input {bundle.input_shape} is not a square RGB image")
        dataset = load_dataset(self.config.data_dir, size=h, cache_dir=self.config.cache, class_names=bundle.classes)
        runtime = AkidaRuntime(bundle, self.config.device)
        features, computed = FeatureCache(self.config.cache, bundle).features(dataset, runtime)
        train_idx, eval_idx = grouped_split(
            dataset.labels,
            dataset.lesion_ids,
            (1.0 - self.config.eval_fraction, self.config.eval_fraction),
            seed=self.config.split_seed,
        )
        return Prepared(bundle, spec, dataset, features, train_idx, eval_idx, computed, runtime)

    # ------------------------------------------------------------------ rounds

    def _on_device(self, prep: Prepared, qhead: QuantizedHead) -> tuple[np.ndarray, float]:
        """Write the head into the Akida model; chip predictions on held-out images and agreement.

        The chip must decide exactly as the reference quantized head does on the same
        features; if it does not, nothing is sent (a clinic never reports numbers its device
        would not reproduce).
        """
        prep.runtime.write_head(qhead)
        idx = prep.eval_idx if len(prep.eval_idx) else prep.train_idx
        chip = np.argmax(prep.runtime.logits(prep.dataset.images[idx]), axis=1)
        reference = predict(qhead, prep.features[idx])
        agreement = float(np.mean(chip == reference)) if len(idx) else 1.0
        if agreement < 1.0:
            raise ClinicError(
                f"on-device predictions disagree with the reference quantized head on "
                f"{int(np.sum(chip != reference))} of {len(idx)} images; not sending this head"
            )
        return chip, agreement

    def train(self, head: Head, settings: TrainSettings) -> tuple[QuantizedHead, dict[str, int | float]]:
        """One round of local head training; returns the quantized head and aggregate metrics."""
        prep = self.prepare(settings.bundle_id)
        if len(prep.train_idx) == 0:
            raise ClinicError("no local training images after the held-out split")
        if head.num_features != prep.spec.num_features or head.classes != prep.spec.classes:
            raise ClinicError("global head does not fit this bundle")
        config = TrainConfig(
            epochs=settings.local_epochs,
            batch_size=settings.batch_size,
            learning_rate=settings.learning_rate,
            l2=settings.l2,
            proximal_mu=settings.proximal_mu,
            seed=settings.seed + settings.server_round,
        )
        x, y = prep.features[prep.train_idx], prep.dataset.labels[prep.train_idx]
        trained, report = train_local_head(head, x, y, config, smote=settings.smote)
        qhead = quantize_head(trained, prep.bundle.target)
        _, agreement = self._on_device(prep, qhead)
        metrics: dict[str, int | float] = {
            M_NUM_EXAMPLES: int(report.num_examples),
            M_TRAIN_TOP1: float(np.mean(predict(qhead, x) == y)),
            M_NUM_SYNTHETIC: int(report.num_synthetic),
            M_DEVICE_AGREEMENT: agreement,
        }
        return qhead, metrics

    def evaluate(self, head: Head, settings: EvaluateSettings) -> dict[str, int | float]:
        """Put the global head on the chip, evaluate it on held-out images, keep it deployed."""
        prep = self.prepare(settings.bundle_id)
        if len(prep.eval_idx) == 0:
            raise ClinicError("no held-out images to evaluate on (the clinic has too few lesions)")
        qhead = quantize_head(head, prep.bundle.target)
        chip, agreement = self._on_device(prep, qhead)
        result = classification_metrics(prep.dataset.labels[prep.eval_idx], chip, prep.bundle.classes)
        self._save_deployed(prep, head, settings)
        return {
            M_NUM_EXAMPLES: int(result["n"]),
            M_TOP1: float(result["top1"]),
            M_MACRO_F1: float(result["macro_f1"]),
            M_BALANCED_ACCURACY: float(result["balanced_accuracy"]),
            M_DEVICE_AGREEMENT: agreement,
        }

    def _save_deployed(self, prep: Prepared, head: Head, settings: EvaluateSettings) -> None:
        """Keep the Akida model with the current global head for the clinic's own inference."""
        out = self.config.cache / "deployed" / prep.bundle.bundle_id
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".model.{os.getpid()}.fbz"
        prep.runtime.model.save(str(tmp))
        os.replace(tmp, out / "model.fbz")
        (out / "head.npz").write_bytes(head_to_npz(head))
        info = {
            "bundle_id": prep.bundle.bundle_id,
            "head_id": settings.head_id,
            "server_round": settings.server_round,
            "device": prep.runtime.device_description,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (out / "deployed.json").write_text(json.dumps(info, indent=2) + "\n")
