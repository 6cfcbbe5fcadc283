"""benchmarks/prior_variants.py: its `today` variant is the shipped prior, and the interaction features are the pairs they claim."""

import numpy as np
from benchmark_scripts import load_benchmark

from qana import clinical
from qana.classes import CLASS_NAMES


def _module():
    return load_benchmark("prior_variants")


def _encoded(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(CLASS_NAMES)
    sites = np.array(clinical.SITES)[rng.integers(0, len(clinical.SITES), n)]
    ages = rng.integers(5, 90, n).astype(float)
    sexes = np.array(clinical.SEXES)[rng.integers(0, 2, n)]
    return clinical.encode(list(ages), list(sexes), list(sites)), labels


def test_today_is_the_shipped_prior() -> None:
    module = _module()
    encoded, labels = _encoded(120, 0)
    features, epochs, l2 = module.VARIANTS["today"]
    ours = module.fit_log_odds(features(encoded), labels, epochs, l2, seed=3)(encoded)
    shipped = clinical.log_odds(clinical.fit_prior(encoded, labels, CLASS_NAMES, seed=3), encoded)
    np.testing.assert_allclose(ours, shipped, rtol=1e-5, atol=1e-6)


def test_interactions_mark_exactly_the_pairs_of_an_image() -> None:
    module = _module()
    encoded = clinical.encode([80.0], ["male"], ["face"])
    x = module.with_interactions(encoded)
    n_age, n_sex, n_site = len(clinical.AGE_BANDS) + 1, len(clinical.SEXES) + 1, len(clinical.SITES) + 1
    assert x.shape == (1, encoded.shape[1] + n_age * n_site + n_sex * n_site + n_age * n_sex)
    pairs = x[0, encoded.shape[1] :]
    age, sex, site = len(clinical.AGE_BANDS) - 1, clinical.SEXES.index("male"), clinical.SITES.index("face")
    expected = np.zeros_like(pairs)
    expected[age * n_site + site] = 1
    expected[n_age * n_site + sex * n_site + site] = 1
    expected[n_age * n_site + n_sex * n_site + age * n_sex + sex] = 1
    np.testing.assert_array_equal(pairs, expected)
