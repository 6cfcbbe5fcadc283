"""The shared head math: training, quantization for both targets, growth, serialisation."""

from __future__ import annotations

import numpy as np
import pytest

from qana import head as H
from qana.imbalance import smote_whitened
from qana.metrics import classification_metrics


def _separable(n: int = 700, d: int = 24, k: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.integers(10, 100, (k, d))
    y = rng.integers(0, k, n)
    x = np.clip(centres[y] + rng.normal(0, 12, (n, d)), 0, 127).astype(np.int32)
    return x, y


@pytest.mark.parametrize("target", ["v2", "v1"])
def test_trained_and_quantized_head_classifies_a_separable_set(target: str) -> None:
    x, y = _separable()
    head = H.train_head(H.init_head(x.shape[1], "abcd", feature_scale=1 / 64), x, y, H.TrainConfig(epochs=15))
    q = H.quantize_head(head, target)
    assert (H.predict(head, x) == y).mean() > 0.95
    assert (H.predict(q, x) == y).mean() > 0.9
    assert np.abs(q.weights).max() <= 2 ** (q.weight_bits - 1) - 1


def test_v2_bias_is_storable_as_int8_shifted() -> None:
    head = H.Head(np.ones((3, 2), np.float32), np.array([1000.0, -3.0], np.float32), ("a", "b"))
    q = H.quantize_head(head, "v2")
    mantissa, shift = H.split_bias_v2(q.bias)
    assert np.array_equal(mantissa.astype(np.int64) << shift.astype(np.int64), q.bias)
    assert np.abs(mantissa).max() <= 128


def test_proximal_term_keeps_weights_near_the_start() -> None:
    x, y = _separable(seed=1)
    start = H.init_head(x.shape[1], "abcd", feature_scale=1 / 64)
    free = H.train_head(start, x, y, H.TrainConfig(epochs=5))
    held = H.train_head(start, x, y, H.TrainConfig(epochs=5, proximal_mu=10.0))
    assert np.linalg.norm(held.weights - start.weights) < np.linalg.norm(free.weights - start.weights)


def test_growth_keeps_old_columns_and_class_order() -> None:
    head = H.init_head(5, ("a", "b"), seed=1)
    grown = H.grow_head(head, ("a", "b", "c"))
    assert grown.classes == ("a", "b", "c")
    np.testing.assert_array_equal(grown.weights[:, :2], head.weights)
    with pytest.raises(ValueError, match="must start with"):
        H.grow_head(head, ("b", "a", "c"))


def test_npz_round_trip_and_bad_input() -> None:
    head = H.init_head(4, ("a", "b", "c"), feature_scale=0.5, seed=2)
    back = H.head_from_npz(H.head_to_npz(head))
    np.testing.assert_array_equal(back.weights, head.weights)
    assert back.classes == head.classes and back.feature_scale == 0.5
    with pytest.raises(ValueError, match="not a valid head"):
        H.head_from_npz(b"not a head")
    with pytest.raises(ValueError, match="NaN or Inf"):
        H.Head(np.full((2, 2), np.nan), np.zeros(2), ("a", "b"))


def _npz(**arrays) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "No data left"),
        (H.head_to_npz(H.init_head(4, ("a", "b")))[:50], "not a zip file"),
        (_npz(weights=np.zeros((2, 2)), bias=np.zeros(2), classes=np.array("ab"), feature_scale=np.array(1.0)), "list of names"),
        (_npz(weights=np.zeros((2, 2)), bias=np.zeros(2), classes=np.array(["a", "b"]), feature_scale=np.ones(2)), "length-1"),
        (_npz(weights=np.zeros((2, 2)), bias=np.zeros(2), classes=np.array(["a", "b"]), feature_scale=np.array(0.0)), "above 0"),
    ],
)
def test_damaged_head_files_are_value_errors(data: bytes, message: str) -> None:
    # Callers (the clinic's deployed head, bundles) catch ValueError to name the file; anything else was a traceback.
    with pytest.raises(ValueError, match=f"not a valid head file: .*{message}"):
        H.head_from_npz(data)


