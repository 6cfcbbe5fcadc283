"""Who gets which lesions: the four ways `qana-sim` splits one dataset into clinics.

Every split assigns whole lesions (HAM10000 has up to six images of one lesion; a lesion on
two clinics, or in one clinic's training and test parts, would overstate accuracy). Each
clinic then keeps a local test part chosen exactly as a deployed clinic chooses it
(`client.clinic.Clinic.prepare`: `qana.splits.grouped_split` of its own rows with
`eval-fraction` and `split-seed`), so the simulated clinic evaluates on the same images the
baselines here are scored on (tests/test_simulation.py checks the two agree).

The splits follow Flower Datasets' partitioners, applied to a table with one row per lesion:

- ``centre``: `NaturalIdPartitioner` on the HAM10000 ``dataset`` column (the source centre:
  vidir_molemax, vidir_modern, rosendahl, vienna_dias): one clinic per centre.
- ``dirichlet``: `DirichletPartitioner` by diagnosis: for each class, lesions are dealt out in
  proportions drawn from Dir(alpha, ..., alpha).
- ``iid``: `IidPartitioner`: shuffled lesions cut into equal contiguous shards.
- ``pathological``: `PathologicalPartitioner` (``first-deterministic``): clinic i gets class
  i mod C plus k-1 further random classes; each class's lesions are shared equally among the
  clinics that have it.

`flwr-datasets` itself is not used: it partitions Hugging Face `datasets.Dataset` objects and
installing it would add `datasets` 4.x, `pyarrow`, `pandas` 3 and a dozen more packages to the
pinned stack for four short numpy routines. The algorithms are reproduced here on numpy arrays.

A random split can leave a clinic with too little data for a local training *and* test part
(with 100 Dirichlet clinics some draw almost nothing). Flower's partitioners redraw until a
minimum size holds; that rarely succeeds for 100 clinics. Instead, such a clinic receives
lesions of its own most frequent class (pathological: of one of its own classes) from the
clinic richest in that class, one at a time, until its local split has both parts. This is
the smallest change that makes every clinic usable; the number of moved lesions is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qana.splits import grouped_split

SPLITS = ("centre", "dirichlet", "iid", "pathological")
UNKNOWN_CENTRE = "unknown"  # what qana.data puts in `centres` when the CSV has no `dataset` value


class PartitionError(ValueError):
    """The requested split cannot be made from this data; the message says why and what to change."""


@dataclass(frozen=True)
class ClinicPart:
    """One simulated clinic: row indices into the source dataset (sorted)."""

    clinic_id: str
    rows: np.ndarray  # all rows of the clinic
    train: np.ndarray  # rows of its local training part
    test: np.ndarray  # rows of its local test part


@dataclass(frozen=True)
class Partition:
    split: str
    clinics: tuple[ClinicPart, ...]
    moved_lesions: int = 0  # lesions moved to make every clinic usable (dirichlet/pathological)
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def clinic_ids(self) -> list[str]:
        return [c.clinic_id for c in self.clinics]


def local_split(labels: np.ndarray, lesion_ids: np.ndarray, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A clinic's own train/test split of its rows, exactly as `client.clinic.Clinic.prepare` makes it."""
    train, test = grouped_split(labels, lesion_ids, (1.0 - eval_fraction, eval_fraction), seed=seed)
    return train, test


@dataclass
class _Lesions:
    """One row per lesion: its label and centre, and which dataset rows show it."""

    ids: np.ndarray  # sorted unique lesion ids
    label: np.ndarray
    centre: np.ndarray
    row_lesion: np.ndarray  # for every dataset row, the index of its lesion

    @classmethod
    def of(cls, labels: np.ndarray, lesion_ids: np.ndarray, centres: np.ndarray) -> _Lesions:
        ids, first, inverse = np.unique(np.asarray(lesion_ids), return_index=True, return_inverse=True)
        return cls(ids, np.asarray(labels)[first], np.asarray(centres)[first], inverse)


def _dirichlet(lesions: _Lesions, n: int, alpha: float, rng: np.random.Generator) -> list[list[int]]:
    """DirichletPartitioner on lesions: per class, proportions ~ Dir(alpha) cut the shuffled lesions."""
    parts: list[list[int]] = [[] for _ in range(n)]
    for k in np.unique(lesions.label):
        members = np.flatnonzero(lesions.label == k)
        members = members[rng.permutation(len(members))]
        proportions = rng.dirichlet(np.full(n, alpha))
        cuts = (np.cumsum(proportions) * len(members)).astype(int)[:-1]
        for clinic, chunk in enumerate(np.split(members, cuts)):
            parts[clinic].extend(chunk.tolist())
    return parts


