"""The clinical prior (qana.clinical): encoding with clear errors, fitting, choosing its weight,
the bundle file, and `qana evaluate` with and without it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from qana import clinical
from qana.bundle import BundleError, load_bundle
from qana.classes import CLASS_NAMES
from qana.cli import app
from qana.data import load_dataset
from tests.live_bundles import FIXTURES, with_clinical_prior
from tests.synthetic import CLASS_SITE, make_synthetic_ham

N_AGE = len(clinical.AGE_BANDS) + 1
N_SEX = len(clinical.SEXES) + 1


def test_encoding_is_one_hot_per_field_with_explicit_unknowns() -> None:
    e = clinical.encode(["80.0", "", 29.9, "NA"], ["male", "FEMALE", "", "unknown"], ["face", "Upper Extremity ", "", "unknown"])
    assert e.shape == (4, len(clinical.FEATURE_NAMES)) and (e.sum(axis=1) == 3).all()
    names = [[clinical.FEATURE_NAMES[j] for j in np.flatnonzero(row)] for row in e]
    assert names[0] == ["age 75+", "sex male", "site face"]
    assert names[1] == ["age unknown", "sex female", "site upper extremity"]
    assert names[2] == ["age 0-30", "sex unknown", "site unknown"]
    assert names[3] == ["age unknown", "sex unknown", "site unknown"]


@pytest.mark.parametrize(
    ("age", "sex", "site", "message"),
    [
        ("eighty", "male", "face", "ISIC_1: age 'eighty' is not a number of years"),
        ("-3", "male", "face", "ISIC_1: age -3 is outside 0-120 years"),
        ("40", "m", "face", "ISIC_1: sex 'm' is not one the clinical prior knows"),
        ("40", "male", "elbow", "ISIC_1: body site \\(localization\\) 'elbow' is not one the clinical prior knows"),
    ],
)
def test_values_outside_the_vocabulary_are_errors_naming_image_and_value(age: str, sex: str, site: str, message: str) -> None:
    with pytest.raises(clinical.ClinicalDataError, match=message):
        clinical.encode(["50", age], ["female", sex], ["back", site], ["ISIC_0", "ISIC_1"])


def _informative(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, weak image logits, and metadata whose site says much about the label."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 7, n)
    sites = [clinical.SITES[k] if rng.random() < 0.7 else clinical.SITES[int(rng.integers(14))] for k in labels]
    encoded = clinical.encode(["50"] * n, ["male"] * n, sites)
    image_logits = np.eye(7)[labels] * 1.0 + rng.normal(0, 1.0, (n, 7))
    return labels, image_logits, encoded


def _top1(labels: np.ndarray, predictions: np.ndarray) -> float:
    return float((labels == predictions).mean())


def test_an_informative_prior_is_fitted_chosen_and_improves_held_out_accuracy() -> None:
    labels, logits, encoded = _informative(1500, seed=0)
    prior = clinical.fit_prior(encoded[:1000], labels[:1000], CLASS_NAMES)
    prior, scores = clinical.choose_weight(prior, logits[1000:1250], encoded[1000:1250], labels[1000:1250], _top1)
    assert set(scores) == {f"{w:g}" for w in clinical.WEIGHT_CANDIDATES} and prior.weight > 0
    test = slice(1250, 1500)
    alone = _top1(labels[test], logits[test].argmax(1))
    with_prior = _top1(labels[test], clinical.adjust(prior, logits[test], encoded[test]).argmax(1))
    assert with_prior > alone + 0.10


def test_an_uninformative_prior_adds_almost_nothing_and_ties_choose_off() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 7, 2000)
    sites = [clinical.SITES[int(k)] for k in rng.integers(0, 14, 2000)]
    encoded = clinical.encode(["50"] * 2000, ["male"] * 2000, sites)
    prior = clinical.fit_prior(encoded, labels, CLASS_NAMES)
    assert np.abs(clinical.log_odds(prior, encoded)).mean() < 0.25  # sampling noise only (~20 images per site and class)
    logits = np.eye(7)[labels]  # a perfect image model: every weight scores the same -> off
    chosen, _ = clinical.choose_weight(prior, logits, encoded, labels, _top1)
    assert chosen.weight == 0.0


def test_no_prior_or_no_metadata_leaves_logits_unchanged() -> None:
    labels, logits, encoded = _informative(50, seed=2)
    prior = clinical.fit_prior(encoded, labels, CLASS_NAMES)
    np.testing.assert_array_equal(clinical.adjust(None, logits, encoded), logits)
    np.testing.assert_array_equal(clinical.adjust(prior, logits, None), logits)
    with pytest.raises(ValueError, match="3 classes, the clinical prior 7"):
        clinical.adjust(prior, logits[:, :3], encoded)


def test_fitting_needs_every_class() -> None:
    encoded = clinical.encode(["50"] * 4, ["male"] * 4, ["back"] * 4)
    with pytest.raises(ValueError, match="none of bkl, df, mel, nv, vasc"):
        clinical.fit_prior(encoded, np.array([0, 1, 0, 1]), CLASS_NAMES)


def test_file_round_trip_and_refusals() -> None:
    labels, _, encoded = _informative(300, seed=3)
    prior = clinical.fit_prior(encoded, labels, CLASS_NAMES)
    back = clinical.prior_from_npz(clinical.prior_to_npz(prior))
    np.testing.assert_array_equal(clinical.log_odds(back, encoded), clinical.log_odds(prior, encoded))
    assert back.weight == prior.weight and back.classes == CLASS_NAMES
    for damaged in (b"not an npz", b"", clinical.prior_to_npz(prior)[:60]):  # empty and truncated were tracebacks
        with pytest.raises(ValueError, match="not a valid clinical prior file"):
            clinical.prior_from_npz(damaged)
    import io

    buf = io.BytesIO()
    np.savez(buf, weights=prior.model.weights, bias=prior.model.bias, classes=np.array(CLASS_NAMES),
             log_class_frequency=prior.log_class_frequency, weight=np.array(1.0), feature_names=np.array(["age", "sex"]))
    with pytest.raises(ValueError, match="another metadata encoding"):
        clinical.prior_from_npz(buf.getvalue())


def test_dataset_carries_metadata_and_subsets_keep_it_aligned(tmp_path: Path) -> None:
    ham = make_synthetic_ham(tmp_path / "ham", n_images=20, image_size=40, seed=0)
    ds = load_dataset(ham.root, size=32, cache_dir=None)
    assert ds.has_clinical
    part = ds.subset(np.array([3, 1]))
    assert list(part.sites) == [CLASS_SITE[CLASS_NAMES[k]] for k in part.labels]
    # A metadata file without the clinical columns still loads, for images-only work.
    lines = ham.metadata.read_text().splitlines()
    keep = [0, 1, 2, 7]  # lesion_id, image_id, dx, dataset
    ham.metadata.write_text("\n".join(",".join(line.split(",")[i] for i in keep) for line in lines) + "\n")
    bare = load_dataset(ham.root, size=32, cache_dir=None)
    assert not bare.has_clinical and clinical.encode_dataset(bare) is None and len(bare) == 20


@pytest.fixture
def prior_bundle(tmp_path: Path) -> Path:
    """tiny-v2 with an overwhelming prior: every 'scalp' image becomes vasc."""
    n = 700
    labels = np.arange(n) % 7
    sites = ["scalp" if k == 6 else "back" for k in labels]
    prior = clinical.fit_prior(clinical.encode(["50"] * n, ["male"] * n, sites), labels, CLASS_NAMES)
    prior = clinical.ClinicalPrior(prior.model, prior.log_class_frequency, weight=1e4)
    return with_clinical_prior(FIXTURES / "tiny-v2", tmp_path / "prior", prior)


def test_bundle_loads_its_prior_and_refuses_a_tampered_one(prior_bundle: Path, tmp_path: Path) -> None:
    bundle = load_bundle(prior_bundle)
    assert bundle.load_clinical_prior().weight == 1e4
    assert load_bundle(FIXTURES / "tiny-v2").load_clinical_prior() is None
    copy = Path(shutil.copytree(prior_bundle, tmp_path / "copy"))
    (copy / clinical.PRIOR_FILE).unlink()  # left out, like the Keras models of a clinic's copy
    assert load_bundle(copy).load_clinical_prior() is None
    data = bytearray((prior_bundle / clinical.PRIOR_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (prior_bundle / clinical.PRIOR_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="clinical.npz has been modified"):
        load_bundle(prior_bundle)


def test_evaluate_uses_the_prior_only_when_asked_and_possible(prior_bundle: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    ham = make_synthetic_ham(tmp_path / "ham", n_images=30, image_size=40, seed=4)
    rows = ham.metadata.read_text().splitlines()
    header = rows[0].split(",")
    site = header.index("localization")
    ham.metadata.write_text("\n".join([rows[0]] + [",".join(r.split(",")[:site] + ["scalp"] + r.split(",")[site + 1:]) for r in rows[1:]]) + "\n")
    out = tmp_path / "with.json"
    result = runner.invoke(app, ["evaluate", "--data", str(ham.root), "--model", str(prior_bundle), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "clinical prior: used" in result.output
    confusion = np.array(json.loads(out.read_text())["confusion"])
    assert confusion[:, CLASS_NAMES.index("vasc")].sum() == 30  # the prior overrules every image
    result = runner.invoke(app, ["evaluate", "--data", str(ham.root), "--model", str(prior_bundle), "--json", str(out), "--no-clinical-prior"])
    assert result.exit_code == 0 and "clinical prior: off" in result.output
    assert np.array(json.loads(out.read_text())["confusion"])[:, CLASS_NAMES.index("vasc")].sum() < 30
    # A body site the prior does not know is a one-line error that names it and the way out.
    ham.metadata.write_text(ham.metadata.read_text().replace("scalp", "elbow"))
    result = runner.invoke(app, ["evaluate", "--data", str(ham.root), "--model", str(prior_bundle)])
    assert result.exit_code == 2 and "'elbow'" in result.output and "--no-clinical-prior" in result.output
    assert "Traceback" not in result.output


def test_info_names_the_prior_and_whether_this_copy_has_it(prior_bundle: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["info", str(prior_bundle)])
    assert result.exit_code == 0, result.output
    assert "clinical   prior from age, sex, localization, weight 10000, in clinical.npz\n" in result.output
    copy = Path(shutil.copytree(prior_bundle, tmp_path / "copy"))
    (copy / clinical.PRIOR_FILE).unlink()
    assert "in clinical.npz (file not in this copy)" in runner.invoke(app, ["info", str(copy)]).output


def test_the_clinical_stage_steps_aside_when_it_cannot_or_should_not_fit(tmp_path: Path) -> None:
    from qana.train import TrainOptions, stage_clinical

    ham = make_synthetic_ham(tmp_path / "ham", n_images=40, image_size=40, seed=5)
    ds = load_dataset(ham.root, size=32, cache_dir=None)
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    stale = run / "final" / clinical.PRIOR_FILE
    opts = TrainOptions(data=ham.root, run_dir=run, cache_dir=None, clinical_prior="off")
    stale.write_bytes(b"an old prior")
    assert stage_clinical(opts, ds, ds) == {"used": False, "reason": "--clinical-prior off"}
    assert not stale.exists()  # a prior from an earlier run of this stage is not carried into the bundle
    opts.clinical_prior = "auto"
    only_some = ds.subset(np.flatnonzero(ds.labels < 3))
    assert stage_clinical(opts, only_some, ds)["reason"] == "no training images of df, mel, nv, vasc"
    bare = ds.subset(np.arange(len(ds)))
    bare.ages = bare.sexes = bare.sites = None
    assert stage_clinical(opts, bare, bare)["reason"] == "the metadata has no age, sex, localization columns"


def test_values_from_a_dataset_are_shown_as_written_in_the_csv() -> None:
    """Dataset columns are numpy arrays: under numpy 2 `!r` showed np.str_('45 years') (helper-15)."""
    with pytest.raises(clinical.ClinicalDataError, match=r"age '45 years' is not") as age:
        clinical.encode(np.array(["45 years"]), np.array(["male"]), np.array(["back"]), np.array(["ISIC_0"]))
    with pytest.raises(clinical.ClinicalDataError, match=r"sex 'M' is not") as sex:
        clinical.encode(np.array(["45"]), np.array(["M"]), np.array(["back"]), np.array(["ISIC_0"]))
    assert "np.str_" not in str(age.value) + str(sex.value)


def test_damaged_prior_files_are_value_errors_with_a_reason() -> None:
    """Shared with head files (qana.head.read_npz): zipfile's RuntimeError / NotImplementedError and numpy's
    MemoryError escaped, and names that are not strings were read as str() of whatever was stored."""
    import io
    import struct

    labels, _, encoded = _informative(300, seed=3)
    prior = clinical.fit_prior(encoded, labels, CLASS_NAMES)
    good = clinical.prior_to_npz(prior)
    encrypted = bytearray(good)
    struct.pack_into("<H", encrypted, encrypted.index(b"PK\x01\x02") + 8, 0x0001)
    with pytest.raises(ValueError, match="not a valid clinical prior file: .*encrypted"):
        clinical.prior_from_npz(bytes(encrypted))
    buf = io.BytesIO()
    np.savez(buf, weights=prior.model.weights, bias=prior.model.bias, classes=np.array(CLASS_NAMES, dtype="S"),
             log_class_frequency=prior.log_class_frequency, weight=np.array(1.0), feature_names=np.array(clinical.FEATURE_NAMES))
    with pytest.raises(ValueError, match=r"not a valid clinical prior file: 'classes' must be names \(strings\)"):
        clinical.prior_from_npz(buf.getvalue())


def test_info_refuses_the_prior_evaluate_would_refuse(prior_bundle: Path, tmp_path: Path) -> None:
    """helper-30 P1: a prior without a hash (or naming another file) was printed and called verified."""
    runner = CliRunner()
    unhashed = Path(shutil.copytree(prior_bundle, tmp_path / "unhashed"))
    manifest = json.loads((unhashed / "bundle.json").read_text())
    del manifest["files"][clinical.PRIOR_FILE]
    (unhashed / "bundle.json").write_text(json.dumps(manifest))
    (unhashed / clinical.PRIOR_FILE).write_bytes(b"junk")
    result = runner.invoke(app, ["info", str(unhashed)])
    assert result.exit_code == 2 and "has no sha256" in result.output and "verified" not in result.output
    other = Path(shutil.copytree(prior_bundle, tmp_path / "other"))
    manifest = json.loads((other / "bundle.json").read_text())
    manifest["clinical_prior"]["file"] = "head.npz"
    (other / "bundle.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["info", str(other)])
    assert result.exit_code == 2 and "not a valid clinical prior file" in result.output