def test_a_single_array_file_is_not_a_head() -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, np.zeros(3))
    with pytest.raises(ValueError, match=r"not a valid head file: a single array \(.npy\)"):
        H.head_from_npz(buf.getvalue())


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_feature_scale_must_be_a_positive_number(scale: float) -> None:
    with pytest.raises(ValueError, match="feature_scale must be a finite number above 0"):
        H.Head(np.zeros((2, 2)), np.zeros(2), ("a", "b"), scale)


def test_a_class_listed_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="lists a class twice"):
        H.grow_head(H.init_head(3, ("a", "b")), ("a", "b", "c", "c"))


def test_training_refuses_fractional_labels_and_empty_batches() -> None:
    head = H.init_head(3, ("a", "b"))
    x = np.ones((4, 3), np.int8)
    with pytest.raises(ValueError, match="integer class indices"):
        H.train_head(head, x, np.array([0.0, 1.7, 0.0, 1.0]))
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        H.train_head(head, x, np.array([0, 1, 0, 1]), H.TrainConfig(batch_size=0))


@pytest.mark.parametrize("shape", [(0, 4), (0, 1, 1, 4)])
def test_no_rows_give_no_predictions(shape) -> None:
    # e.g. a test part left empty once the images of classes the head lacks are removed
    head = H.init_head(4, ("a", "b"))
    empty = np.zeros(shape, np.uint8)
    assert H.predict(head, empty).shape == (0,)
    assert H.predict(H.quantize_head(head, "v2"), empty).shape == (0,)
    assert H.logits(head, empty).shape == (0, 2)
    assert H.train_head(head, empty, np.zeros(0, np.int64)) is head


def test_quantization_refuses_what_int8_and_int32_cannot_hold() -> None:
    head = H.Head(np.array([[1.0, -0.5]]), np.zeros(2), ("a", "b"))
    with pytest.raises(ValueError, match="weight_bits must be 2..8"):
        H.quantize_head(head, "v2", weight_bits=16)  # int8 storage would wrap 32767 to -1
    tiny = H.Head(np.full((2, 2), 1e-38), np.array([5.0, -5.0]), ("a", "b"))
    for target in ("v1", "v2"):
        with pytest.raises(ValueError, match="bias too large for its weights"):
            H.quantize_head(tiny, target)  # the +5 came back as a large negative integer


@pytest.mark.parametrize("target", ["v1", "v2"])
def test_all_zero_weights_keep_distinct_biases(target: str) -> None:
    head = H.Head(np.zeros((3, 3)), np.array([0.3, -0.2, 0.1]), ("a", "b", "c"))
    q = H.quantize_head(head, target)
    assert H.predict(q, np.zeros((1, 3), np.int8)).tolist() == [0]
    np.testing.assert_allclose(H.quantized_logits(q, np.zeros((1, 3)))[0], head.bias, rtol=0.02)


def test_smote_balances_classes_and_stays_in_range() -> None:
    x, y = _separable(seed=3)
    keep = (y != 3) | (np.arange(len(y)) % 20 == 0)
    x, y = x[keep], y[keep]
    xr, yr = smote_whitened(x, y, seed=0)
    counts = np.bincount(yr)
    assert counts.min() == counts.max()
    assert xr.min() >= x.min() and xr.max() <= x.max()
    np.testing.assert_array_equal(xr[: len(x)], x)


def test_smote_neighbour_count_is_per_class() -> None:
    # Class 1 is 15 tight pairs far apart: with k=1 every synthetic image lies inside a pair;
    # with k=5 most lie between pairs. A class of two images (class 2) must not force k=1 on it.
    rng = np.random.default_rng(0)
    centres = rng.uniform(0, 10, size=(15, 2))
    pairs = np.concatenate([centres, centres + 0.01])
    x = np.concatenate([rng.uniform(0, 10, size=(60, 2)), pairs, [[5.0, 5.0], [5.5, 5.5]]])
    y = np.array([0] * 60 + [1] * 30 + [2] * 2)
    xr, yr = smote_whitened(x, y, seed=0)
    assert np.bincount(yr).tolist() == [60, 60, 60]
    synthetic = xr[len(x) :][yr[len(x) :] == 1]
    gap = np.min(np.linalg.norm(synthetic[:, None, :] - pairs[None, :, :], axis=2), axis=1)
    assert np.mean(gap > 0.1) > 0.3


