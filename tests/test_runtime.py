"""The Akida runtime: features, writing a head on-chip, and agreement with the integer reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qana import head as head_math
from qana.bundle import load_bundle
from qana.runtime import AkidaRuntime, RuntimeErrorQana

BUNDLES = Path(__file__).parent / "fixtures" / "bundles"


@pytest.fixture(params=["v2", "v1"])
def runtime(request) -> AkidaRuntime:
    return AkidaRuntime(load_bundle(BUNDLES / f"tiny-{request.param}"), device="software")


def _images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 1, 1, 3))
    noise = rng.integers(-30, 30, (n, size, size, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def test_features_are_integers_of_the_declared_width(runtime: AkidaRuntime) -> None:
    feats = runtime.features(_images(10))
    assert feats.shape == (10, runtime.bundle.feature_dim)
    assert np.issubdtype(feats.dtype, np.integer)
    if runtime.bundle.target == "v1":
        assert set(np.unique(feats)) <= {0, 1}, "Akida 1.0 features must be binary spikes"


def test_written_head_on_chip_agrees_with_reference(runtime: AkidaRuntime) -> None:
    images = _images(64, seed=1)
    feats = runtime.features(images)
    labels = np.arange(64) % 7
    trained = head_math.train_head(runtime.bundle.load_head(), feats, labels, head_math.TrainConfig(epochs=5))
    q = head_math.quantize_head(trained, runtime.bundle.target)
    runtime.write_head(q)
    chip = runtime.logits(images)
    reference = head_math.quantized_logits(q, feats)
    np.testing.assert_allclose(chip, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())
    assert (chip.argmax(1) == head_math.predict(q, feats)).all()


def test_head_layers_on_cached_features_give_the_full_models_logits(runtime: AkidaRuntime) -> None:
    """What the clinic checks every round without running the backbone again."""
    images = _images(48, seed=2)
    feats = runtime.features(images).astype(np.int16)  # as the clinic's feature cache stores them
    base = runtime.bundle.load_head()
    for seed in (3, 4):  # a second head must be seen too: the head model is not a stale copy
        rng = np.random.default_rng(seed)
        head = head_math.Head(
            rng.normal(0, 1, base.weights.shape).astype(np.float32) * float(np.abs(base.weights).max()),
            rng.normal(0, 1, base.bias.shape).astype(np.float32),
            base.classes,
            base.feature_scale,
        )
        q = head_math.quantize_head(head, runtime.bundle.target)
        runtime.write_head(q)
        full = runtime.logits(images)
        from_features = runtime.head_logits(feats)
        assert np.array_equal(from_features, full)
        assert (from_features.argmax(1) == head_math.predict(q, feats)).all()
    with pytest.raises(RuntimeErrorQana, match="features must be"):
        runtime.head_logits(feats[:, :-1])


def test_wrong_images_are_refused_with_a_clear_error(runtime: AkidaRuntime) -> None:
    with pytest.raises(RuntimeErrorQana, match="uint8"):
        runtime.features(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(RuntimeErrorQana, match="images must be"):
        runtime.features(np.zeros((2, 16, 16, 3), np.uint8))


def test_a_head_for_other_features_is_refused(runtime: AkidaRuntime) -> None:
    base = runtime.bundle.load_head()
    other = head_math.Head(np.zeros((base.num_features + 1, base.num_classes), np.float32), base.bias, base.classes, base.feature_scale)
    with pytest.raises(RuntimeErrorQana, match="do not fit"):
        runtime.write_head(head_math.quantize_head(other, runtime.bundle.target))


def test_a_grown_head_gets_a_head_layer_of_its_size_and_matches_the_reference(runtime: AkidaRuntime) -> None:
    """Class-incremental learning: the chip runs a head with more classes than the bundle's."""
    images = _images(48, seed=5)
    feats = runtime.features(images)
    base = runtime.bundle.load_head()
    classes = (*runtime.bundle.classes, "scc", "new2")
    rng = np.random.default_rng(6)
    grown = head_math.Head(
        rng.normal(0, 1, (base.num_features, len(classes))).astype(np.float32) * float(np.abs(base.weights).max()),
        rng.normal(0, 1, len(classes)).astype(np.float32),
        classes,
        base.feature_scale,
    )
    q = head_math.quantize_head(grown, runtime.bundle.target)
    runtime.write_head(q)
    assert runtime.num_classes == len(classes)
    reference = head_math.quantized_logits(q, feats)
    for chip in (runtime.logits(images), runtime.head_logits(feats)):
        assert chip.shape == (48, len(classes))
        np.testing.assert_allclose(chip, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())
    # and back to the bundle's class count: the backbone's features are unchanged throughout
    q7 = head_math.quantize_head(base, runtime.bundle.target)
    runtime.write_head(q7)
    assert runtime.num_classes == base.num_classes
    np.testing.assert_array_equal(runtime.features(images), feats)
    np.testing.assert_allclose(runtime.logits(images), head_math.quantized_logits(q7, feats), rtol=1e-5, atol=1e-5 * np.abs(reference).max())


