"""What a clinic does in a federation, independent of how messages reach it.

`ClinicConfig.from_node_config` reads the SuperNode's node config (`--node-config` of
`flower-supernode`, or the simulation engine's per-node config), so the same `Clinic` runs
under `qana-client start`, under Flower's simulation engine and in tests. Nothing here is a
CLI global, and nothing here imports TensorFlow.

Per backbone version the clinic runs the backbone once over its images (cached features);
per round it trains only the head (SMOTE on PCA-whitened features, `qana.learning`),
quantizes it for the Akida target, writes it into the Akida model and checks that the
chip's predictions agree with the reference quantized head before anything is sent.
Evaluation uses a held-out, lesion-grouped part of the clinic's own data. Each lesion's side
(training or held-out) is decided once and kept in the clinic's state (`split.json` in its
cache), so a folder that grows only assigns its new lesions and no lesion ever moves between
training and evaluation (that would leak evaluation images into training).

`Clinic.learn` is the on-demand, data-incremental update (`qana-client learn`): new images go
through the backbone, the head is trained from the deployed one on old and new features, and
accuracy on the earlier held-out images is reported before and after (the forgetting measure).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from client.bundle_cache import BundleCache
from client.features import FeatureCache
from qana.learning import train_local_head
from protocols.messages import (
    M_BALANCED_ACCURACY,
    M_DEVICE_AGREEMENT,
    M_MACRO_F1,
    M_NUM_EXAMPLES,
    M_NUM_SYNTHETIC,
    M_TOP1,
    M_TRAIN_TOP1,
    MAX_HEAD_VALUE,
    PROTOCOL_VERSION,
    ClinicInfo,
    EvaluateSettings,
    HeadSpec,
    ProtocolError,
    TrainSettings,
    check_class_list,
)
from qana.atomic import file_in_the_way, recover_directory, replace_directory, write_atomic
from qana.bundle import Bundle, pack_bundle
from qana.data import DEFAULT_CACHE_DIR, Dataset, load_dataset
from qana.head import (
    Head,
    QuantizedHead,
    TrainConfig,
    grow_head,
    head_from_npz,
    head_to_npz,
    predict,
    quantize_head,
)
from qana.metrics import classification_metrics
from qana.splits import grouped_split

log = logging.getLogger(__name__)

DEFAULT_CACHE_ROOT = DEFAULT_CACHE_DIR / "clinics"
NODE_CONFIG_KEYS = (
    "data-dir", "clinic-id", "device", "cache-dir", "eval-fraction", "split-seed", "new-classes", "new-classes-from-round",
)
SPLIT_FILE = "split.json"
SPLIT_FORMAT = 1
DEPLOYED_EDGE_DIR = "deployed-edge"  # <cache>/deployed-edge/<bundle id>/: an akida-edge federation's head (edge_learning.py)
PENDING_DIR = "pending"  # <cache>/pending/<bundle id>.json: images `learn` has seen but not yet learned
PENDING_FORMAT = 1
SEEN_DIR = "seen"  # <cache>/seen/<bundle id>.json: each image's diagnosis as the last call that saw it read it
SEEN_FORMAT = 1
TRAIN, HELD_OUT = "train", "eval"


def _swapped_folders(root: Path) -> list[str]:
    """Names of the folders in `root` written by qana.atomic.replace_directory, after undoing any
    swap a crash interrupted (its folder then exists only as the hidden `.NAME.previous`)."""
    if not root.is_dir():
        return []
    for previous in root.glob(".*.previous"):
        recover_directory(root / previous.name[1 : -len(".previous")])
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and p.is_dir())


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
    # Class-incremental: classes this clinic brings in (its metadata's dx names), added to the
    # global head in its training rounds from `new_classes_from_round` on.
    new_classes: tuple[str, ...] = ()
    new_classes_from_round: int = 1

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
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ClinicError(f"node-config split-seed={seed!r}: must be an integer >= 0")
        cache = node_config.get("cache-dir")
        # The default folder is checked too: a file in the way of ~/.cache/qana/clinics would
        # otherwise surface as "Not a directory" naming a folder deep below it.
        folder = Path(str(cache)).expanduser() if cache else DEFAULT_CACHE_ROOT / str(node_config["clinic-id"])
        if (blocking := file_in_the_way(folder)) is not None:
            raise ClinicError(f"cache folder {folder}: {blocking} is a file, not a folder")
        new_classes: tuple[str, ...] = ()
        text = node_config.get("new-classes", "")
        if not isinstance(text, str):
            raise ClinicError(f"node-config new-classes={text!r}: must be a string such as \"scc\" or \"scc,df\"")
        if text.strip():
            try:
                new_classes = check_class_list([c.strip() for c in text.split(",")], "node-config new-classes")
            except ProtocolError as exc:
                raise ClinicError(str(exc)) from None
        from_round = node_config.get("new-classes-from-round", 1)
        if isinstance(from_round, bool) or not isinstance(from_round, int) or from_round < 1:
            raise ClinicError(f"node-config new-classes-from-round={from_round!r}: must be a round number >= 1")
        return cls(
            data_dir=Path(str(node_config["data-dir"])).expanduser(),
            clinic_id=str(node_config["clinic-id"]),
            device=device,
            cache_dir=Path(str(cache)).expanduser() if cache else None,
            eval_fraction=float(fraction),
            split_seed=int(seed),
            new_classes=new_classes,
            new_classes_from_round=int(from_round),
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
    new_rows: np.ndarray | None = None  # bool per row: not learned before this call (`learn` only)
    relabelled: np.ndarray | None = None  # bool per row: seen before, under another diagnosis
    cache_rebuilt: bool = False  # no seen-images record and a damaged feature cache: new_rows come from the split file


def write_split(path: Path, sides: Mapping[str, str], eval_fraction: float, seed: int) -> None:
    """Record each lesion's side (TRAIN or HELD_OUT) in the clinic's split file.

    `persistent_split` keeps recorded lesions where they are, so a split written here in
    advance is the one the clinic uses (the simulation writes its partition's split this way).
    """
    if set(sides.values()) - {TRAIN, HELD_OUT}:
        raise ClinicError(f"split sides must be {TRAIN!r} or {HELD_OUT!r}")
    state = {"format": SPLIT_FORMAT, "eval_fraction": eval_fraction, "seed": seed, "lesions": dict(sides)}
    write_atomic(path, (json.dumps(state, indent=1, sort_keys=True) + "\n").encode())


def read_split(path: Path) -> dict[str, str]:
    """Lesion id -> side from the clinic's split file ({} when there is none yet)."""
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        if state.get("format") != SPLIT_FORMAT or not isinstance(state.get("lesions"), dict):
            raise ValueError("unexpected content")
        recorded = {str(k): str(v) for k, v in state["lesions"].items()}
        if set(recorded.values()) - {TRAIN, HELD_OUT}:
            raise ValueError("unknown side")
    except (OSError, ValueError, AttributeError) as exc:
        raise ClinicError(
            f"held-out split file {path} is unreadable ({exc}); move it away to re-split "
            "(held-out lesions may then change)"
        ) from None
    return recorded


def persistent_split(
    path: Path, labels: np.ndarray, lesion_ids: np.ndarray, eval_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Lesion-grouped train / held-out rows that stay put as the folder grows.

    Lesions already recorded in `path` keep their side; only lesions seen for the first time
    are split (`grouped_split` over their rows, stratified by diagnosis) and recorded. On the
    first call every lesion is new, so the split is exactly `grouped_split` of all rows (the
    same split `simulations.partition` reproduces). Recomputing the whole split instead would
    let a lesion move from held-out to training when images are added, so the "earlier
    held-out accuracy" would be measured partly on training images.

    Later arrivals are held out per diagnosis so that the class's held-out share of all its
    lesions approaches `eval_fraction` (`_held_out_quota`): splitting each small batch on its
    own would round a class's share of 1 or 2 new lesions down to none, every time.

    Returns (train rows, held-out rows, number of lesions assigned now). A state file that
    cannot be read is an error, never silently replaced: the assignment it holds is the point.
    """
    lesions = np.asarray(lesion_ids).astype(str)
    recorded = read_split(path)
    new_rows = np.flatnonzero([lesion not in recorded for lesion in lesions.tolist()])
    assigned_now = 0
    if len(new_rows):
        fresh: dict[str, str] = {}
        if recorded:
            fresh = _held_out_quota(recorded, np.asarray(labels), lesions, new_rows, eval_fraction, seed)
        else:
            train_part, eval_part = grouped_split(
                np.asarray(labels)[new_rows], lesions[new_rows], (1.0 - eval_fraction, eval_fraction), seed=seed
            )
            for part, side in ((train_part, TRAIN), (eval_part, HELD_OUT)):
                for lesion in lesions[new_rows[part]].tolist():
                    fresh[lesion] = side
        assigned_now = len(fresh)
        recorded.update(fresh)
        write_split(path, recorded, eval_fraction, seed)
    sides = np.array([recorded[lesion] for lesion in lesions.tolist()], dtype=object)
    return np.flatnonzero(sides == TRAIN), np.flatnonzero(sides == HELD_OUT), assigned_now


def _held_out_quota(
    recorded: Mapping[str, str], labels: np.ndarray, lesions: np.ndarray, new_rows: np.ndarray, eval_fraction: float, seed: int
) -> dict[str, str]:
    """Sides for lesions new to a folder whose split exists: per diagnosis, as many new lesions
    are held out as bring the class's held-out count to round(eval_fraction x its lesions),
    chosen at random (seeded by `seed` and how many lesions are recorded, so reruns agree)."""
    label_of: dict[str, int] = {}
    for lesion, label in zip(lesions.tolist(), labels.tolist()):
        label_of.setdefault(lesion, int(label))
    rng = np.random.default_rng([seed, len(recorded)])
    new_lesions = list(dict.fromkeys(lesions[new_rows].tolist()))
    fresh: dict[str, str] = {}
    for label in sorted({label_of[lesion] for lesion in new_lesions}):
        members = sorted(lesion for lesion in new_lesions if label_of[lesion] == label)
        old = [side for lesion, side in recorded.items() if label_of.get(lesion) == label]
        target = int(round(eval_fraction * (len(old) + len(members)))) - old.count(HELD_OUT)
        held = set(rng.choice(members, size=min(max(target, 0), len(members)), replace=False).tolist())
        fresh.update({lesion: HELD_OUT if lesion in held else TRAIN for lesion in members})
    return fresh


@dataclass(frozen=True)
class SplitMetrics:
    """Accuracy of one head on one group of images (None when the group is empty)."""

    n: int
    top1: float | None
    balanced_accuracy: float | None


@dataclass(frozen=True)
class LearnReport:
    """What `Clinic.learn` did, for `qana-client learn` to print (and tests to check)."""

    bundle_id: str
    start: str  # "deployed head" or "bundle head"
    images: int
    new_images: int  # rows not learned before: the data that arrived, and corrected diagnoses
    computed: int  # distinct images the backbone ran over now
    new_lesions: int
    new_lesions_held_out: int
    updated: bool  # False when there was nothing to learn (the deployed files are untouched)
    not_updated_because: str = ""
    relabelled: int = 0  # of the new images: seen before under another diagnosis (a corrected dx)
    cache_rebuilt: bool = False  # no seen-images record and a damaged feature cache (new images judged by lesion)
    skipped: Mapping[str, str] | None = None  # unreadable images, by name (qana.data)
    train_examples: int = 0
    num_synthetic: int = 0
    earlier_before: SplitMetrics | None = None  # earlier held-out images, deployed head
    earlier_after: SplitMetrics | None = None  # earlier held-out images, updated head
    new_kind: str = ""  # "held-out" if new lesions were held out, else "training"
    new_before: SplitMetrics | None = None
    new_after: SplitMetrics | None = None
    device_agreement: float | None = None
    saved_to: Path | None = None
    added_classes: tuple[str, ...] = ()  # classes the head gained (--new-class)
    left_out: Mapping[str, int] | None = None  # training images of classes the head lacks, by class


def _split_metrics(qhead: QuantizedHead, features: np.ndarray, labels: np.ndarray, classes: tuple[str, ...]) -> SplitMetrics:
    """Accuracy of the quantized head's reference predictions (the chip's, by `_on_device`)."""
    known = np.asarray(labels) >= 0  # images of classes neither head has are not scored
    features, labels = features[known], np.asarray(labels)[known]
    if len(labels) == 0:
        return SplitMetrics(0, None, None)
    result = classification_metrics(labels, predict(qhead, features), classes)
    return SplitMetrics(int(result["n"]), float(result["top1"]), float(result["balanced_accuracy"]))


def labels_for(dataset: Dataset, classes: tuple[str, ...]) -> np.ndarray:
    """Each image's label as a column of a head with `classes`; -1 for a class the head lacks.

    The clinic's data may hold diagnoses the global head does not have (yet): a class this
    clinic will introduce, or one the federation has not agreed on. Those images are left
    out of training and evaluation until the head has the class.
    """
    column = {name: j for j, name in enumerate(classes)}
    lookup = np.array([column.get(name, -1) for name in dataset.class_names], dtype=np.int64)
    return lookup[dataset.labels] if len(dataset.labels) else np.zeros(0, np.int64)


def device_agreement(chip: np.ndarray, reference: np.ndarray, what: str, against: str) -> float:
    """Share of images on which the chip decides as the reference does; ClinicError unless all.

    A clinic never reports numbers its device would not reproduce, in either learning mode.
    """
    agreement = float(np.mean(chip == reference)) if len(chip) else 1.0
    if agreement < 1.0:
        raise ClinicError(
            f"{what} disagree with {against} on {int(np.sum(chip != reference))} of {len(chip)} images; not sending this head"
        )
    return agreement


def evaluation_metrics(labels: np.ndarray, chip: np.ndarray, classes: tuple[str, ...], agreement: float) -> dict[str, int | float]:
    """The evaluate reply's aggregate metrics (never per-image results) from the chip's decisions."""
    result = classification_metrics(labels, chip, classes)
    return {
        M_NUM_EXAMPLES: int(result["n"]),
        M_TOP1: float(result["top1"]),
        M_MACRO_F1: float(result["macro_f1"]),
        M_BALANCED_ACCURACY: float(result["balanced_accuracy"]),
        M_DEVICE_AGREEMENT: agreement,
    }


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
            cached_bundles=tuple(self.bundles.usable_ids()) if with_cache else (),
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

    def vocabulary(self, bundle: Bundle, classes: tuple[str, ...] = ()) -> tuple[str, ...]:
        """Diagnoses the clinic's metadata may use: the bundle's, the head's, its own new classes."""
        return tuple(dict.fromkeys((*bundle.classes, *classes, *self.config.new_classes)))

    def prepare(self, bundle_id: str, classes: tuple[str, ...] = (), remember_new: bool = False) -> Prepared:
        """Load the bundle, the data and the (cached) features; split train/held-out by lesion.

        The split is the clinic's persistent one (`persistent_split`): lesions keep their side
        across calls and only lesions new to the folder are assigned. `classes` are the global
        head's (they may include classes the bundle was not trained on). With `remember_new`
        (`learn`), images no call has seen with their present diagnosis (new ones, and corrected
        diagnoses: `_seen`), and those an earlier `learn` saw but did not finish learning, are
        `new_rows`; they are recorded as pending *before* their features are cached, so a
        `learn` that fails or is interrupted leaves them new for the next one. Every round
        (deploy, evaluate, train, the edge rounds) records the images it sees first as pending
        too: seeing them must not make the next `learn` take them for learned. A training round
        takes off the ones it trained on only once it has trained, so one interrupted or failed
        mid-way leaves them new.
        """
        from qana.runtime import shared_runtime

        bundle = self.bundles.get(bundle_id)
        spec = head_spec(bundle)
        h, w, c = bundle.input_shape
        if h != w or c != 3:
            raise ClinicError(f"bundle input {bundle.input_shape} is not a square RGB image")
        dataset = load_dataset(
            self.config.data_dir, size=h, cache_dir=self.config.cache, class_names=self.vocabulary(bundle, classes)
        )
        runtime = shared_runtime(bundle, self.config.device)  # one per process: akida leaks a model per load
        cache = FeatureCache(self.config.cache, bundle)
        hashes = dataset.content_hashes
        diagnoses = [dataset.class_names[i] for i in dataset.labels.tolist()]
        seen = self._seen(bundle_id)
        by_lesion = False
        if seen is None:  # a cache from before the record: the feature cache says what was seen
            unseen = ~cache.cached(hashes)
            relabelled = np.zeros(len(dataset), dtype=bool)
            if remember_new and cache.damaged:
                # ... and it was damaged: the split file names every lesion an earlier call saw,
                # so only other lesions are new.
                known_lesions = sorted(read_split(self.config.cache / SPLIT_FILE))
                unseen = ~np.isin(dataset.lesion_ids.astype(str), known_lesions)
                by_lesion = True
        else:
            unseen = np.array([dx not in seen.get(h, ()) for h, dx in zip(hashes.tolist(), diagnoses)], dtype=bool)
            relabelled = unseen & np.isin(hashes, sorted(seen))
        pending = self._pending(bundle_id) if remember_new or unseen.any() else set()
        new_rows = unseen | np.isin(hashes, sorted(pending)) if remember_new else unseen
        if unseen.any():  # pending first: stopped before it is learned, an image stays new
            self._write_pending(bundle_id, pending | set(hashes[unseen].tolist()))
        current: dict[str, set[str]] = {}
        for h, dx in zip(hashes.tolist(), diagnoses):
            current.setdefault(h, set()).add(dx)
        if seen is None or any(seen.get(h) != dxs for h, dxs in current.items()):
            self._write_seen(bundle_id, {**(seen or {}), **current})
        features, computed = cache.features(dataset, runtime)
        train_idx, eval_idx, _ = persistent_split(
            self.config.cache / SPLIT_FILE,
            dataset.labels,
            dataset.lesion_ids,
            self.config.eval_fraction,
            self.config.split_seed,
        )
        return Prepared(
            bundle, spec, dataset, features, train_idx, eval_idx, computed, runtime,
            new_rows if remember_new else None, relabelled, by_lesion,
        )

    def _pending_path(self, bundle_id: str) -> Path:
        return self.config.cache / PENDING_DIR / f"{bundle_id}.json"

    def _pending(self, bundle_id: str) -> set[str]:
        """Content hashes of images an unfinished `learn` saw (empty when the last one finished)."""
        path = self._pending_path(bundle_id)
        if not path.is_file():
            return set()
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            if state.get("format") != PENDING_FORMAT or not isinstance(state.get("images"), list):
                raise ValueError("unexpected content")
            return {str(h) for h in state["images"]}
        except (OSError, ValueError, AttributeError) as exc:
            raise ClinicError(
                f"pending-images file {path} is unreadable ({exc}); move it away and `learn` will count as new "
                "only images whose features are not cached yet"
            ) from None

    def _write_pending(self, bundle_id: str, hashes: set[str]) -> None:
        state = {"format": PENDING_FORMAT, "bundle_id": bundle_id, "images": sorted(hashes)}
        write_atomic(self._pending_path(bundle_id), (json.dumps(state, indent=1) + "\n").encode())

    def _seen_path(self, bundle_id: str) -> Path:
        return self.config.cache / SEEN_DIR / f"{bundle_id}.json"

    def _seen(self, bundle_id: str) -> dict[str, set[str]] | None:
        """Diagnoses of every image a call has seen, by content hash; None if there is no usable record.

        Kept apart from the feature cache so that deleting or rebuilding that cache does not
        make every image new, and so that an image whose diagnosis was corrected in the
        metadata counts as new (it has not been learned under that label). Without a record
        (a clinic cache from before it existed, or an unreadable one) the feature cache tells
        which images were seen, as it did before.
        """
        path = self._seen_path(bundle_id)
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            images = state["images"] if isinstance(state, dict) and state.get("format") == SEEN_FORMAT else None
            if not isinstance(images, dict) or not all(isinstance(v, list) for v in images.values()):
                raise ValueError("unexpected content")
            return {str(h): {str(dx) for dx in dxs} for h, dxs in images.items()}
        except (OSError, ValueError) as exc:
            log.warning(
                "seen-images record %s is unreadable (%s); it is rebuilt, and until then images with cached "
                "features count as seen", path, exc,
            )
            return None

    def _write_seen(self, bundle_id: str, record: Mapping[str, set[str]]) -> None:
        state = {"format": SEEN_FORMAT, "bundle_id": bundle_id, "images": {h: sorted(record[h]) for h in sorted(record)}}
        write_atomic(self._seen_path(bundle_id), (json.dumps(state, separators=(",", ":")) + "\n").encode())

    # ------------------------------------------------------------------ rounds

    def _on_device(self, prep: Prepared, qhead: QuantizedHead) -> tuple[np.ndarray, float]:
        """Write the head into the Akida model; chip predictions on held-out images and agreement.

        The chip must decide exactly as the reference quantized head does on the same
        features; if it does not, nothing is sent (a clinic never reports numbers its device
        would not reproduce). The head layers run on the device on the backbone features the
        device already produced (cached per image), which gives exactly the full model's
        logits (`AkidaRuntime.head_logits`) without running the backbone again every round.
        """
        prep.runtime.write_head(qhead)
        idx = prep.eval_idx if len(prep.eval_idx) else prep.train_idx
        chip = np.argmax(prep.runtime.head_logits(prep.features[idx]), axis=1)
        return chip, device_agreement(chip, predict(qhead, prep.features[idx]), "on-device predictions", "the reference quantized head")

    def train(self, head: Head, settings: TrainSettings) -> tuple[QuantizedHead, dict[str, int | float]]:
        """One round of local head training; returns the quantized head and aggregate metrics."""
        prep = self.prepare(settings.bundle_id, head.classes)
        if len(prep.train_idx) == 0:
            raise ClinicError("no local training images after the held-out split")
        if head.num_features != prep.spec.num_features:
            raise ClinicError("global head does not fit this bundle")
        head = self._with_new_classes(head, prep, settings)
        config = TrainConfig(
            epochs=settings.local_epochs,
            batch_size=settings.batch_size,
            learning_rate=settings.learning_rate,
            l2=settings.l2,
            proximal_mu=settings.proximal_mu,
            # "keep" (default): classes this clinic has no images of keep what the federation taught them
            absent_classes=settings.absent_classes,
            seed=settings.seed + settings.server_round,
        )
        labels = labels_for(prep.dataset, head.classes)
        train_idx = prep.train_idx[labels[prep.train_idx] >= 0]
        if len(train_idx) == 0:
            raise ClinicError(f"none of the local training images has a class of the global head ({', '.join(head.classes)})")
        x, y = prep.features[train_idx], labels[train_idx]
        trained, report = train_local_head(head, x, y, config, smote=settings.smote)
        qhead = quantize_head(trained, prep.bundle.target)
        _, agreement = self._on_device(prep, qhead)
        pending = self._pending(settings.bundle_id)
        learned = pending & set(prep.dataset.content_hashes[train_idx].tolist())
        if learned:  # the federation has learned these now: the next `learn` need not
            self._write_pending(settings.bundle_id, pending - learned)
        metrics: dict[str, int | float] = {
            M_NUM_EXAMPLES: int(report.num_examples),
            M_TRAIN_TOP1: float(np.mean(predict(qhead, x) == y)),
            M_NUM_SYNTHETIC: int(report.num_synthetic),
            M_DEVICE_AGREEMENT: agreement,
        }
        return qhead, metrics

    def _with_new_classes(self, head: Head, prep: Prepared, settings: TrainSettings | None) -> Head:
        """The head grown by this clinic's new classes, once it is their round (always for `learn`).

        A new class is added only when the clinic has training images of it; its column starts
        as `qana.head.grow_head` starts one (no preference before training).
        """
        if settings is not None and settings.server_round < self.config.new_classes_from_round:
            return head
        names = prep.dataset.class_names
        present = {names[i] for i in np.unique(prep.dataset.labels[prep.train_idx])}
        extra = [c for c in self.config.new_classes if c not in head.classes and c in present]
        if not extra:
            return head
        seed = 0 if settings is None else settings.seed + settings.server_round
        return grow_head(head, (*head.classes, *extra), seed=seed)

    def evaluate(self, head: Head, settings: EvaluateSettings) -> dict[str, int | float]:
        """Put the global head on the chip, evaluate it on held-out images, keep it deployed.

        Held-out images of classes the head does not have (yet) are left out of the metrics.
        """
        prep = self.prepare(settings.bundle_id, head.classes)
        if len(prep.eval_idx) == 0:
            raise ClinicError("no held-out images to evaluate on (the clinic has too few lesions)")
        qhead = quantize_head(head, prep.bundle.target)
        chip, agreement = self._on_device(prep, qhead)
        labels = labels_for(prep.dataset, head.classes)[prep.eval_idx]
        known = labels >= 0
        if not known.any():
            raise ClinicError(f"none of the held-out images has a class of the global head ({', '.join(head.classes)})")
        self._save_deployed(prep, head, settings)
        return evaluation_metrics(labels[known], chip[known], head.classes, agreement)

    def _save_deployed(self, prep: Prepared, head: Head, settings: EvaluateSettings) -> None:
        """Keep the Akida model with the current global head for the clinic's own inference."""
        self._write_deployed(prep, head, {"head_id": settings.head_id, "server_round": settings.server_round})

    def deployed_dir(self, bundle_id: str) -> Path:
        return self.config.cache / "deployed" / bundle_id

    def _write_deployed(self, prep: Prepared, head: Head, fields: Mapping[str, Any]) -> Path:
        """Write model.fbz, head.npz and deployed.json as one set (`qana.atomic.replace_directory`):
        after a crash the folder holds the old model and head or the new ones, never a mix."""
        info = {
            "bundle_id": prep.bundle.bundle_id,
            **fields,
            "device": prep.runtime.device_description,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

        def build(folder: Path) -> None:
            prep.runtime.model.save(str(folder / "model.fbz"))
            (folder / "head.npz").write_bytes(head_to_npz(head))
            (folder / "deployed.json").write_text(json.dumps(info, indent=2) + "\n")

        out = self.deployed_dir(prep.bundle.bundle_id)
        replace_directory(out, build)
        return out

    # ------------------------------------------------------------------ on-demand learning

    def deployed_bundle_ids(self) -> list[str]:
        """Bundles with a deployed head in this clinic's cache (after undoing an interrupted swap)."""
        root = self.config.cache / "deployed"
        return [name for name in _swapped_folders(root) if (root / name / "head.npz").is_file()]

    def refuse_an_edge_only_clinic(self, bundle_id: str | None = None) -> None:
        """`learn` updates a gradient head; a clinic of an akida-edge federation has only an
        on-chip-learned head (deployed-edge/), which its edge rounds update. Training a gradient
        head from the bundle's original one beside it would ignore what the federation learned."""
        root = self.config.cache / DEPLOYED_EDGE_DIR
        edge = _swapped_folders(root)  # a swap cut short leaves the head as .NAME.previous: it still counts
        if bundle_id is not None:
            edge = [b for b in edge if b == bundle_id and not (self.deployed_dir(b) / "head.npz").is_file()]
        if edge:
            raise ClinicError(
                f"this clinic's deployed head for bundle {edge[0][:12]}… is an akida-edge head ({root / edge[0]}), which "
                "the federation's edge rounds update on the chip; `learn` updates gradient heads only, so the new images "
                "are left for the next edge round"
            )

    def adopt_bundle(self, bundle: Bundle) -> str:
        """Put a bundle given on the command line into the clinic's verified bundle cache."""
        if not self.bundles.has(bundle.bundle_id):
            self.bundles.install(bundle.bundle_id, pack_bundle(bundle))
        return bundle.bundle_id

    def current_head(self, bundle_id: str, spec: HeadSpec) -> tuple[Head, str]:
        """The head the clinic runs now: the deployed one, else the bundle's own head."""
        recover_directory(self.deployed_dir(bundle_id))
        path = self.deployed_dir(bundle_id) / "head.npz"
        if not path.is_file():
            return self.bundles.get(bundle_id).load_head(), "bundle head"
        try:
            head = head_from_npz(path.read_bytes())
        except ValueError as exc:
            raise ClinicError(
                f"deployed head {path}: {exc}; move {path.parent} away to start again from the bundle's head"
            ) from None
        if head.num_features != spec.num_features or head.feature_scale != spec.feature_scale:
            raise ClinicError(f"deployed head {path} does not fit bundle {bundle_id[:12]}… (features)")
        return head, "deployed head"

    def learn(self, bundle_id: str, config: TrainConfig, smote: bool = True) -> LearnReport:
        """Data-incremental update of the deployed head from images that arrived since.

        Only images whose features are not cached go through the backbone. The head is trained
        from the current one on the training rows of old *and* new images (a replay of the
        cached old features, plus `config.proximal_mu` pulling towards the current weights),
        so a small new batch cannot simply overwrite what the head knew. The updated head is
        written into the Akida model and must agree with the reference on the chip before the
        deployed files are replaced (as one set); anything failing before that leaves them as
        they were, and the images stay new for the next `learn` (`prepare(remember_new=True)`).
        Accuracy is reported on the earlier held-out images before and after (forgetting), and
        on the new images.
        """
        self.refuse_an_edge_only_clinic(bundle_id)
        head, start = self.current_head(bundle_id, head_spec(self.bundles.get(bundle_id)))
        prep = self.prepare(bundle_id, head.classes, remember_new=True)
        assert prep.new_rows is not None
        present = {prep.dataset.class_names[i] for i in np.unique(prep.dataset.labels)}
        for name in self.config.new_classes:
            if name not in present and name not in head.classes:
                raise ClinicError(f"new class {name!r}: no image in {self.config.data_dir} has that diagnosis (dx)")
        new_rows = prep.new_rows
        is_eval = np.zeros(len(prep.dataset), dtype=bool)
        is_eval[prep.eval_idx] = True
        # A new lesion is one with no image learned before, whichever call (a round, or a `learn`
        # stopped half-way) first assigned it a side; a corrected diagnosis does not make one.
        assert prep.relabelled is not None
        lesions = prep.dataset.lesion_ids.astype(str)
        arrived = new_rows & ~prep.relabelled
        new_lesion_ids = set(lesions[arrived].tolist()) - set(lesions[~arrived].tolist())
        held_lesions = set(lesions[prep.eval_idx].tolist())
        report = LearnReport(
            bundle_id=bundle_id,
            start=start,
            images=len(prep.dataset),
            new_images=int(new_rows.sum()),
            relabelled=int(prep.relabelled.sum()),
            computed=prep.computed,
            new_lesions=len(new_lesion_ids),
            new_lesions_held_out=len(new_lesion_ids & held_lesions),
            updated=False,
            cache_rebuilt=prep.cache_rebuilt,
            skipped=dict(prep.dataset.skipped),
        )
        grown = self._with_new_classes(head, prep, None)
        adds_class = grown.num_classes > head.num_classes  # a requested new class is itself news
        if not new_rows.any() and not adds_class:
            return replace(report, not_updated_because="no image is new, and none has a corrected diagnosis")
        if not (new_rows & ~is_eval).any() and not adds_class:
            # Only held-out images arrived: training again on the same images would replace the
            # deployed head for nothing. They are cached and stay held out; nothing is pending.
            self._pending_path(bundle_id).unlink(missing_ok=True)
            return replace(report, not_updated_because="every new image belongs to a held-out lesion, so there is nothing new to train on")
        if len(prep.train_idx) == 0:
            raise ClinicError("no local training images after the held-out split")
        labels = labels_for(prep.dataset, grown.classes)
        train_idx = prep.train_idx[labels[prep.train_idx] >= 0]
        unknown = prep.train_idx[labels[prep.train_idx] < 0]
        left_out = Counter(prep.dataset.class_names[i] for i in prep.dataset.labels[unknown].tolist())
        x, y = prep.features[train_idx], labels[train_idx]
        # classes without local training images keep the deployed head's columns (no forgetting)
        try:
            trained, local = train_local_head(grown, x, y, replace(config, absent_classes="keep"), smote=smote)
        except ValueError as exc:  # e.g. weights that became NaN or Inf at a too large step size
            raise ClinicError(
                f"the head update failed ({exc}) at learning rate {config.learning_rate:g} and proximal mu "
                f"{config.proximal_mu:g}; try a smaller --learning-rate (or --proximal-mu). The deployed head is "
                "unchanged and the new images stay new."
            ) from None
        # In the units the protocol bounds a clinic's update by (protocols.messages.dequantized_record):
        # weights per scaled feature, i.e. divided by feature_scale.
        scaled = np.abs(trained.weights / trained.feature_scale).max(initial=0.0)
        largest = float(max(scaled, np.abs(trained.bias).max(initial=0.0)))
        if largest > MAX_HEAD_VALUE:  # finite, but far beyond any head learned at a sane step size
            raise ClinicError(
                f"the head update diverged (a weight reached {largest:.3g}, over {MAX_HEAD_VALUE:g}) at learning rate "
                f"{config.learning_rate:g} and proximal mu {config.proximal_mu:g}; try a smaller --learning-rate (or "
                "--proximal-mu). The deployed head is unchanged and the new images stay new."
            )
        before = quantize_head(head, prep.bundle.target)
        after = quantize_head(trained, prep.bundle.target)
        _, agreement = self._on_device(prep, after)

        classes = grown.classes
        feats = prep.features  # labels are columns of the grown head: the old head cannot name a new class
        earlier = np.flatnonzero(is_eval & ~new_rows)
        new_eval = np.flatnonzero(is_eval & new_rows)
        new_kind = "held-out" if len(new_eval) else "training"
        new_idx = new_eval if len(new_eval) else np.flatnonzero(new_rows)
        saved = self._write_deployed(
            prep,
            trained,
            {
                "head_id": None,
                "server_round": None,
                "source": "qana-client learn",
                "started_from": start,
                "new_images": int(new_rows.sum()),
                "train_examples": int(local.num_examples),
            },
        )
        self._pending_path(bundle_id).unlink(missing_ok=True)  # learned: no longer new
        return replace(
            report,
            updated=True,
            train_examples=local.num_examples,
            num_synthetic=local.num_synthetic,
            earlier_before=_split_metrics(before, feats[earlier], labels[earlier], classes),
            earlier_after=_split_metrics(after, feats[earlier], labels[earlier], classes),
            new_kind=new_kind,
            new_before=_split_metrics(before, feats[new_idx], labels[new_idx], classes),
            new_after=_split_metrics(after, feats[new_idx], labels[new_idx], classes),
            device_agreement=agreement,
            saved_to=saved,
            added_classes=tuple(grown.classes[head.num_classes :]),
            left_out=dict(left_out),
        )