def test_smote_with_enough_images_everywhere_is_one_call() -> None:
    # the head stage's data (every class far above k): exactly imblearn's SMOTE with k=5
    from imblearn.over_sampling import SMOTE
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(1)
    x = rng.normal(size=(90, 3))
    y = np.array([0] * 50 + [1] * 25 + [2] * 15)
    xr, yr = smote_whitened(x, y, seed=4, variance=1.0)
    pca = PCA(n_components=3, whiten=True, random_state=4).fit(x)
    z, ref_y = SMOTE(sampling_strategy={1: 50, 2: 50}, k_neighbors=5, random_state=4).fit_resample(pca.transform(x), y)
    np.testing.assert_array_equal(yr, ref_y)
    np.testing.assert_allclose(xr[len(x) :], np.clip(pca.inverse_transform(z[len(x) :]), x.min(0), x.max(0)), atol=1e-5)


@pytest.mark.parametrize(("labels", "pred", "what"), [([-1, 0], [2, 1], "labels"), ([0, 1], [0, 3], "predictions")])
def test_metrics_refuse_indices_outside_the_classes(labels, pred, what) -> None:
    # numpy would count -1 (the "class the head lacks" marker) as the last class
    with pytest.raises(ValueError, match=f"{what} must be class indices 0..2"):
        classification_metrics(np.array(labels), np.array(pred), ("a", "b", "c"))


def test_metrics_ignore_absent_classes_in_macro_averages() -> None:
    m = classification_metrics(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), ("a", "b", "c"))
    assert m["top1"] == 0.75
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    assert m["per_class"]["c"]["support"] == 0
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]


def test_absent_classes_keep_their_columns_only_when_asked() -> None:
    """Restricted softmax: a clinic without images of a class leaves that class's column untouched."""
    from qana.head import Head, TrainConfig, train_head

    rng = np.random.default_rng(0)
    head = Head(rng.normal(0, 0.1, (6, 4)).astype(np.float32), rng.normal(0, 0.1, 4).astype(np.float32), ("a", "b", "c", "d"), 1.0)
    x = rng.normal(0, 1, (80, 6)).astype(np.float32)
    y = rng.integers(0, 2, 80)  # only classes a and b here
    kept = train_head(head, x, y, TrainConfig(epochs=3, l2=1e-2, proximal_mu=0.1, absent_classes="keep"))
    np.testing.assert_array_equal(kept.weights[:, 2:], head.weights[:, 2:])
    np.testing.assert_array_equal(kept.bias[2:], head.bias[2:])
    assert not np.allclose(kept.weights[:, :2], head.weights[:, :2])
    pushed = train_head(head, x, y, TrainConfig(epochs=3, absent_classes="train"))
    assert np.all(pushed.bias[2:] < head.bias[2:])  # the default pushes classes it never sees down
    with pytest.raises(ValueError, match="absent_classes"):
        train_head(head, x, y, TrainConfig(absent_classes="freeze"))


# --------------------------------------------------------------------------- refusals found by the s34 audit


def test_labels_must_be_one_dimensional() -> None:
    # (N, 1) passed the row count and failed inside np.bincount with "object too deep for desired array"
    head = H.init_head(3, ("a", "b"))
    with pytest.raises(ValueError, match=r"labels must be a 1-D array of class indices, not shape \(4, 1\)"):
        H.train_head(head, np.ones((4, 3), np.int8), np.array([[0], [1], [0], [1]]))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_training_refuses_features_that_are_not_finite(bad: float) -> None:
    # they trained to a NaN head, reported as "head contains NaN or Inf" (and at the clinic as a too large step)
    x, y = _separable(n=60, d=4, k=2)
    x = x.astype(np.float32)
    x[7, 2] = bad
    with pytest.raises(ValueError, match=r"features contain NaN or Inf \(1 row\(s\), first row 7\)"):
        H.train_head(H.init_head(4, ("a", "b")), x, y)