@pytest.mark.parametrize("target", ["v2", "v1"])
def test_a_grown_head_is_built_on_the_checked_backbone_not_a_new_read_of_the_file(target: str, tmp_path: Path) -> None:
    # helper-14 (session 26): the rebuild read model.fbz again, without load_bundle's hash check,
    # so a file changed on disk after loading ended up behind logits() but not features().
    import shutil

    bundle = load_bundle(shutil.copytree(BUNDLES / f"tiny-{target}", tmp_path / "b"))
    runtime = AkidaRuntime(bundle, device="software")
    images = _images(16, seed=7)
    feats = runtime.features(images)
    bundle.model_path.unlink()  # whatever is on disk now must not matter
    base = bundle.load_head()
    q = head_math.quantize_head(head_math.grow_head(base, (*base.classes, "scc")), target)
    runtime.write_head(q)
    reference = head_math.quantized_logits(q, feats)
    np.testing.assert_allclose(runtime.logits(images), reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())
    np.testing.assert_array_equal(runtime.features(images), feats)


def test_one_shared_runtime_per_bundle_and_device_in_a_process() -> None:
    """Long-lived processes (Ray workers of the simulation) must not load the model per message."""
    from qana.runtime import shared_runtime

    v2, v1 = load_bundle(BUNDLES / "tiny-v2"), load_bundle(BUNDLES / "tiny-v1")
    a = shared_runtime(v2, "software")
    assert shared_runtime(load_bundle(BUNDLES / "tiny-v2"), "software") is a
    assert shared_runtime(v1, "software") is not a
    assert shared_runtime(v2, "auto") is not a


# ----------------------------------------------------------------------------- refused heads (helper-14, session 26)


def _written(runtime: AkidaRuntime, images: np.ndarray) -> tuple[head_math.QuantizedHead, np.ndarray, np.ndarray]:
    """Write a valid trained head; return it with the chip's logits for `images` and their features."""
    feats = runtime.features(images)
    trained = head_math.train_head(runtime.bundle.load_head(), feats, np.arange(len(images)) % 7, head_math.TrainConfig(epochs=3))
    q = head_math.quantize_head(trained, runtime.bundle.target)
    runtime.write_head(q)
    return q, runtime.logits(images), feats


