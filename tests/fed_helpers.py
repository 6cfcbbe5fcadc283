"""Helpers for coordinator tests that need no Akida model: a numpy clinic speaking the protocol.

The coordinator never runs the backbone, so its tests use a bundle whose model file is a
placeholder and clinics whose "backbone features" are drawn from class-dependent Gaussians.
The clinic side still goes through `protocols.messages` both ways and trains and quantizes
with `qana.head`, exactly like `client.clinic` does, so what the coordinator receives is
shaped like a real update. `Tamper` turns an honest clinic into one that sends a malformed
update, to exercise the rejection path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from protocols import messages as P
from qana.bundle import Bundle, write_bundle
from qana.classes import CLASS_NAMES
from qana.head import (
    Head,
    TrainConfig,
    grow_head,
    head_to_npz,
    init_head,
    predict,
    quantize_head,
    train_head,
)

FEATURES = 24
FEATURE_SCALE = 1 / 40


def make_numpy_bundle(path: Path, seed: int = 0, classes: tuple[str, ...] = CLASS_NAMES) -> Bundle:
    """A bundle whose head is untrained (random init) and whose model file is a placeholder."""
    model = path.parent / f".{path.name}-model.fbz"
    model.write_bytes(b"placeholder model for coordinator tests " + bytes([seed]))
    head = init_head(FEATURES, classes, FEATURE_SCALE, seed=seed)
    manifest = {
        "target": "v2",
        "classes": list(classes),
        "input_shape": [16, 16, 3],
        "feature_dim": FEATURES,
        "note": "test bundle (placeholder model)",
    }
    return write_bundle(path, model, head_to_npz(head), manifest)


def class_means(seed: int = 123) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 40, (len(CLASS_NAMES), FEATURES))


def clinic_data(n: int, seed: int, classes: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pool = np.array(classes if classes is not None else range(len(CLASS_NAMES)))
    y = pool[rng.integers(0, len(pool), n)]
    x = np.clip(np.round(class_means()[y] + rng.normal(0, 25, (n, FEATURES))), 0, 255).astype(np.int16)
    return x, y


Tamper = Callable[[RecordDict], RecordDict]


@dataclass
class NumpyClinic:
    """A protocol-speaking clinic on synthetic features (train 80% / evaluate 20%)."""

    name: str
    bundle: Bundle
    seed: int
    n: int = 120
    has_bundle: bool = False
    tamper: Tamper | None = None
    fail_train: bool = False
    data_classes: tuple[int, ...] | None = None  # label ids (CLASS_NAMES order) in this clinic's data
    new_class: str | None = None  # class this clinic introduces (as client.clinic does) ...
    new_from_round: int = 1  # ... from this round on

    def __post_init__(self) -> None:
        x, y = clinic_data(self.n, self.seed, self.data_classes)
        cut = int(0.8 * self.n)
        self.x_train, self.y_train, self.x_eval, self.y_eval = x[:cut], y[:cut], x[cut:], y[cut:]
        head = self.bundle.load_head()
        self.spec = P.HeadSpec.from_head(head, self.bundle.target)
        self.received: list[Message] = []
        self.evaluated_classes: list[tuple[str, ...]] = []

    def info(self, **kw) -> P.ClinicInfo:
        return P.ClinicInfo(self.name, P.PROTOCOL_VERSION, **kw)

    def __call__(self, msg: Message) -> Message:
        self.received.append(msg)
        kind = msg.metadata.message_type
        if kind == P.MSG_HELLO:
            P.validate_hello_ins(msg.content)
            cached = (self.bundle.bundle_id,) if self.has_bundle else ()
            return Message(P.hello_reply_content(self.info(cached_bundles=cached, device="numpy test clinic")), reply_to=msg)
        if kind == P.MSG_DEPLOY:
            bundle_id, data = P.validate_deploy_ins(msg.content)
            assert bundle_id == self.bundle.bundle_id and data
            self.has_bundle = True
            return Message(P.deploy_reply_content(self.info(bundle_id=bundle_id, device="numpy")), reply_to=msg)
        if kind == P.MSG_TRAIN:
            if self.fail_train:
                raise RuntimeError("clinic crashed during training")
            head, s = P.validate_train_ins(msg.content, self.spec)
            if self.new_class and s.server_round >= self.new_from_round and self.new_class not in head.classes:
                head = grow_head(head, (*head.classes, self.new_class), seed=s.seed)
            cfg = TrainConfig(epochs=s.local_epochs, learning_rate=s.learning_rate, batch_size=s.batch_size,
                              l2=s.l2, proximal_mu=s.proximal_mu, seed=s.seed + s.server_round)
            y = columns(self.y_train, head.classes)
            keep = y >= 0
            trained = train_head(head, self.x_train[keep], y[keep], cfg)
            q = quantize_head(trained, self.spec.target)
            metrics = {P.M_NUM_EXAMPLES: int(keep.sum()), P.M_TRAIN_TOP1: float(np.mean(predict(q, self.x_train[keep]) == y[keep])),
                       P.M_NUM_SYNTHETIC: 0, P.M_DEVICE_AGREEMENT: 1.0}
            content = P.train_reply_content(q, metrics, self.info(bundle_id=s.bundle_id))
            if self.tamper is not None:
                content = self.tamper(content)
            return Message(content, reply_to=msg)
        if kind == P.MSG_EVALUATE:
            head, s = P.validate_evaluate_ins(msg.content, self.spec)
            self.evaluated_classes.append(head.classes)
            q = quantize_head(head, self.spec.target)
            y = columns(self.y_eval, head.classes)
            keep = y >= 0
            pred = predict(q, self.x_eval[keep])
            metrics = {P.M_NUM_EXAMPLES: int(keep.sum()), P.M_TOP1: float(np.mean(pred == y[keep])),
                       P.M_MACRO_F1: 0.0, P.M_BALANCED_ACCURACY: 0.0, P.M_DEVICE_AGREEMENT: 1.0}
            return Message(P.evaluate_reply_content(metrics, self.info(bundle_id=s.bundle_id, head_id=s.head_id)), reply_to=msg)
        raise ValueError(f"unexpected message type {kind}")


def columns(labels: np.ndarray, classes: tuple[str, ...]) -> np.ndarray:
    """Label ids (CLASS_NAMES order) as columns of a head with `classes`; -1 where it lacks the class."""
    lookup = np.array([classes.index(c) if c in classes else -1 for c in CLASS_NAMES])
    return lookup[labels]


def replace_head_array(name: str, value: np.ndarray) -> Tamper:
    """Tamper: swap one array of the update for `value`."""

    def tamper(content: RecordDict) -> RecordDict:
        arrays = {k: v for k, v in content[P.REC_HEAD].items()}
        arrays[name] = Array(value)
        return RecordDict({P.REC_HEAD: ArrayRecord(arrays), P.REC_METRICS: content[P.REC_METRICS], P.REC_CLINIC: content[P.REC_CLINIC]})

    return tamper


def set_clinic_key(key: str, value) -> Tamper:
    def tamper(content: RecordDict) -> RecordDict:
        clinic = ConfigRecord(dict(content[P.REC_CLINIC]))
        clinic[key] = value
        return RecordDict({P.REC_HEAD: content[P.REC_HEAD], P.REC_METRICS: content[P.REC_METRICS], P.REC_CLINIC: clinic})

    return tamper


def add_record(name: str, record) -> Tamper:
    def tamper(content: RecordDict) -> RecordDict:
        out = RecordDict({k: v for k, v in content.items()})
        out[name] = record
        return out

    return tamper


def set_metric(key: str, value) -> Tamper:
    def tamper(content: RecordDict) -> RecordDict:
        metrics = MetricRecord(dict(content[P.REC_METRICS]))
        metrics[key] = value
        return RecordDict({P.REC_HEAD: content[P.REC_HEAD], P.REC_METRICS: metrics, P.REC_CLINIC: content[P.REC_CLINIC]})

    return tamper


def head_accuracy(head: Head, seed: int = 999, n: int = 400) -> float:
    x, y = clinic_data(n, seed)
    return float(np.mean(predict(head, x) == y))