def _stored_npz(**arrays: np.ndarray) -> bytes:
    """np.savez of `arrays` where each value may also be raw bytes (written as that member's content)."""
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for key, value in arrays.items():
            if isinstance(value, np.ndarray):
                member = io.BytesIO()
                np.save(member, value)
                value = member.getvalue()
            z.writestr(f"{key}.npy", value)
    return buf.getvalue()


def _npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _valid_head_arrays() -> dict[str, np.ndarray]:
    return {"weights": np.zeros((4, 2), np.float32), "bias": np.zeros(2, np.float32),
            "classes": np.array(["a", "b"]), "feature_scale": np.array(1.0)}


def _central_entry_patched(offset: int, value: int) -> bytes:
    """A valid head file with a 16-bit field of its first central directory entry changed."""
    import struct

    data = bytearray(H.head_to_npz(H.init_head(4, ("a", "b"))))
    struct.pack_into("<H", data, data.index(b"PK\x01\x02") + offset, value)
    return bytes(data)


def _deflate_damaged() -> bytes:
    """A savez_compressed head whose compressed weights stream is broken (zlib.error inside zipfile)."""
    import io
    import struct
    import zipfile

    buf = io.BytesIO()
    np.savez_compressed(buf, **{**_valid_head_arrays(), "weights": np.arange(400, dtype=np.float32).reshape(200, 2)})
    data = bytearray(buf.getvalue())
    at = zipfile.ZipFile(io.BytesIO(bytes(data))).getinfo("weights.npy").header_offset
    name_length, extra_length = struct.unpack_from("<HH", data, at + 26)  # of the local header
    start = at + 30 + name_length + extra_length
    data[start : start + 8] = b"\xff" * 8
    return bytes(data)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        # a 1 KB file claiming a 4 TiB array: numpy's MemoryError escaped
        (_stored_npz(**{**_valid_head_arrays(), "weights": _npy_header((2**20, 2**20)) + bytes(64)}), "'weights' claims"),
        (_npy_header((2**20, 2**20)) + bytes(64), r"a single array \(.npy\)"),  # np.load read it in full: MemoryError
        (_central_entry_patched(8, 0x0001), "encrypted"),  # RuntimeError escaped
        (_central_entry_patched(10, 99), "compression method"),  # NotImplementedError escaped
        (_central_entry_patched(6, 163), "version"),  # NotImplementedError escaped
        (_deflate_damaged(), "decompressing"),  # zlib.error escaped
    ],
)
def test_every_damaged_head_file_is_a_value_error_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=f"not a valid head file: .*{reason}"):
        H.head_from_npz(data)


def test_a_damaged_file_never_has_an_empty_reason() -> None:
    # a local header's extra-field length past the end: zipfile's bare EOFError() gave "not a valid head file: "
    data = bytearray(H.head_to_npz(H.init_head(4, ("a", "b"))))
    data[29] = 6
    with pytest.raises(ValueError, match=r"not a valid head file: \S"):
        H.head_from_npz(bytes(data))


