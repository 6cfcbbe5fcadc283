"""What changed between two versions: metadata, metrics, participants, weights.

A reviewer asking "what did round 7 do to the model?" wants numbers, not two
hashes: how each aggregate metric moved, which clinics joined or left, and how
far each head array moved (L2 norm of the difference, absolute and relative to
the earlier array).  Head artefacts are .npz archives and are compared array by
array; when a class was added the arrays grow, and the overlapping block is
compared.  Backbone bundles are opaque bytes and are compared by hash only.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.audit.canonical import canonical_json
from server.audit.records import VersionInfo, format_time

_COMPARED_FIELDS = (
    "kind",
    "created_at",
    "sha256",
    "size",
    "parent",
    "backbone",
    "run_id",
    "round",
    "strategy",
    "strategy_config",
    "note",
)


@dataclass(frozen=True)
class FieldChange:
    name: str
    before: Any
    after: Any


@dataclass(frozen=True)
class MetricChange:
    name: str
    before: Any
    after: Any
    delta: float | None


@dataclass(frozen=True)
class ParticipantChange:
    """A clinic's example count in each version (None: it did not take part)."""

    clinic_id: str
    examples_before: int | None
    examples_after: int | None


@dataclass(frozen=True)
class ArrayChange:
    """How one head array moved.  ``compared`` says over what: all of it, the overlap, or nothing."""

    name: str
    shape_before: tuple[int, ...] | None
    shape_after: tuple[int, ...] | None
    compared: str
    l2_difference: float | None
    relative_difference: float | None


@dataclass(frozen=True)
class VersionDiff:
    before: VersionInfo
    after: VersionInfo
    fields: tuple[FieldChange, ...]
    metrics: tuple[MetricChange, ...]
    participants: tuple[ParticipantChange, ...]
    arrays: tuple[ArrayChange, ...] | None
    arrays_note: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "before": self.before.version,
            "after": self.after.version,
            "fields": [{"name": f.name, "before": f.before, "after": f.after} for f in self.fields],
            "metrics": [{"name": m.name, "before": m.before, "after": m.after, "delta": m.delta} for m in self.metrics],
            "participants": [
                {"clinic_id": p.clinic_id, "examples_before": p.examples_before, "examples_after": p.examples_after}
                for p in self.participants
            ],
            "arrays": None
            if self.arrays is None
            else [
                {
                    "name": a.name,
                    "shape_before": list(a.shape_before) if a.shape_before is not None else None,
                    "shape_after": list(a.shape_after) if a.shape_after is not None else None,
                    "compared": a.compared,
                    "l2_difference": a.l2_difference,
                    "relative_difference": a.relative_difference,
                }
                for a in self.arrays
            ],
            "arrays_note": self.arrays_note,
        }


def _field_value(version: VersionInfo, name: str) -> Any:
    value = getattr(version, name)
    if name == "created_at":
        return format_time(value)
    if name == "strategy_config":
        return canonical_json(value)
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _metric_changes(before: VersionInfo, after: VersionInfo) -> tuple[MetricChange, ...]:
    old_metrics, new_metrics = before.metrics, after.metrics
    names = sorted(set(old_metrics) | set(new_metrics))
    changes = []
    for name in names:
        old = old_metrics.get(name)
        new = new_metrics.get(name)
        delta = float(new) - float(old) if _is_number(old) and _is_number(new) else None
        changes.append(MetricChange(name, old, new, delta))
    return tuple(changes)


def _participant_changes(before: VersionInfo, after: VersionInfo) -> tuple[ParticipantChange, ...]:
    old = {p.clinic_id: p.num_examples for p in before.participants}
    new = {p.clinic_id: p.num_examples for p in after.participants}
    return tuple(ParticipantChange(clinic, old.get(clinic), new.get(clinic)) for clinic in sorted(set(old) | set(new)))


def load_arrays(data: bytes) -> dict[str, np.ndarray] | None:
    """The arrays of an .npz artefact, or None if the bytes are not one (e.g. a backbone bundle)."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            return {name: np.asarray(archive[name]) for name in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError):
        return None


def _array_change(name: str, old: np.ndarray | None, new: np.ndarray | None) -> ArrayChange:
    if old is None or new is None:
        return ArrayChange(
            name,
            None if old is None else tuple(old.shape),
            None if new is None else tuple(new.shape),
            "added" if old is None else "removed",
            None,
            None,
        )
    shape_before, shape_after = tuple(old.shape), tuple(new.shape)
    numeric = np.issubdtype(old.dtype, np.number) and np.issubdtype(new.dtype, np.number)
    if not numeric or old.ndim != new.ndim:
        return ArrayChange(name, shape_before, shape_after, "incomparable", None, None)
    overlap = tuple(slice(0, min(a, b)) for a, b in zip(shape_before, shape_after, strict=True))
    left = old[overlap].astype(np.float64)
    right = new[overlap].astype(np.float64)
    difference = float(np.linalg.norm((right - left).ravel()))
    reference = float(np.linalg.norm(left.ravel()))
    relative = difference / reference if reference > 0 else None
    compared = "all" if shape_before == shape_after else "overlap"
    return ArrayChange(name, shape_before, shape_after, compared, difference, relative)


def diff_versions(before: VersionInfo, after: VersionInfo, bytes_before: bytes, bytes_after: bytes) -> VersionDiff:
    """Compare two versions and their artefacts."""
    fields = tuple(
        FieldChange(name, _field_value(before, name), _field_value(after, name))
        for name in _COMPARED_FIELDS
        if _field_value(before, name) != _field_value(after, name)
    )
    arrays: tuple[ArrayChange, ...] | None = None
    note: str | None = None
    if before.sha256 == after.sha256:
        note = "identical artefacts (same sha256)"
    else:
        old_arrays = load_arrays(bytes_before)
        new_arrays = load_arrays(bytes_after)
        if old_arrays is None or new_arrays is None:
            note = "artefacts are not .npz arrays; they differ (different sha256) but are not compared further"
        else:
            names = sorted(set(old_arrays) | set(new_arrays))
            arrays = tuple(_array_change(name, old_arrays.get(name), new_arrays.get(name)) for name in names)
    return VersionDiff(
        before=before,
        after=after,
        fields=fields,
        metrics=_metric_changes(before, after),
        participants=_participant_changes(before, after),
        arrays=arrays,
        arrays_note=note,
    )
