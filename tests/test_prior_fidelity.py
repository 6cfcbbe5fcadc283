"""benchmarks/prior_fidelity.py: the logit-scale ratio ignores per-image offsets, and the prior is added to both models alike."""

from __future__ import annotations

import numpy as np
import pytest
from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("prior_fidelity")


def test_the_scale_ratio_sees_a_stretch_but_not_an_offset(bench) -> None:
    z = np.random.default_rng(0).normal(0, 3, (50, 7))
    assert bench.logit_scale_ratio(z, z + 5.0) == pytest.approx(1.0)
    assert bench.logit_scale_ratio(z, 1.2 * z + np.arange(50)[:, None]) == pytest.approx(1.2)


def test_a_larger_chip_logit_lets_the_same_prior_move_fewer_decisions(bench) -> None:
    # one image, two classes: the prior favours class 1 by 1.0; float prefers class 0 by 0.6, the chip (x2) by 1.2
    labels = np.array([1])
    float_logits = np.array([[0.6, 0.0, 0, 0, 0, 0, 0]])
    term = np.array([[0.0, 1.0, 0, 0, 0, 0, 0]])
    rows = bench.fidelity_by_weight(labels, float_logits, 2 * float_logits, term, (0.0, 1.0))
    (_, f0, a0), (_, f1, a1) = rows
    assert f0["top1"] == a0["top1"] == 0.0
    assert f1["top1"] == 1.0 and a1["top1"] == 0.0