def test_a_small_head_file_cannot_make_numpy_allocate_what_it_claims() -> None:
    import tracemalloc

    data = _stored_npz(**{**_valid_head_arrays(), "weights": _npy_header((2**13, 2**13)) + bytes(64)})  # claims 256 MiB
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"'weights' claims shape \(8192, 8192\) of float32: 268435456 bytes"):
            H.head_from_npz(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"reading a {len(data)}-byte file allocated {peak / 2**20:.0f} MiB"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("classes", np.array([b"a", b"b"]), "'classes' must be names \\(strings\\), not \\|S1"),  # loaded as "b'a'"
        ("classes", np.array([1, 2]), "'classes' must be names \\(strings\\), not int64"),  # loaded as "1"
        ("classes", np.array([True, False]), "'classes' must be names \\(strings\\), not bool"),
        ("weights", np.ones((4, 2)) + 5j, "'weights' must be real numbers, not complex128"),  # imaginary part dropped
        ("weights", np.array([["1", "2"]] * 4), "'weights' must be real numbers, not <U1"),  # parsed as numbers
        ("bias", np.array(["0", "0"]), "'bias' must be real numbers, not <U1"),
        ("feature_scale", np.array("0.5"), "'feature_scale' must be real numbers, not <U3"),
    ],
)
def test_head_files_with_names_that_are_not_strings_or_numbers_that_are_not_real_are_refused(key, value, message) -> None:
    with pytest.raises(ValueError, match=f"not a valid head file: {message}"):
        H.head_from_npz(_npz(**{**_valid_head_arrays(), key: value}))


def test_a_head_refuses_class_names_that_are_not_strings_and_weights_that_are_not_real() -> None:
    # Head(w, b, (1, 2)) was accepted and its own npz round trip turned the classes into ("1", "2")
    with pytest.raises(ValueError, match="class names must be strings, not int"):
        H.Head(np.ones((3, 2)), np.zeros(2), (1, 2))
    with pytest.raises(ValueError, match="head weights must be real numbers, not complex128"):
        H.Head(np.ones((3, 2)) + 1j, np.zeros(2), ("a", "b"))
    with pytest.raises(ValueError, match="head bias must be real numbers, not <U1"):
        H.Head(np.ones((3, 2)), np.array(["0", "1"]), ("a", "b"))
    with pytest.raises(ValueError, match="head feature_scale must be a real number, not '0.5'"):
        H.Head(np.ones((3, 2)), np.zeros(2), ("a", "b"), "0.5")


def test_v2_bias_encoding_cannot_round_past_int32() -> None:
    # 2**31 - 1 passed the 32-bit check, then int8 << shift rounded it to 64 << 25 == 2**31 (-2**31 as int32)
    w = np.zeros((3, 2), np.float32)
    w[0, 0] = 127.0  # scale 1: bias/scale is the bias
    head = H.Head(w, np.array([2147483500.0, 0.0], np.float32), ("a", "b"))
    with pytest.raises(ValueError, match="bias too large for its weights"):
        H.quantize_head(head, "v2")
    ok = H.Head(w, np.array([127 * 2.0**24, 0.0], np.float32), ("a", "b"))
    assert H.quantize_head(ok, "v2").bias.tolist() == [127 << 24, 0]  # the largest positive v2 bias still fits


@pytest.mark.parametrize("shape", [(3, 0), (0, 2)])
def test_a_head_without_classes_or_features_is_refused(shape) -> None:
    # quantize_head then failed inside numpy, grow/align reported an empty head as "NaN or Inf"
    classes = tuple("ab"[: shape[1]])
    with pytest.raises(ValueError, match=rf"a head needs at least one feature and one class, not weights of shape \({shape[0]}, {shape[1]}\)"):
        H.Head(np.zeros(shape), np.zeros(shape[1]), classes)
    with pytest.raises(ValueError, match="not a valid head file: a head needs at least one feature and one class"):
        H.head_from_npz(_npz(weights=np.zeros(shape), bias=np.zeros(shape[1]), classes=np.array(classes, dtype="<U1"),
                             feature_scale=np.array(1.0)))


def test_selecting_no_classes_is_refused() -> None:
    with pytest.raises(ValueError, match="a head needs at least one feature and one class"):
        H.select_classes(H.init_head(4, ("a", "b")), [])


def test_select_classes_takes_any_iterable_once() -> None:
    # a generator was consumed by the membership check: a head with classes () and weights (4, 0), no error
    head = H.init_head(4, ("akiec", "bcc", "nv"))
    picked = H.select_classes(head, (c for c in ["nv", "bcc"]))
    assert picked.classes == ("nv", "bcc")
    np.testing.assert_array_equal(picked.weights, head.weights[:, [2, 1]])
