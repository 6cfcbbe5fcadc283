"""Model bundles: the directory every component loads, with no TensorFlow needed.

    <bundle>/bundle.json   what it is: classes, input size, preprocessing, target IP version,
                           akida version, bit widths, sha256 of every file, how it was made, metrics,
                           and `test_time_views` (orientations averaged per image, qana.views; 1 if absent)
    <bundle>/model.fbz     the converted Akida model (backbone + head layer)
    <bundle>/head.npz      the float head (see qana.head) the Akida head layer was written from

Every file's sha256 is checked on load; a file that does not match is refused with an error
that names it. A bundle's identity (`bundle_id`) is the sha256 of its canonical bundle.json,
which covers every file through their hashes; clinics cache backbones by it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qana.atomic import replace_directory
from qana.preprocess import check_colour_constancy
from qana.views import check_view_count

FORMAT_VERSION = 1
MANIFEST = "bundle.json"
MODEL_FILE = "model.fbz"
HEAD_FILE = "head.npz"
PACKAGE_BUNDLES = Path(__file__).parent / "bundles"
REQUIRED_KEYS = ("format_version", "target", "classes", "input_shape", "files", "feature_dim")


class BundleError(ValueError):
    """A bundle is missing, malformed or has been tampered with; the message says which file."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def canonical_json(data: dict[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    path: Path
    manifest: dict[str, Any]

    @property
    def bundle_id(self) -> str:
        return hashlib.sha256(canonical_json(self.manifest)).hexdigest()

    @property
    def target(self) -> str:
        return str(self.manifest["target"])

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.manifest["classes"])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        h, w, c = self.manifest["input_shape"]
        return int(h), int(w), int(c)

    @property
    def feature_dim(self) -> int:
        return int(self.manifest["feature_dim"])

    @property
    def test_time_views(self) -> int:
        """Orientations the backbone sees per image, features averaged (qana.views); 1 if unset."""
        return int(self.manifest.get("test_time_views", 1))

    @property
    def colour_constancy(self) -> str:
        """Pixel preprocessing after decoding (qana.preprocess); "none" for bundles that name none."""
        return str(self.manifest.get("preprocessing", {}).get("colour_constancy", "none"))

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def head_path(self) -> Path:
        return self.path / HEAD_FILE

    def load_head(self):  # -> qana.head.Head (imported lazily: bundle stays dependency-light)
        from qana.head import head_from_npz

        return head_from_npz(self.head_path.read_bytes())

    def load_clinical_prior(self):  # -> qana.clinical.ClinicalPrior | None
        """The bundle's clinical prior (age, sex, body site; qana.clinical), or None if it has
        none or it was left out (like the Keras models, it is an optional extra)."""
        entry = self.manifest.get("clinical_prior")
        if not entry:
            return None
        path = self.path / str(entry.get("file", ""))
        if not path.is_file():
            return None
        if entry.get("file") not in self.manifest.get("files", {}):
            # load_bundle checks every file with a recorded hash; one without could be anything
            raise BundleError(f"{path}: the clinical prior has no sha256 in bundle.json 'files'; refusing an unchecked file")
        from qana.clinical import prior_from_npz

        try:
            prior = prior_from_npz(path.read_bytes())
        except ValueError as exc:
            raise BundleError(f"{path}: {exc}") from None
        if prior.classes != self.classes:
            raise BundleError(f"{path}: the clinical prior's classes {prior.classes} are not the bundle's {self.classes}")
        return prior