def _bad_heads(q: head_math.QuantizedHead, layer_bits: int, target: str) -> dict[str, tuple[head_math.QuantizedHead, str]]:
    from dataclasses import replace

    too_big = q.weights.astype(np.int64).copy()
    too_big[0, 0] = 1 << (layer_bits - 1)  # one past the layer's largest weight
    odd_bias = q.bias.astype(np.int64).copy()
    odd_bias[0] = 12345 if target == "v2" else 1 << 40  # v2: not int8 << shift; v1: beyond the int32 threshold
    grown = head_math.QuantizedHead(
        np.concatenate([q.weights, q.weights[:, :1]], axis=1), np.append(q.bias, 0), q.scale, q.weight_bits, (*q.classes, "scc")
    )
    return {
        "weight beyond the layer's bits": (replace(q, weights=too_big), "weights"),
        "more weight bits than the layer": (replace(q, weight_bits=layer_bits + 4), "bits"),
        "fractional weights": (replace(q, weights=q.weights.astype(np.float64) + 0.5), "integers"),
        "bias of the wrong length": (replace(q, bias=q.bias[:-1]), "bias"),
        "unrepresentable bias": (replace(q, bias=odd_bias), "bias"),
        "zero scale": (replace(q, scale=0.0), "scale"),
        "NaN scale": (replace(q, scale=float("nan")), "scale"),
        "negative scale": (replace(q, scale=-0.5), "scale"),
        "grown head with a zero scale": (replace(grown, scale=0.0), "scale"),
        "grown head with an unrepresentable bias": (replace(grown, bias=np.append(odd_bias, 0)), "bias"),
    }


def test_a_refused_head_is_refused_before_anything_is_written(runtime: AkidaRuntime) -> None:
    """Before session 27 the layer was changed first and checked after: a refused head was left
    half-written (weights new, bias old; or a grown layer with a zero bias), a weight of 200
    wrapped to -56, and a zero scale was stored or crashed after writing."""
    images = _images(24, seed=8)
    q, before, feats = _written(runtime, images)
    layer_bits = int(runtime.head_layer.parameters.weights_bits)
    for what, (bad, named) in _bad_heads(q, layer_bits, runtime.bundle.target).items():
        with pytest.raises(RuntimeErrorQana, match=named):
            runtime.write_head(bad)
        assert runtime.num_classes == q.weights.shape[1], what
        np.testing.assert_array_equal(runtime.logits(images), before, err_msg=what)
        np.testing.assert_array_equal(runtime.head_logits(feats), before, err_msg=what)


def test_a_head_with_fewer_bits_than_the_layer_is_written_exactly(runtime: AkidaRuntime) -> None:
    layer_bits = int(runtime.head_layer.parameters.weights_bits)
    images = _images(24, seed=9)
    feats = runtime.features(images)
    q = head_math.quantize_head(runtime.bundle.load_head(), runtime.bundle.target, weight_bits=layer_bits - 1)
    runtime.write_head(q)
    reference = head_math.quantized_logits(q, feats)
    np.testing.assert_allclose(runtime.logits(images), reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())


def test_no_images_give_no_logits_not_a_numpy_error(runtime: AkidaRuntime) -> None:
    side = runtime.bundle.input_shape[0]
    empty = np.zeros((0, side, side, 3), np.uint8)
    assert runtime.features(empty).shape == (0, runtime.bundle.feature_dim)
    assert runtime.logits(empty).shape == (0, runtime.num_classes)
    assert runtime.head_logits(np.zeros((0, runtime.bundle.feature_dim), np.int32)).shape == (0, runtime.num_classes)
    with pytest.raises(RuntimeErrorQana, match="images must be"):
        runtime.logits(np.zeros((0, side + 1, side, 3), np.uint8))


def test_concurrent_first_calls_share_one_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    """shared_runtime promises one runtime per bundle and device: two threads asking at once
    must not both load the model (akida never frees it) and get runtimes whose heads diverge."""
    import threading
    import time

    import qana.runtime

    built: list[object] = []

    class SlowRuntime:
        def __init__(self, bundle, device) -> None:
            time.sleep(0.2)  # loading a model takes a while: the window the race needs
            built.append(self)

    monkeypatch.setattr(qana.runtime, "_SHARED", {})
    monkeypatch.setattr(qana.runtime, "AkidaRuntime", SlowRuntime)
    bundle = load_bundle(BUNDLES / "tiny-v2")
    got: list[object] = []
    start = threading.Barrier(2)

    def ask() -> None:
        start.wait()
        got.append(qana.runtime.shared_runtime(bundle, "software"))

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 1 and got[0] is got[1]


