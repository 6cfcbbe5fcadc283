"""qana-sim with `--learning akida-edge`: the edge settings, and pooled / local-only edge baselines.

The comparison is the gradient one (`simulations.baselines`) with Akida's on-chip learning in
place of head training: the same cached backbone spikes, the same split, the same scoring
(`baselines.score`, which scores an `EdgeHead` with the chip's arithmetic, `predict_edge_reference`).

- settings: every clinic chooses its own (`qana.edge.choose_edge_params` on its training part,
  lesion-grouped, seed = the experiment's seed) and the federation takes
  `qana.edge.federation_edge_params` of them: what the coordinator's `auto` mode does with the
  clinics' replies. The driver computes them once and passes them to the ServerApp explicitly,
  so the federation and both baselines learn with exactly the same settings.
- pooled: one edge head learned on the union of all clinics' training parts;
- local-only: each clinic learns alone on its own training part.

"Round" r of a baseline is one more pass of Akida learning over the training data, continued
from round r-1's neurons with seed `seed + r`, which is what a clinic does in federated round r
(`client.edge_learning.EdgeClinic.train`); every method starts from the same fresh neurons
(`server.edge_rounds.fresh_edge_head`, seeded like the coordinator's).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from qana.edge import (
    EdgeHead,
    EdgeParams,
    choose_edge_params,
    federation_edge_params,
    learn_edge_head,
)
from qana.head import Head, head_from_npz
from server.edge_rounds import fresh_edge_head
from simulations.baselines import Scores, score
from simulations.config import SimConfig
from simulations.partition import Partition

EDGE_EPOCHS = 1


class EdgeSimError(ValueError):
    """The data cannot be used for edge learning (e.g. a silent backbone); the message says why."""


def head_from_artifact(data: bytes) -> Head | EdgeHead:
    """An audit-logged head of either learning mode, from its .npz bytes."""
    try:
        return EdgeHead.from_npz(data)
    except ValueError:
        return head_from_npz(data)


def federation_params(cfg: SimConfig, features: np.ndarray, labels: np.ndarray, lesion_ids: np.ndarray, partition: Partition, classes: tuple[str, ...]) -> tuple[EdgeParams, dict[str, Any]]:
    """The federation's edge settings from every clinic's own choice; (settings, each clinic's choice or why it had none)."""
    choices: list[EdgeParams] = []
    by_clinic: dict[str, Any] = {}
    for part in partition.clinics:
        try:
            chosen = choose_edge_params(features[part.train], labels[part.train], classes, groups=lesion_ids[part.train], seed=cfg.seed)
        except ValueError as exc:
            by_clinic[part.clinic_id] = {"error": str(exc)}
            continue
        choices.append(chosen)
        by_clinic[part.clinic_id] = {
            "num_weights": chosen.num_weights, "neurons_per_class": chosen.neurons_per_class,
            "learning_competition": chosen.learning_competition, "median_active": chosen.median_active,
        }
    if not choices:
        reasons = "; ".join(f"{k}: {v['error']}" for k, v in by_clinic.items())
        raise EdgeSimError(f"no clinic could choose edge-learning settings ({reasons})")
    return federation_edge_params(choices), by_clinic


def run_config(params: EdgeParams) -> dict[str, Any]:
    """The ServerApp's edge keys: the settings the baselines use, so the federation uses them too."""
    return {
        "learning": "akida-edge",
        "edge-num-weights": int(params.num_weights),
        "edge-neurons-per-class": int(params.neurons_per_class),
        "edge-learning-competition": float(params.learning_competition),
        "edge-epochs": EDGE_EPOCHS,
    }


def _learn(cfg: SimConfig, head: EdgeHead, x: np.ndarray, y: np.ndarray, server_round: int) -> EdgeHead:
    return learn_edge_head(
        x, y, head.classes, head.neurons_per_class, head.num_weights, head.learning_competition,
        seed=cfg.seed + server_round, init=head, epochs=EDGE_EPOCHS,
    )


def pooled(cfg: SimConfig, params: EdgeParams, target: str, features: np.ndarray, labels: np.ndarray, partition: Partition, classes: tuple[str, ...], on_round: Callable[[int], None] | None = None) -> list[Scores]:
    """Edge learning on all clinics' training parts together; scores for rounds 0..R."""
    train = np.concatenate([p.train for p in partition.clinics])
    x, y = features[train], labels[train]
    head = fresh_edge_head(features.shape[1], classes, params, cfg.seed)
    curve = [score(lambda _c: head, target, features, labels, partition, classes)]
    for r in range(1, cfg.rounds + 1):
        head = _learn(cfg, head, x, y, r)
        curve.append(score(lambda _c: head, target, features, labels, partition, classes))
        if on_round is not None:
            on_round(r)
    return curve


def local_only(cfg: SimConfig, params: EdgeParams, target: str, features: np.ndarray, labels: np.ndarray, partition: Partition, classes: tuple[str, ...], on_round: Callable[[int], None] | None = None) -> list[Scores]:
    """Every clinic learns alone on its own training part; each scored on its own test part; rounds 0..R."""
    start = fresh_edge_head(features.shape[1], classes, params, cfg.seed)
    heads = {p.clinic_id: start for p in partition.clinics}
    curve = [score(lambda c: heads[c], target, features, labels, partition, classes)]
    for r in range(1, cfg.rounds + 1):
        for part in partition.clinics:
            heads[part.clinic_id] = _learn(cfg, heads[part.clinic_id], features[part.train], labels[part.train], r)
        curve.append(score(lambda c: heads[c], target, features, labels, partition, classes))
        if on_round is not None:
            on_round(r)
    return curve