def write_bundle(
    path: Path | str,
    model_file: Path,
    head_bytes: bytes,
    manifest: dict[str, Any],
    extra_files: dict[str, Path] | None = None,
) -> Bundle:
    """Create a bundle directory atomically (written beside, verified, then swapped into place).

    `extra_files` (e.g. the float and quantized Keras models, for `qana evaluate --backend
    float|quantized`) are hashed like the rest but are optional on load and never sent to clinics.
    """
    path = Path(path)
    missing = [k for k in REQUIRED_KEYS if k not in manifest and k not in ("files", "format_version")]
    if missing:
        raise BundleError(f"manifest lacks {', '.join(missing)}")

    def build(staging: Path) -> None:
        shutil.copyfile(model_file, staging / MODEL_FILE)
        (staging / HEAD_FILE).write_bytes(head_bytes)
        for name, source in (extra_files or {}).items():
            shutil.copyfile(source, staging / name)
        full = dict(manifest)
        full["format_version"] = FORMAT_VERSION
        names = (MODEL_FILE, HEAD_FILE, *(extra_files or {}))
        full["files"] = {name: sha256_file(staging / name) for name in names}
        (staging / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
        try:
            verified.append(load_bundle(staging))  # refused before it can take the place of a bundle that works
        except BundleError as exc:
            raise BundleError(f"not written to {path}: " + str(exc).replace(str(staging), "the new bundle")) from None

    verified: list[Bundle] = []
    replace_directory(path, build)  # the old bundle stays until the new one is complete and verified
    return Bundle(path, verified[0].manifest)  # the same files, verified in staging: not hashed twice


def check_manifest_fields(manifest: dict[str, Any]) -> None:
    """The types the Bundle properties rely on, so a malformed manifest is refused on load with
    the field named, not met later as a traceback deep in a clinic's round."""
    if manifest["target"] not in ("v1", "v2"):
        raise ValueError(f"'target' must be 'v1' or 'v2', got {manifest['target']!r}")
    classes = manifest["classes"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise ValueError("'classes' must be a non-empty list of class names")
    if len(set(classes)) != len(classes):
        raise ValueError(f"'classes' lists a class twice: {classes}")
    shape = manifest["input_shape"]
    if not isinstance(shape, list) or len(shape) != 3 or not all(type(n) is int and n > 0 for n in shape):
        raise ValueError(f"'input_shape' must be [height, width, channels] of positive integers, got {shape!r}")
    if type(manifest["feature_dim"]) is not int or manifest["feature_dim"] <= 0:
        raise ValueError(f"'feature_dim' must be a positive integer, got {manifest['feature_dim']!r}")


SCORE_KEYS = ("top1", "macro_f1", "balanced_accuracy")
# Score records `qana info` prints (qana.cli.info): present means complete.
INFO_BACKENDS = ("float", "quantized", "akida", "akida_with_clinical_prior")


def check_optional_fields(manifest: dict[str, Any]) -> None:
    """The optional fields `qana info`, `qana evaluate` and `qana split --model` read: a wrong
    type is refused on load with the field named, not met later as a traceback."""
    for key in ("name", "ip_version", "akida_version", "input_dtype", "created"):
        if key in manifest and not isinstance(manifest[key], str):
            raise ValueError(f"'{key}' must be a string, got {manifest[key]!r}")
    for key in ("bits", "training", "metrics", "model_spec"):
        if key in manifest and not isinstance(manifest[key], dict):
            raise ValueError(f"'{key}' must be an object, got {manifest[key]!r}")
    if "feature_scale" in manifest and not _is_positive_number(manifest["feature_scale"]):
        raise ValueError(f"'feature_scale' must be a positive number, got {manifest['feature_scale']!r}")
    seed = manifest.get("training", {}).get("seed")
    if seed is not None and type(seed) is not int:
        raise ValueError(f"'training.seed' must be an integer, got {seed!r}")
    split = manifest.get("training", {}).get("split")
    if split is not None:
        if not isinstance(split, dict) or not all(type(v) is int and v >= 0 for v in split.values()):
            raise ValueError(f"'training.split' must map part names to image counts (integers >= 0), got {split!r}")
    _check_clinical_prior_entry(manifest.get("clinical_prior"))
    for part, scores in manifest.get("metrics", {}).items():
        if not isinstance(scores, dict):
            raise ValueError(f"'metrics.{part}' must be an object, got {scores!r}")
        for backend, result in scores.items():
            if backend.startswith("agreement"):
                if not _is_number(result):
                    raise ValueError(f"'metrics.{part}.{backend}' must be a number, got {result!r}")
            elif backend in INFO_BACKENDS or (isinstance(result, dict) and any(k in result for k in (*SCORE_KEYS, "n"))):
                # the backends `qana info` prints must be complete score records
                if not isinstance(result, dict) or not all(_is_number(result.get(k)) for k in SCORE_KEYS) or type(result.get("n")) is not int:
                    raise ValueError(f"'metrics.{part}.{backend}' must give numbers for {', '.join(SCORE_KEYS)} and an integer n")


def _check_clinical_prior_entry(entry: Any) -> None:
    if not entry:
        return  # no prior: an optional extra
    if not isinstance(entry, dict):
        raise ValueError(f"'clinical_prior' must be an object, got {entry!r}")
    file = entry.get("file")
    if not isinstance(file, str) or not file or Path(file).name != file:
        raise ValueError(f"'clinical_prior.file' must be a file name inside the bundle, got {file!r}")
    inputs = entry.get("inputs")
    if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
        raise ValueError(f"'clinical_prior.inputs' must be a list of metadata column names, got {inputs!r}")
    if not _is_number(entry.get("weight")) or entry["weight"] < 0:
        raise ValueError(f"'clinical_prior.weight' must be a number >= 0, got {entry.get('weight')!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_positive_number(value: Any) -> bool:
    return _is_number(value) and value > 0


def load_bundle(path: Path | str) -> Bundle:
    """Load and verify a bundle; raise BundleError naming the first problem."""
    path = Path(path)
    manifest_path = path / MANIFEST
    try:
        if not path.exists():
            raise BundleError(f"bundle folder not found: {path}")
        if not path.is_dir():
            raise BundleError(f"not a model bundle: {path} is a file, not a bundle folder")
        if manifest_path.exists() and not manifest_path.is_file():
            raise BundleError(f"not a model bundle: {manifest_path} is not a file")
        if not manifest_path.is_file():
            raise BundleError(f"not a model bundle: {path} has no {MANIFEST}")
    except OSError as exc:  # a name longer than the file system allows, a looping link
        raise BundleError(f"{path}: cannot be read as a bundle folder ({exc.strerror or exc})") from None
    try:
        manifest = json.loads(manifest_path.read_text())
    except (ValueError, RecursionError) as exc:  # JSON and Unicode errors, an integer of 4,300+ digits, deep nesting
        raise BundleError(f"{manifest_path}: not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    except OSError as exc:
        raise BundleError(f"{manifest_path}: cannot be read ({exc.strerror or exc})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{manifest_path}: expected a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"{manifest_path}: missing key(s) {', '.join(missing)}")
    version = manifest["format_version"]
    if type(version) is not int or version != FORMAT_VERSION:  # "1", 1.0 and true are not the format's integer
        raise BundleError(f"{manifest_path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    try:
        check_manifest_fields(manifest)
        check_optional_fields(manifest)
        check_view_count(manifest.get("test_time_views", 1), "test_time_views")
        preprocessing = manifest.get("preprocessing", {})
        if not isinstance(preprocessing, dict):
            raise ValueError("'preprocessing' must be an object")
        check_colour_constancy(preprocessing.get("colour_constancy", "none"))
    except ValueError as exc:
        raise BundleError(f"{manifest_path}: {exc}") from None
    files = manifest["files"]
    if not isinstance(files, dict):
        raise BundleError(f"{manifest_path}: 'files' must map file names to sha256")
    for name in (MODEL_FILE, HEAD_FILE):
        if name not in files:
            raise BundleError(f"{manifest_path}: no sha256 recorded for {name}")
    for name, expected in files.items():
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
            raise BundleError(f"{manifest_path}: 'files' entry {name!r} is not a plain file name inside the bundle")
        if not isinstance(expected, str) or len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
            raise BundleError(f"{manifest_path}: the recorded sha256 of {name} is not 64 lowercase hex digits ({expected!r})")
        file_path = path / name
        try:
            present = file_path.is_file()
            actual = sha256_file(file_path) if present else None
        except OSError as exc:  # e.g. a name longer than the file system allows
            raise BundleError(f"{manifest_path}: bundle file {name[:80]!r} cannot be read ({exc.strerror or exc})") from None
        if not present:
            if name in (MODEL_FILE, HEAD_FILE):
                raise BundleError(f"bundle file missing: {file_path}")
            continue  # optional extras (Keras models) are not shipped to clinics
        if actual != expected:
            raise BundleError(
                f"bundle file {file_path} has been modified: sha256 {actual[:12]}… does not match "
                f"the recorded {expected[:12]}…; refusing to load it"
            )
    return Bundle(path, manifest)


def default_bundle_path(target: str = "v2") -> Path:
    """The bundle shipped inside the package for a target ('v2' or 'v1')."""
    if target not in ("v2", "v1"):
        raise BundleError(f"unknown target {target!r}: expected 'v2' or 'v1'")
    return PACKAGE_BUNDLES / target


def load_default_bundle(target: str = "v2") -> Bundle:
    return load_bundle(default_bundle_path(target))


def _content_only(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """Drop what a copy, checkout or backup changes (times, owners, permissions) from a member."""
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o644
    return info


def pack_bundle(bundle: Bundle) -> bytes:
    """The bundle as one tar archive (what the coordinator sends to a clinic that lacks it).

    The archive depends on the files' bytes only, so the same bundle always packs to the same
    bytes: the coordinator's audit log names a backbone by the sha256 of this archive, and a
    copied or checked-out bundle must stay the same backbone version."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", dereference=True, format=tarfile.USTAR_FORMAT) as tar:
        for name in (MANIFEST, MODEL_FILE, HEAD_FILE):  # a linked file is sent as its content
            tar.add(bundle.path / name, arcname=name, filter=_content_only)
    return buf.getvalue()


def unpack_bundle(data: bytes, dest: Path | str, expected_id: str | None = None) -> Bundle:
    """Unpack a packed bundle into dest and verify it (and its id, when one is expected)."""
    dest = Path(dest)

    def build(staging: Path) -> None:
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                names = set(tar.getnames())
                if names != {MANIFEST, MODEL_FILE, HEAD_FILE}:
                    raise BundleError(f"packed bundle holds unexpected files: {sorted(names)}")
                tar.extractall(staging, filter="data")
        except tarfile.TarError as exc:
            raise BundleError(f"packed bundle is not a valid archive: {exc}") from None
        try:
            bundle = load_bundle(staging)
            verified.append(bundle)
        except BundleError as exc:
            # The temporary folder's name means nothing to whoever reads the message.
            where = str(exc).replace(f"{staging}{os.sep}", "").replace(str(staging), "the received bundle")
            raise BundleError(f"received bundle: {where}") from None
        if expected_id is not None and bundle.bundle_id != expected_id:
            raise BundleError(f"received bundle {bundle.bundle_id[:12]}… but {expected_id[:12]}… was announced")

    verified: list[Bundle] = []
    replace_directory(dest, build)  # a bad bundle never replaces the copy already cached
    return Bundle(dest, verified[0].manifest)  # the same files, verified in staging: not hashed twice
