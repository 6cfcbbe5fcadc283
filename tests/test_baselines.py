"""The local-only and pooled baselines train as the federated clinics do (`simulations.baselines`)."""

from __future__ import annotations

import numpy as np
import pytest

import simulations.baselines as baselines
from qana.head import init_head
from simulations.config import SimConfig
from simulations.partition import ClinicPart, Partition


@pytest.mark.parametrize("method", [baselines.local_only, baselines.pooled])
@pytest.mark.parametrize("absent", ["keep", "train"])
def test_baselines_treat_classes_a_clinic_lacks_as_the_federation_is_told(monkeypatch, method, absent: str) -> None:
    # a clinic without class "c" must leave its column as received under "keep" (the federated
    # clinics' default) in the baselines too, or the comparison is between two recipes
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 40)
    x = (rng.normal(size=(80, 6)) + 2.0 * y[:, None]).clip(0).astype(np.float32)
    rows = np.arange(80)
    part = ClinicPart("clinic-a", rows, rows[rows % 4 != 0], rows[rows % 4 == 0])
    start = init_head(6, ("a", "b", "c"), 1.0, seed=1)
    trained = []

    def recording(head, features, labels, config, smote):
        out = real(head, features, labels, config, smote=smote)
        trained.append(out[0])
        return out

    real = baselines.train_local_head
    monkeypatch.setattr(baselines, "train_local_head", recording)
    method(SimConfig(rounds=2, local_epochs=3, absent_classes=absent), start, "v2", x, y, Partition("centre", (part,)))
    assert len(trained) == 2
    for head in trained:
        kept = bool(np.allclose(head.weights[:, 2], start.weights[:, 2]) and np.isclose(head.bias[2], start.bias[2]))
        assert kept is (absent == "keep")