def _iid(lesions: _Lesions, n: int, rng: np.random.Generator) -> list[list[int]]:
    """IidPartitioner on lesions: shuffle, then equal contiguous shards."""
    order = rng.permutation(len(lesions.ids))
    return [chunk.tolist() for chunk in np.array_split(order, n)]


def _pathological(lesions: _Lesions, n: int, k: int, rng: np.random.Generator) -> tuple[list[list[int]], list[set[int]], list[str]]:
    """PathologicalPartitioner ('first-deterministic') on lesions: k classes per clinic."""
    classes = sorted(int(c) for c in np.unique(lesions.label))
    if not 1 <= k <= len(classes):
        raise PartitionError(f"classes-per-clinic={k}: the data has {len(classes)} classes; choose 1..{len(classes)}")
    chosen: list[set[int]] = []
    for clinic in range(n):
        mine = [classes[clinic % len(classes)]]
        while len(mine) < k:
            extra = int(rng.choice(classes))
            if extra not in mine:
                mine.append(extra)
        chosen.append(set(mine))
    parts: list[list[int]] = [[] for _ in range(n)]
    notes = []
    for c in classes:
        holders = [i for i in range(n) if c in chosen[i]]
        members = np.flatnonzero(lesions.label == c)
        members = members[rng.permutation(len(members))]
        if not holders:
            notes.append(f"class index {c} is held by no clinic ({len(members)} lesions unused)")
            continue
        if len(members) < len(holders):
            raise PartitionError(
                f"pathological split: class index {c} has {len(members)} lesions but {len(holders)} clinics need it; "
                "use fewer clinics or more classes per clinic"
            )
        for holder, chunk in zip(holders, np.array_split(members, len(holders))):
            parts[holder].extend(chunk.tolist())
    return parts, chosen, notes


def _centre(lesions: _Lesions, n: int | None) -> tuple[list[list[int]], list[str]]:
    """NaturalIdPartitioner on the source centre: one clinic per centre, in name order."""
    centres = sorted(str(c) for c in np.unique(lesions.centre))
    if centres == [UNKNOWN_CENTRE]:
        raise PartitionError("split 'centre' needs the source centre of each image (the `dataset` metadata column); this data has none")
    if n is not None and n != len(centres):
        raise PartitionError(
            f"split 'centre' makes one clinic per source centre and the data has {len(centres)} "
            f"({', '.join(centres)}); use --clinics {len(centres)} or another split"
        )
    return [np.flatnonzero(lesions.centre == c).tolist() for c in centres], centres


def _usable(lesion_idx: list[int], lesions: _Lesions, eval_fraction: float, seed: int) -> bool:
    """Would a clinic with these lesions have a non-empty local train and test part?"""
    if not lesion_idx:
        return False
    idx = np.asarray(lesion_idx)
    train, test = local_split(lesions.label[idx], lesions.ids[idx], eval_fraction, seed)
    return len(train) > 0 and len(test) > 0


def _repair(
    parts: list[list[int]],
    lesions: _Lesions,
    eval_fraction: float,
    seed: int,
    allowed: list[set[int]] | None,
    names: list[str],
) -> int:
    """Move single lesions to clinics that lack a local train or test part; return how many moved."""
    def count(lesion_idx: list[int], label: int) -> int:
        return int(np.sum(lesions.label[np.asarray(lesion_idx, dtype=np.int64)] == label))

    moved = 0
    limit = len(lesions.ids)
    for clinic in range(len(parts)):
        while not _usable(parts[clinic], lesions, eval_fraction, seed):
            mine = lesions.label[np.asarray(parts[clinic], dtype=np.int64)]
            by_frequency = [int(c) for c in np.argsort(-np.bincount(lesions.label), kind="stable")]
            if allowed is not None:
                candidates = sorted(allowed[clinic], key=lambda c: (-int(np.sum(mine == c)), c))
            elif len(mine):
                own = int(np.argmax(np.bincount(mine)))
                candidates = [own] + [c for c in by_frequency if c != own]
            else:
                candidates = by_frequency
            donated = False
            for c in candidates:
                donors = sorted((i for i in range(len(parts)) if i != clinic), key=lambda i: (-count(parts[i], c), i))
                for donor in donors:
                    have = [l for l in parts[donor] if lesions.label[l] == c]
                    if not have:
                        break
                    rest = [l for l in parts[donor] if l != have[-1]]
                    if _usable(rest, lesions, eval_fraction, seed):
                        parts[donor] = rest
                        parts[clinic].append(have[-1])
                        moved += 1
                        donated = True
                        break
                if donated:
                    break
            if not donated or moved > limit:
                raise PartitionError(
                    f"{names[clinic]} cannot get both a local training and test part "
                    f"(eval-fraction {eval_fraction}); use fewer clinics"
                )
    return moved


