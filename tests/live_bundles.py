"""Test bundles derived from the tiny fixtures (written at test time, verified like real bundles)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "bundles"


def spiking_tiny_v1(dest: Path) -> Path:
    """tiny-v1 whose last three layers fire (threshold 0): its random backbone then emits varied spikes.

    The shipped tiny-v1 fixture is silent (all-zero features: a random backbone whose
    BatchNorms were never fitted to data), which edge learning cannot learn from.
    """
    import akida

    from qana.bundle import load_bundle, write_bundle

    src = load_bundle(FIXTURES / "tiny-v1")
    model = akida.Model(str(src.model_path))
    for layer in model.layers:
        if layer.name in ("sep3_sep", "sep4_sep", "last_sep"):
            layer.set_variable("threshold", np.zeros_like(layer.get_variable("threshold")))
    dest.mkdir(parents=True, exist_ok=True)
    model.save(str(dest / "model.fbz"))
    manifest = {k: v for k, v in src.manifest.items() if k not in ("files", "format_version")}
    return write_bundle(dest / "bundle", dest / "model.fbz", src.head_path.read_bytes(), json.loads(json.dumps(manifest))).path


def with_test_time_views(src_path: Path, dest: Path, views: int) -> Path:
    """A copy of a bundle that averages `views` test-time views (same model and head files)."""
    from qana.bundle import load_bundle, write_bundle

    src = load_bundle(src_path)
    manifest = {k: v for k, v in src.manifest.items() if k not in ("files", "format_version")}
    manifest["test_time_views"] = views
    return write_bundle(dest, src.model_path, src.head_path.read_bytes(), json.loads(json.dumps(manifest))).path


def with_clinical_prior(src_path: Path, dest: Path, prior) -> Path:
    """A copy of a bundle carrying `prior` (qana.clinical.ClinicalPrior) as its clinical.npz."""
    from qana.bundle import load_bundle, write_bundle
    from qana.clinical import PRIOR_FILE, manifest_entry, prior_to_npz

    src = load_bundle(src_path)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / PRIOR_FILE).write_bytes(prior_to_npz(prior))
    manifest = {k: v for k, v in src.manifest.items() if k not in ("files", "format_version")}
    manifest["clinical_prior"] = manifest_entry(prior)
    extras = {PRIOR_FILE: dest / PRIOR_FILE}
    return write_bundle(dest / "bundle", src.model_path, src.head_path.read_bytes(), json.loads(json.dumps(manifest)), extras).path
