"""Class-incremental merge on the coordinator: heads whose class sets differ, and the audit record.

A clinic that introduces a class grows its head (`qana.head.grow_head`: the new class is
appended after the federation's order) and trains it. The coordinator merges such heads with
`qana.head.merge_aligned` (columns matched by class name; a clinic lacking a class contributes
no weight to that column), so every clinic then receives the same grown head, and each class
that enters the global head is recorded in the audit log with the clinic that brought it.

Used by `server.federation.Coordinator._train` in live rounds whenever the replies' class lists
differ (protocol v2 carries each head's class list); the Akida edge path merges its neurons over
the union of classes in `server.edge_rounds` and records additions the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from qana.head import Head, merge_aligned


class ClassAdditionSink(Protocol):
    def record_class_addition(self, run_id: str, round: int, class_name: str, clinic_id: str) -> Any: ...


@dataclass(frozen=True)
class ClinicHead:
    """One clinic's trained head in a round, with its FedAvg weight (training examples)."""

    clinic_id: str
    head: Head
    num_examples: int


def merge_class_incremental(
    global_classes: Sequence[str],
    updates: Sequence[ClinicHead],
    audit: ClassAdditionSink | None = None,
    run_id: str = "",
    round_: int = 0,
    round_head: Head | None = None,
) -> tuple[Head, list[tuple[str, str]]]:
    """Merge heads with differing class sets; record each class the global head gains.

    Updates are taken in clinic-id order, so the merged head (and the order of new classes:
    first seen in that order) does not depend on the order in which replies arrived. Returns
    the merged head and the (class, clinic) additions, which are also written to `audit`.

    `round_head` is the round's own classes as the configured strategy aggregated them (every
    clinic's head has those columns): they replace the example-weighted average of those
    columns, so adding a class is no way around fedmedian, fedtrimmedavg or krum. Only the new
    classes' columns are then averaged by name, over the clinics that bring them.
    """
    if not updates:
        raise ValueError("no clinic heads to merge")
    ids = [u.clinic_id for u in updates]
    if len(set(ids)) != len(ids):
        raise ValueError(f"more than one head from the same clinic: {sorted(ids)}")
    ordered = sorted(updates, key=lambda u: u.clinic_id)
    merged = merge_aligned([u.head for u in ordered], [float(u.num_examples) for u in ordered], base=global_classes)
    if round_head is not None:
        if round_head.classes != tuple(global_classes):
            raise ValueError(f"the strategy's head has classes {round_head.classes}, the round has {tuple(global_classes)}")
        c = len(global_classes)
        merged = Head(
            np.concatenate([round_head.weights, merged.weights[:, c:]], axis=1),
            np.concatenate([round_head.bias, merged.bias[c:]]),
            merged.classes,
            merged.feature_scale,
        )
    known = set(global_classes)
    additions = []
    for name in merged.classes:
        if name not in known:
            clinic = next(u.clinic_id for u in ordered if name in u.head.classes)
            additions.append((name, clinic))
    if audit is not None:
        for name, clinic in additions:
            audit.record_class_addition(run_id, round_, name, clinic)
    return merged, additions
