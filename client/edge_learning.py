"""A clinic's side of `akida-edge` rounds: Akida 1.0 on-chip learning on its cached spikes.

The v1 bundle's backbone runs once per image (the clinic's feature cache, via
`Clinic.prepare`); every round then learns on those binary features with Akida's own
algorithm (`qana.edge.learn_edge_head`, a 1-layer Akida model in the software backend, which
gives bit for bit the state that learning on the images through the whole bundle model gives).
Learning continues from the global head the coordinator sent: its neurons and their learning
state are written into the layer, so each round refines the federation's prototypes instead of
starting over. The reply is the learned neurons with their usage (how many local training
samples each won), nothing else.

Before anything is sent or reported, the Akida model's decisions on the clinic's features must
equal the numpy reference (`predict_edge` vs `predict_edge_reference`), as in the gradient mode:
a clinic never reports numbers its device would not reproduce.

Class-incremental rounds follow the gradient mode's rules (`Clinic._with_new_classes`): the
global head carries the federation's class list; images of classes it lacks are left out of
learning and evaluation (`client.clinic.labels_for`). A clinic configured with `new-classes`
grows the head by each such class from `new-classes-from-round` on, if it has training images
of it: Akida's `add_classes` appends neurons-per-class fresh neurons (seeded random weights,
unlearned state, as `qana.edge.learn_edge_head` creates them), learning trains them on-chip,
and the reply lists the round's classes then the new ones.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.clinic import (
    DEPLOYED_EDGE_DIR,
    Clinic,
    ClinicError,
    Prepared,
    device_agreement,
    evaluation_metrics,
    labels_for,
)
from protocols.edge_messages import (
    EdgeEvaluateSettings,
    EdgeTrainSettings,
    check_reply_classes,
)
from protocols.messages import (
    M_DEVICE_AGREEMENT,
    M_NUM_EXAMPLES,
    M_TRAIN_TOP1,
    ProtocolError,
)
from qana.atomic import replace_directory
from qana.edge import (
    EdgeHead,
    EdgeParams,
    as_binary_features,
    choose_edge_params,
    learn_edge_head,
    predict_edge,
    predict_edge_reference,
)


@dataclass
class EdgeClinic:
    """Edge-learning rounds for one clinic (its data, caches and split are the `Clinic`'s)."""

    clinic: Clinic

    def prepare(self, bundle_id: str, classes: tuple[str, ...] = ()) -> tuple[Prepared, np.ndarray]:
        """The bundle's cached features as 0/1 spikes; a clear error for a bundle that cannot learn on-chip.

        `classes` are the global head's: the clinic's metadata may use them (and its own new classes).
        """
        prep = self.clinic.prepare(bundle_id, classes)
        if prep.bundle.target != "v1":
            raise ClinicError(
                f"akida-edge learning needs a v1 bundle (Akida 1.0 learns on-chip); bundle {bundle_id[:12]}… targets {prep.bundle.target!r}"
            )
        try:
            spikes = as_binary_features(prep.features, prep.bundle.feature_dim, "backbone features")
        except ValueError as exc:
            raise ClinicError(str(exc)) from None
        return prep, spikes

    def _agreement(self, head: EdgeHead, spikes: np.ndarray) -> tuple[np.ndarray, float]:
        """Akida's predictions and their agreement with the reference; ClinicError if they differ."""
        chip = predict_edge(head, spikes)
        return chip, device_agreement(chip, predict_edge_reference(head, spikes), "Akida's edge-head predictions", "the reference")

    def choose_params(self, bundle_id: str, seed: int) -> tuple[EdgeParams, int]:
        """This clinic's own choice of edge settings on its training part (`qana.edge.choose_edge_params`)."""
        prep, spikes = self.prepare(bundle_id)
        if len(prep.train_idx) < 2:
            raise ClinicError("too few local training images to choose edge-learning settings")
        labels = labels_for(prep.dataset, prep.bundle.classes)  # -1: a class only this clinic has (new-classes)
        idx = prep.train_idx[labels[prep.train_idx] >= 0]
        try:
            params = choose_edge_params(
                spikes[idx], labels[idx], prep.bundle.classes, groups=prep.dataset.lesion_ids[idx], seed=seed
            )
        except ValueError as exc:
            raise ClinicError(f"cannot choose edge-learning settings: {exc}") from None
        return params, len(idx)

    def grown_classes(self, head: EdgeHead, prep: Prepared, settings: EdgeTrainSettings) -> tuple[str, ...]:
        """The head's classes plus this clinic's new classes, once it is their round and it has training images of them.

        The same rule as `Clinic._with_new_classes` (gradient mode), so a clinic introduces a class
        the same way whichever learning mode the federation runs.
        """
        if settings.server_round < self.clinic.config.new_classes_from_round:
            return head.classes
        names = prep.dataset.class_names
        present = {names[i] for i in np.unique(prep.dataset.labels[prep.train_idx])}
        extra = [c for c in self.clinic.config.new_classes if c not in head.classes and c in present]
        return (*head.classes, *extra)

    def train(self, head: EdgeHead, settings: EdgeTrainSettings) -> tuple[EdgeHead, dict[str, int | float]]:
        """One round: continue Akida learning from the global head on the local training spikes.

        Learning runs on the images whose class the (possibly grown) head has; new classes get
        fresh neurons seeded by the round, appended after the global classes.
        """
        prep, spikes = self.prepare(settings.bundle_id, head.classes)
        if len(prep.train_idx) == 0:
            raise ClinicError("no local training images after the held-out split")
        classes = self.grown_classes(head, prep, settings)
        try:
            check_reply_classes(classes, head.classes, "this clinic's edge head")
        except ProtocolError as exc:
            raise ClinicError(f"{exc} (node-config new-classes)") from None
        labels = labels_for(prep.dataset, classes)
        idx = prep.train_idx[labels[prep.train_idx] >= 0]
        if len(idx) == 0:
            raise ClinicError(f"none of the local training images has a class of the global head ({', '.join(classes)})")
        x, y = spikes[idx], labels[idx]
        try:
            learned = learn_edge_head(
                x, y, classes, settings.neurons_per_class, settings.num_weights,
                settings.learning_competition, seed=settings.seed + settings.server_round, init=head, epochs=settings.epochs,
            )
        except ValueError as exc:
            raise ClinicError(f"edge learning failed: {exc}") from None
        _, agreement = self._agreement(learned, x)
        metrics: dict[str, int | float] = {
            M_NUM_EXAMPLES: len(y),
            M_TRAIN_TOP1: float(np.mean(predict_edge_reference(learned, x) == y)),
            M_DEVICE_AGREEMENT: agreement,
        }
        return learned, metrics

    def evaluate(self, head: EdgeHead, settings: EdgeEvaluateSettings) -> dict[str, int | float]:
        """The global head's Akida predictions on the held-out images; the head is kept as deployed.

        Held-out images of classes the head does not have (yet) are left out of the metrics.
        """
        prep, spikes = self.prepare(settings.bundle_id, head.classes)
        if len(prep.eval_idx) == 0:
            raise ClinicError("no held-out images to evaluate on (the clinic has too few lesions)")
        labels = labels_for(prep.dataset, head.classes)[prep.eval_idx]
        known = labels >= 0
        if not known.any():
            raise ClinicError(f"none of the held-out images has a class of the global head ({', '.join(head.classes)})")
        idx = prep.eval_idx[known]
        chip, agreement = self._agreement(head, spikes[idx])
        self._save_deployed(prep, head, settings)
        return evaluation_metrics(labels[known], chip, head.classes, agreement)

    def _save_deployed(self, prep: Prepared, head: EdgeHead, settings: EdgeEvaluateSettings) -> None:
        """Keep the current global edge head (`qana.edge.edge_bundle_model` turns it into the chip model)."""
        info = {
            "bundle_id": prep.bundle.bundle_id,
            "head_id": settings.head_id,
            "server_round": settings.server_round,
            "learning": "akida-edge",
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

        def build(folder: Path) -> None:
            (folder / "edge_head.npz").write_bytes(head.to_npz())
            (folder / "deployed.json").write_text(json.dumps(info, indent=2) + "\n")

        replace_directory(self.clinic.config.cache / DEPLOYED_EDGE_DIR / prep.bundle.bundle_id, build)
