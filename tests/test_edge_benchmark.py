"""benchmarks/edge_learning.py: its feature cache survives a run killed while writing it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from benchmark_scripts import load_benchmark
from synthetic import make_synthetic_ham

from qana.bundle import load_bundle
from qana.data import load_dataset

TINY_V1 = Path(__file__).resolve().parent / "fixtures" / "bundles" / "tiny-v1"


def test_a_damaged_feature_cache_is_computed_again_and_replaced_whole(tmp_path: Path) -> None:
    bench = load_benchmark("edge_learning")
    bundle = load_bundle(TINY_V1)
    dataset = load_dataset(make_synthetic_ham(tmp_path / "ham", n_images=12, image_size=bundle.input_shape[0]).root, size=bundle.input_shape[0])
    cache = tmp_path / "cache"
    first = bench.cached_features(bundle, dataset, cache)
    (path,) = cache.glob("features-*.npy")
    path.write_bytes(path.read_bytes()[:90])  # as a run killed in np.save left it
    again = bench.cached_features(bundle, dataset, cache)
    np.testing.assert_array_equal(again, first)
    np.testing.assert_array_equal(np.load(path), first)
    assert sorted(p.name for p in cache.iterdir()) == [path.name]  # no temporary file left beside it
