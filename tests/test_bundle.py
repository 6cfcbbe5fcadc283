"""Bundles: verified loading, tamper refusal, packing for the wire."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qana.bundle import BundleError, load_bundle, pack_bundle, unpack_bundle

TINY = Path(__file__).parent / "fixtures" / "bundles" / "tiny-v2"


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    return Path(shutil.copytree(TINY, tmp_path / "b"))


def test_loads_and_reports_identity(bundle_dir: Path) -> None:
    b = load_bundle(bundle_dir)
    assert b.target == "v2" and len(b.classes) == 7 and b.feature_dim == 32
    assert len(b.bundle_id) == 64
    assert b.load_head().num_features == 32


@pytest.mark.parametrize("name", ["model.fbz", "head.npz"])
def test_a_tampered_file_is_refused_by_name(bundle_dir: Path, name: str) -> None:
    path = bundle_dir / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{name} has been modified"):
        load_bundle(bundle_dir)


def test_missing_or_broken_manifest(bundle_dir: Path, tmp_path: Path) -> None:
    (bundle_dir / "head.npz").unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(bundle_dir)
    (bundle_dir / "bundle.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bundle_dir)
    with pytest.raises(BundleError, match="has no bundle.json"):
        load_bundle(tmp_path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("input_shape", [64, 64], "'input_shape' must be"),
        ("input_shape", [64, "64", 3], "'input_shape' must be"),
        ("classes", "akiec,bcc", "'classes' must be"),
        ("classes", ["nv", "nv"], "lists a class twice"),
        ("feature_dim", -1, "'feature_dim' must be"),
        ("target", "v3", "'target' must be"),
        # optional fields `qana info`, `qana evaluate` and `qana split --model` read: a wrong
        # type used to surface as a traceback there
        ("name", 5, "'name' must be a string"),
        ("bits", "8", "'bits' must be an object"),
        ("training", "qana train", "'training' must be an object"),
        ("training", {"seed": "3"}, "'training.seed' must be an integer"),
        ("metrics", [], "'metrics' must be an object"),
        ("metrics", {"test": 0.8}, "'metrics.test' must be an object"),
        ("metrics", {"test": {"akida": {"top1": "0.8", "macro_f1": 0.6, "balanced_accuracy": 0.5, "n": 9}}}, "'metrics.test.akida' must give numbers"),
        ("metrics", {"test": {"akida": {"top1": 0.8, "macro_f1": 0.6, "balanced_accuracy": 0.5}}}, "integer n"),
        ("feature_scale", 0, "'feature_scale' must be a positive number"),
        ("clinical_prior", "clinical.npz", "'clinical_prior' must be an object"),
        ("clinical_prior", {"file": "../x.npz", "inputs": ["age"], "weight": 1.0}, "'clinical_prior.file' must be a file name"),
        ("clinical_prior", {"file": "clinical.npz", "inputs": "age", "weight": 1.0}, "'clinical_prior.inputs' must be"),
        ("clinical_prior", {"file": "clinical.npz", "inputs": ["age"], "weight": "1.5"}, "'clinical_prior.weight' must be"),
        # fields `qana info` and `qana split --model` read (helper-12, session 25: tracebacks before)
        ("metrics", {"test": {"akida": "n/a"}}, "'metrics.test.akida' must give numbers"),
        ("metrics", {"test": {"akida": {}}}, "'metrics.test.akida' must give numbers"),
        ("metrics", {"test": {"agreement_quantized_vs_akida": "high"}}, "must be a number"),
        ("training", {"split": {"n_images": None}}, "'training.split' must map part names to image counts"),
        ("training", {"split": {"test": "many"}}, "'training.split'"),
    ],
)
def test_a_malformed_manifest_field_is_refused_by_name(bundle_dir: Path, field: str, value, message: str) -> None:
    manifest = json.loads((bundle_dir / "bundle.json").read_text())
    manifest[field] = value
    (bundle_dir / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_dir)


@pytest.mark.parametrize(
    "entry, digest, message",
    [
        ("head.npz", 123, "sha256 of head.npz is not 64 lowercase hex digits"),
        ("head.npz", "ABC", "sha256 of head.npz is not 64 lowercase hex digits"),
        ("../outside.h5", "0" * 64, "'../outside.h5' is not a plain file name"),
        ("sub/../../x", "0" * 64, "is not a plain file name"),
    ],
)
def test_a_malformed_files_entry_is_refused_by_name(bundle_dir: Path, entry: str, digest, message: str) -> None:
    # Before: a number as a hash was a TypeError traceback, and a path leading out of the
    # bundle was hashed (or silently skipped as an optional extra when missing).
    manifest = json.loads((bundle_dir / "bundle.json").read_text())
    manifest["files"][entry] = digest
    (bundle_dir / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_dir)


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).parents[1] / "qana" / "bundles").iterdir() if p.is_dir()))
def test_every_shipped_bundle_passes_the_field_checks(name: str) -> None:
    load_bundle(Path(__file__).parents[1] / "qana" / "bundles" / name)


def test_pack_unpack_round_trip_and_wrong_id(bundle_dir: Path, tmp_path: Path) -> None:
    b = load_bundle(bundle_dir)
    data = pack_bundle(b)
    copy = unpack_bundle(data, tmp_path / "copy", expected_id=b.bundle_id)
    assert copy.bundle_id == b.bundle_id
    with pytest.raises(BundleError, match="was announced"):
        unpack_bundle(data, tmp_path / "other", expected_id="0" * 64)
    assert not (tmp_path / "other").exists()
    with pytest.raises(BundleError, match="not a valid archive"):
        unpack_bundle(b"garbage", tmp_path / "junk")


def test_the_same_bundle_always_packs_to_the_same_bytes(bundle_dir: Path, tmp_path: Path) -> None:
    """The audit log names a backbone by the sha256 of its packed bundle: a copy with other file
    times and permissions (cp, git checkout, a restored backup) must stay the same backbone."""
    import os
    import shutil

    original = pack_bundle(load_bundle(bundle_dir))
    copy = tmp_path / "copy"
    shutil.copytree(bundle_dir, copy)
    for path in copy.iterdir():
        os.utime(path, (1_900_000_000, 1_900_000_000))
        path.chmod(0o600)
    assert pack_bundle(load_bundle(copy)) == original
    unpacked = unpack_bundle(original, tmp_path / "unpacked")
    assert pack_bundle(unpacked) == original


def test_unpack_keeps_the_existing_copy_when_the_new_one_is_bad(bundle_dir: Path, tmp_path: Path) -> None:
    good = unpack_bundle(pack_bundle(load_bundle(bundle_dir)), tmp_path / "dest")
    manifest = json.loads((bundle_dir / "bundle.json").read_text())
    manifest["files"]["head.npz"] = "0" * 64
    (bundle_dir / "bundle.json").write_text(json.dumps(manifest))
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("bundle.json", "model.fbz", "head.npz"):
            tar.add(bundle_dir / name, arcname=name)
    with pytest.raises(BundleError, match="modified") as refused:
        unpack_bundle(buf.getvalue(), tmp_path / "dest")
    assert load_bundle(tmp_path / "dest").bundle_id == good.bundle_id
    # The message names the received bundle's file, not the temporary folder it was checked in.
    assert str(refused.value).startswith("received bundle: bundle file head.npz has been modified"), refused.value
    assert ".dest." not in str(refused.value)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".dest.")]


# helper-12's audit (session 25): each of these was a traceback or a lost bundle before.


def test_a_bundle_refused_on_write_leaves_the_existing_one_in_place(bundle_dir: Path, tmp_path: Path) -> None:
    from qana.bundle import write_bundle

    b = load_bundle(bundle_dir)
    manifest = {k: v for k, v in b.manifest.items() if k not in ("files", "format_version")}
    good = write_bundle(tmp_path / "out", b.model_path, b.head_path.read_bytes(), manifest)
    with pytest.raises(BundleError, match="not written to .*'target' must be 'v1' or 'v2'"):
        write_bundle(tmp_path / "out", b.model_path, b.head_path.read_bytes(), {**manifest, "target": "v3"})
    assert load_bundle(tmp_path / "out").bundle_id == good.bundle_id
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


@pytest.mark.parametrize("text", ['{"n": ' + "9" * 5000 + "}", "[" * 100000 + "]" * 100000])
def test_a_manifest_python_cannot_parse_is_refused_not_a_traceback(bundle_dir: Path, text: str) -> None:
    (bundle_dir / "bundle.json").write_text(text)
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bundle_dir)


def test_a_file_name_too_long_for_the_disk_is_refused(bundle_dir: Path) -> None:
    manifest = json.loads((bundle_dir / "bundle.json").read_text())
    manifest["files"]["x" * 300] = "0" * 64
    (bundle_dir / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="cannot be read"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize("field, value, message", [("input_shape", [48, 48, 3], "'input_shape' is"), ("feature_dim", 128, "'feature_dim' is 128 but model.fbz gives")])
def test_a_manifest_that_disagrees_with_its_model_is_refused_by_field(bundle_dir: Path, field: str, value, message: str) -> None:
    from qana.runtime import load_akida_model

    manifest = json.loads((bundle_dir / "bundle.json").read_text())
    manifest[field] = value
    (bundle_dir / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=message):
        load_akida_model(load_bundle(bundle_dir))


def test_a_linked_model_file_is_packed_as_its_content(bundle_dir: Path, tmp_path: Path) -> None:
    real = tmp_path / "elsewhere.fbz"
    (bundle_dir / "model.fbz").rename(real)
    (bundle_dir / "model.fbz").symlink_to(real)
    b = load_bundle(bundle_dir)
    assert unpack_bundle(pack_bundle(b), tmp_path / "clinic", expected_id=b.bundle_id).bundle_id == b.bundle_id


def test_a_clinical_prior_without_a_recorded_hash_is_refused(tmp_path: Path) -> None:
    copy = Path(shutil.copytree(Path(__file__).parents[1] / "qana" / "bundles" / "v2-s7", tmp_path / "b"))
    manifest = json.loads((copy / "bundle.json").read_text())
    del manifest["files"]["clinical.npz"]
    (copy / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="no sha256 in bundle.json 'files'"):
        load_bundle(copy).load_clinical_prior()