def make_partition(
    labels: np.ndarray,
    lesion_ids: np.ndarray,
    centres: np.ndarray,
    *,
    split: str,
    num_clinics: int | None,
    alpha: float = 0.5,
    classes_per_clinic: int = 2,
    seed: int = 0,
    eval_fraction: float = 0.2,
) -> Partition:
    """Split the dataset's rows into clinics (whole lesions), each with its local train/test part.

    `num_clinics=None` means one clinic per centre for the centre split (an error otherwise).
    Deterministic for a given seed. Raises PartitionError with a one-line reason.
    """
    if split not in SPLITS:
        raise PartitionError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    labels = np.asarray(labels)
    lesions = _Lesions.of(labels, np.asarray(lesion_ids), np.asarray(centres))
    n_lesions = len(lesions.ids)
    if split != "centre" and num_clinics is None:
        raise PartitionError(f"split {split!r} needs a number of clinics")
    if num_clinics is not None:
        if num_clinics < 1:
            raise PartitionError(f"clinics={num_clinics}: need at least 1 clinic")
        if num_clinics > n_lesions:
            raise PartitionError(
                f"{num_clinics} clinics but the data has only {n_lesions} lesions (a lesion never spans two clinics); use fewer clinics"
            )
    if not 0.0 < eval_fraction < 1.0:
        raise PartitionError(f"eval-fraction={eval_fraction}: must be between 0 and 1")
    rng = np.random.default_rng(seed)
    allowed: list[set[int]] | None = None
    notes: list[str] = []
    if split == "centre":
        parts, names = _centre(lesions, num_clinics)
        moved = np.asarray(centres).astype(str) != lesions.centre[lesions.row_lesion].astype(str)
        if moved.any():  # HAM10000: 9 images of lesions photographed at both vidir_modern and vidir_molemax
            notes.append(
                f"{int(moved.sum())} image(s) of {len(np.unique(lesions.row_lesion[moved]))} lesion(s) photographed at two "
                "centres went with their lesion to the centre of its first metadata row, so a lesion stays in one clinic"
            )
    else:
        n = int(num_clinics)  # type: ignore[arg-type]
        width = max(3, len(str(n)))
        names = [f"clinic-{i + 1:0{width}d}" for i in range(n)]
        if split == "dirichlet":
            if not (alpha > 0 and np.isfinite(alpha)):
                raise PartitionError(f"alpha={alpha}: the Dirichlet concentration must be > 0 and finite")
            parts = _dirichlet(lesions, n, float(alpha), rng)
        elif split == "iid":
            parts = _iid(lesions, n, rng)
        else:
            parts, allowed, notes = _pathological(lesions, n, int(classes_per_clinic), rng)
    moved = 0
    if split in ("dirichlet", "pathological"):
        moved = _repair(parts, lesions, eval_fraction, seed, allowed, names)
    clinics = []
    for name, lesion_idx in zip(names, parts):
        if not _usable(lesion_idx, lesions, eval_fraction, seed):
            n_here = len(lesion_idx)
            raise PartitionError(
                f"{name} would have {n_here} lesion(s): too few for a local training and test part; "
                + ("this centre is too small for the eval-fraction" if split == "centre" else "use fewer clinics")
            )
        rows = np.flatnonzero(np.isin(lesions.row_lesion, np.asarray(lesion_idx, dtype=np.int64)))
        train, test = local_split(labels[rows], np.asarray(lesion_ids)[rows], eval_fraction, seed)
        clinics.append(ClinicPart(name, rows, rows[train], rows[test]))
    return Partition(split, tuple(clinics), moved, tuple(notes))
