"""qana-sim's splits: whole lesions per clinic, a leak-free local test part, seeded, and clear refusals."""

from __future__ import annotations

import numpy as np
import pytest

from simulations.partition import PartitionError, local_split, make_partition

CENTRES = ("vidir_molemax", "vidir_modern", "rosendahl", "vienna_dias")


def ham_like(n_lesions: int = 900, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows like HAM10000: nv-heavy labels, 1-4 images per lesion, one centre per lesion."""
    rng = np.random.default_rng(seed)
    lesion_label = rng.choice(7, n_lesions, p=[0.03, 0.05, 0.11, 0.012, 0.11, 0.67, 0.018])
    lesion_centre = rng.choice(len(CENTRES), n_lesions, p=[0.4, 0.33, 0.22, 0.05])
    reps = rng.integers(1, 5, n_lesions)
    ids = np.array([f"HAM_{i:07d}" for i in rng.permutation(n_lesions)])
    # rows in a scrambled order, as in the real metadata file
    order = rng.permutation(int(reps.sum()))
    lesion_ids = np.repeat(ids, reps)[order]
    labels = np.repeat(lesion_label, reps)[order]
    centres = np.array(CENTRES)[np.repeat(lesion_centre, reps)][order]
    return labels, lesion_ids, centres


SPLITS = [
    ("centre", None, {}),
    ("iid", 4, {}),
    ("iid", 50, {}),
    ("dirichlet", 4, {"alpha": 0.5}),
    ("dirichlet", 16, {"alpha": 0.1}),
    ("dirichlet", 100, {"alpha": 0.5}),
    ("dirichlet", 20, {"alpha": 100.0}),
    ("pathological", 7, {"classes_per_clinic": 1}),
    ("pathological", 30, {"classes_per_clinic": 2}),
    ("pathological", 10, {"classes_per_clinic": 3}),
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("split,clinics,extra", SPLITS, ids=[f"{s}-{n}-{e}" for s, n, e in SPLITS])
def test_no_lesion_leaks_across_clinics_or_between_train_and_test(split, clinics, extra, seed) -> None:
    labels, lesions, centres = ham_like(seed=seed)
    part = make_partition(labels, lesions, centres, split=split, num_clinics=clinics, seed=seed, **extra)
    owner: dict[str, str] = {}
    seen_rows: set[int] = set()
    for clinic in part.clinics:
        rows = set(clinic.rows.tolist())
        assert not rows & seen_rows, f"{clinic.clinic_id} shares images with another clinic"
        seen_rows |= rows
        assert set(clinic.train.tolist()) | set(clinic.test.tolist()) == rows
        assert len(clinic.train) > 0 and len(clinic.test) > 0, f"{clinic.clinic_id} lacks a train or test part"
        train_lesions, test_lesions = set(lesions[clinic.train]), set(lesions[clinic.test])
        assert not train_lesions & test_lesions, f"{clinic.clinic_id}: a lesion is in its train and test parts"
        for lesion in train_lesions | test_lesions:
            assert owner.setdefault(lesion, clinic.clinic_id) == clinic.clinic_id, f"lesion {lesion} on two clinics"
        # every image of a clinic's lesion is at that clinic
        assert set(np.flatnonzero(np.isin(lesions, list(train_lesions | test_lesions))).tolist()) == rows
    if split != "pathological":  # pathological may leave a class unused (reported in notes)
        assert seen_rows == set(range(len(labels)))
    assert len(part.clinics) == (len(CENTRES) if clinics is None else clinics)


def test_local_test_part_is_the_clinics_own_grouped_split() -> None:
    labels, lesions, centres = ham_like(seed=3)
    part = make_partition(labels, lesions, centres, split="dirichlet", num_clinics=8, alpha=0.5, seed=5, eval_fraction=0.25)
    for clinic in part.clinics:
        train, test = local_split(labels[clinic.rows], lesions[clinic.rows], 0.25, 5)
        assert np.array_equal(clinic.rows[train], clinic.train)
        assert np.array_equal(clinic.rows[test], clinic.test)


@pytest.mark.parametrize("split,clinics,extra", SPLITS[1:], ids=[f"{s}-{n}" for s, n, _ in SPLITS[1:]])
def test_same_seed_same_split_other_seed_other_split(split, clinics, extra) -> None:
    labels, lesions, centres = ham_like()
    a = make_partition(labels, lesions, centres, split=split, num_clinics=clinics, seed=7, **extra)
    b = make_partition(labels, lesions, centres, split=split, num_clinics=clinics, seed=7, **extra)
    c = make_partition(labels, lesions, centres, split=split, num_clinics=clinics, seed=8, **extra)
    assert [x.rows.tolist() for x in a.clinics] == [x.rows.tolist() for x in b.clinics]
    assert [x.test.tolist() for x in a.clinics] == [x.test.tolist() for x in b.clinics]
    if extra.get("classes_per_clinic") != 1:  # one class per clinic, 7 clinics: nothing left to chance
        assert [x.rows.tolist() for x in a.clinics] != [x.rows.tolist() for x in c.clinics]


def test_centre_split_is_one_clinic_per_real_source_centre() -> None:
    labels, lesions, centres = ham_like()
    part = make_partition(labels, lesions, centres, split="centre", num_clinics=4, seed=0)
    assert part.clinic_ids == sorted(CENTRES)
    for clinic in part.clinics:
        assert set(centres[clinic.rows]) == {clinic.clinic_id}


def test_centre_split_names_images_that_went_with_their_lesion_to_another_centre() -> None:
    """HAM10000 has 9 lesions photographed at two centres: a lesion stays whole in one clinic,
    and the few images that therefore sit at another centre's clinic are counted in the notes."""
    labels, lesions, centres = ham_like()
    assert not make_partition(labels, lesions, centres, split="centre", num_clinics=4, seed=0).notes
    first = {}
    for row, lesion in enumerate(lesions):
        first.setdefault(lesion, row)
    twice = [r for r in range(len(lesions)) if first[lesions[r]] != r][:3]  # second images of three lesions
    centres = centres.copy()
    for r in twice:
        centres[r] = next(c for c in CENTRES if c != centres[first[lesions[r]]])
    part = make_partition(labels, lesions, centres, split="centre", num_clinics=4, seed=0)
    assert part.notes == ("3 image(s) of 3 lesion(s) photographed at two centres went with their lesion to the centre of "
                          "its first metadata row, so a lesion stays in one clinic",)
    for clinic in part.clinics:
        assert len(set(lesions[clinic.rows]) & set().union(*(set(lesions[c.rows]) for c in part.clinics if c is not clinic))) == 0


def _label_skew(part, labels) -> float:
    """Mean total-variation distance between each clinic's class mix and the overall one."""
    overall = np.bincount(labels, minlength=7) / len(labels)
    tv = []
    for clinic in part.clinics:
        mine = np.bincount(labels[clinic.rows], minlength=7) / len(clinic.rows)
        tv.append(0.5 * np.abs(mine - overall).sum())
    return float(np.mean(tv))


def test_dirichlet_alpha_controls_label_skew_and_iid_has_little() -> None:
    labels, lesions, centres = ham_like(n_lesions=3000)
    skew = {
        alpha: _label_skew(make_partition(labels, lesions, centres, split="dirichlet", num_clinics=10, alpha=alpha, seed=1), labels)
        for alpha in (0.1, 1.0, 100.0)
    }
    iid = _label_skew(make_partition(labels, lesions, centres, split="iid", num_clinics=10, seed=1), labels)
    assert skew[0.1] > skew[1.0] > skew[100.0]
    assert skew[0.1] > 0.3 and iid < 0.06 and skew[100.0] < 0.08


def test_pathological_clinics_hold_at_most_k_classes() -> None:
    labels, lesions, centres = ham_like(n_lesions=2000)
    part = make_partition(labels, lesions, centres, split="pathological", num_clinics=14, classes_per_clinic=2, seed=0)
    counts = [len(set(labels[c.rows].tolist())) for c in part.clinics]
    assert max(counts) <= 2 and min(counts) >= 1
    # "first-deterministic": clinic i always has class i mod 7
    for i, clinic in enumerate(part.clinics):
        assert i % 7 in set(labels[clinic.rows].tolist())


def test_tiny_clinics_are_topped_up_from_the_richest_clinic() -> None:
    labels, lesions, centres = ham_like(n_lesions=900, seed=2)
    part = make_partition(labels, lesions, centres, split="dirichlet", num_clinics=100, alpha=0.5, seed=0)
    assert part.moved_lesions > 0  # 100 Dirichlet clinics on 900 lesions: some draw (almost) nothing
    assert all(len(c.test) > 0 and len(c.train) > 0 for c in part.clinics)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"split": "random", "num_clinics": 4}, "unknown split 'random'; choose one of centre, dirichlet, iid, pathological"),
        ({"split": "dirichlet", "num_clinics": 4, "alpha": 0.0}, "alpha=0.0: the Dirichlet concentration must be > 0"),
        ({"split": "dirichlet", "num_clinics": 4, "alpha": -1.0}, "must be > 0"),
        ({"split": "dirichlet", "num_clinics": 4, "alpha": float("inf")}, "alpha=inf: the Dirichlet concentration must be > 0 and finite"),
        ({"split": "iid", "num_clinics": 901}, "901 clinics but the data has only 900 lesions"),
        ({"split": "iid", "num_clinics": 0}, "need at least 1 clinic"),
        ({"split": "centre", "num_clinics": 3}, "one clinic per source centre and the data has 4"),
        ({"split": "pathological", "num_clinics": 4, "classes_per_clinic": 8}, "classes-per-clinic=8"),
        ({"split": "iid", "num_clinics": 400}, "too few for a local training and test part"),
    ],
)
def test_bad_requests_are_one_clear_error(kwargs, message) -> None:
    labels, lesions, centres = ham_like()
    with pytest.raises(PartitionError) as err:
        make_partition(labels, lesions, centres, seed=0, **kwargs)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_centre_split_needs_centres() -> None:
    labels, lesions, _ = ham_like()
    with pytest.raises(PartitionError, match="needs the source centre"):
        make_partition(labels, lesions, np.full(len(labels), "unknown"), split="centre", num_clinics=None)