def test_a_model_file_cut_short_is_a_bundle_error_not_a_crash(tmp_path: Path) -> None:
    """akida 2.19.3 dies with SIGSEGV reading some truncated files; a bundle written from one has
    a matching hash, so only reading it tells. Run in a child so a crash fails this test, not the run."""
    import subprocess
    import sys

    src = load_bundle(BUNDLES / "tiny-v2")
    data = src.model_path.read_bytes()
    (tmp_path / "model.fbz").write_bytes(data[: len(data) // 3])
    script = f"""
from pathlib import Path
from qana.bundle import BundleError, load_bundle, write_bundle
from qana.runtime import AkidaRuntime
src = load_bundle({str(src.path)!r})
manifest = {{k: v for k, v in src.manifest.items() if k not in ("files", "format_version", "clinical_prior")}}
bundle = write_bundle({str(tmp_path / "bundle")!r}, Path({str(tmp_path / "model.fbz")!r}), src.head_path.read_bytes(), manifest)
try:
    AkidaRuntime(bundle, device="software")
except BundleError as exc:
    print("REFUSED:", exc)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, f"the process died (exit {done.returncode}): {done.stderr[-500:]}"
    assert "REFUSED:" in done.stdout and "model.fbz" in done.stdout and "not a readable Akida model" in done.stdout


def test_switching_between_class_counts_reuses_each_counts_model(runtime: AkidaRuntime) -> None:
    """akida never frees a model (helper-14: +113 MB over 200 switches 7 <-> 8 classes); each
    class count's model is built once and the current head written into it."""
    images = _images(16, seed=10)
    feats = runtime.features(images)
    base = runtime.bundle.load_head()
    models = {}
    for round_ in range(3):
        for classes in (base.classes, (*base.classes, "scc")):
            rng = np.random.default_rng(round_ * 10 + len(classes))
            head = head_math.Head(
                rng.normal(0, 1, (base.num_features, len(classes))).astype(np.float32) * float(np.abs(base.weights).max()),
                rng.normal(0, 1, len(classes)).astype(np.float32), classes, base.feature_scale,
            )
            q = head_math.quantize_head(head, runtime.bundle.target)
            runtime.write_head(q)
            assert models.setdefault(len(classes), runtime.model) is runtime.model
            reference = head_math.quantized_logits(q, feats)
            for chip in (runtime.logits(images), runtime.head_logits(feats)):
                np.testing.assert_allclose(chip, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())


def test_a_run_folder_without_a_file_manifest_still_loads(tmp_path: Path) -> None:
    """qana.train runs the converted model from its run folder through a Bundle with no 'files'
    record; the model-file probe must not need one (helper-16: every new training crashed there)."""
    import shutil

    from qana.bundle import Bundle

    shutil.copyfile(BUNDLES / "tiny-v2" / "model.fbz", tmp_path / "model.fbz")
    src = load_bundle(BUNDLES / "tiny-v2")
    manifest = {"input_shape": list(src.input_shape), "feature_dim": src.feature_dim, "test_time_views": 1}
    runtime = AkidaRuntime(Bundle(tmp_path, manifest), device="software")
    assert runtime.features(_images(2)).shape == (2, src.feature_dim)


def test_a_module_in_the_working_directory_does_not_break_the_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -c` puts the working directory first on the import path; a statistics.py there
    broke the child's `import akida` and every bundle was 'not a readable Akida model'."""
    import qana.runtime

    (tmp_path / "statistics.py").write_text("raise ImportError('shadowed')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(qana.runtime, "_PROBED", set())
    AkidaRuntime(load_bundle(BUNDLES / "tiny-v2"), device="software")
