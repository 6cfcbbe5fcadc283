"""Class-incremental merge on the coordinator: heads whose class sets differ, and the audit record.

A clinic that introduces a class grows its head (`qana.head.grow_head`: the new class is
appended after the federation's order) and trains it. The coordinator merges such heads with
`qana.head.merge_aligned` (columns matched by class name; a clinic lacking a class contributes
no weight to that column), so every clinic then receives the same grown head, and each class
that enters the global head is recorded in the audit log with the clinic that brought it.

Not yet wired into `server.federation.Coordinator`: the wire protocol fixes the class count
per bundle (`protocols.messages.HeadSpec` comes from the bundle's head, and train replies are
checked against that shape), and Flower's strategies average arrays of equal shapes. Using
this in live rounds needs a `classes` list in the train reply (validated), this merge in
place of the strategy's array average when class sets differ, and bundles whose Akida head
layer is rebuilt for the grown class count (`AkidaRuntime.write_head` refuses other shapes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

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
) -> tuple[Head, list[tuple[str, str]]]:
    """Merge heads with differing class sets; record each class the global head gains.

    Updates are taken in clinic-id order, so the merged head (and the order of new classes:
    first seen in that order) does not depend on the order in which replies arrived. Returns
    the merged head and the (class, clinic) additions, which are also written to `audit`.
    """
    if not updates:
        raise ValueError("no clinic heads to merge")
    ids = [u.clinic_id for u in updates]
    if len(set(ids)) != len(ids):
        raise ValueError(f"more than one head from the same clinic: {sorted(ids)}")
    ordered = sorted(updates, key=lambda u: u.clinic_id)
    merged = merge_aligned([u.head for u in ordered], [float(u.num_examples) for u in ordered], base=global_classes)
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
