"""Audit log: ledger, chain head, artefacts and typed projections.

Revision ID: 0001_audit_log
Revises:
Create Date: 2025-11-21
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001_audit_log"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

GENESIS_HASH = "0" * 64


def upgrade() -> None:
    chain_head = op.create_table(
        "audit_chain_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("entry_hash", sa.String(length=64), nullable=False),
        sa.Column("signer", sa.String(length=16), nullable=True),
        sa.Column("signature", sa.String(length=128), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_chain_head")),
    )
    # The row writers lock.  Created here, once, so no writer ever races to create it.
    op.bulk_insert(chain_head, [{"id": 1, "seq": 0, "entry_hash": GENESIS_HASH, "signer": None, "signature": None}])

    op.create_table(
        "audit_entries",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("version", sa.String(length=32), nullable=True),
        sa.Column("run_id", sa.String(length=200), nullable=True),
        sa.Column("round", sa.Integer(), nullable=True),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("entry_hash", sa.String(length=64), nullable=False),
        sa.Column("signer", sa.String(length=16), nullable=False),
        sa.Column("signature", sa.String(length=128), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_entries")),
        sa.UniqueConstraint("entry_hash", name=op.f("uq_audit_entries_entry_hash")),
    )
    op.create_index(op.f("ix_audit_entries_kind"), "audit_entries", ["kind"])
    op.create_index(op.f("ix_audit_entries_created_at"), "audit_entries", ["created_at"])
    op.create_index(op.f("ix_audit_entries_run_id"), "audit_entries", ["run_id"])

    op.create_table(
        "audit_artifacts",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_audit_artifacts")),
    )

    op.create_table(
        "audit_versions",
        sa.Column("version", sa.String(length=32), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("parent", sa.String(length=32), nullable=True),
        sa.Column("backbone", sa.String(length=32), nullable=True),
        sa.Column("run_id", sa.String(length=200), nullable=True),
        sa.Column("round", sa.Integer(), nullable=True),
        sa.Column("strategy", sa.String(length=200), nullable=True),
        sa.Column("strategy_config", sa.Text(), nullable=False),
        sa.Column("aggregate_metrics", sa.Text(), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["seq"], ["audit_entries.seq"], name=op.f("fk_audit_versions_seq_audit_entries")),
        sa.ForeignKeyConstraint(
            ["sha256"], ["audit_artifacts.sha256"], name=op.f("fk_audit_versions_sha256_audit_artifacts")
        ),
        sa.ForeignKeyConstraint(
            ["parent"], ["audit_versions.version"], name=op.f("fk_audit_versions_parent_audit_versions")
        ),
        sa.ForeignKeyConstraint(
            ["backbone"], ["audit_versions.version"], name=op.f("fk_audit_versions_backbone_audit_versions")
        ),
        sa.PrimaryKeyConstraint("version", name=op.f("pk_audit_versions")),
        sa.UniqueConstraint("kind", "number", name="uq_audit_versions_kind_number"),
        sa.UniqueConstraint("seq", name=op.f("uq_audit_versions_seq")),
    )
    op.create_index(op.f("ix_audit_versions_sha256"), "audit_versions", ["sha256"])

    op.create_table(
        "audit_participants",
        sa.Column("version", sa.String(length=32), nullable=False),
        sa.Column("clinic_id", sa.String(length=200), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("num_examples", sa.BigInteger(), nullable=False),
        sa.Column("metrics", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["version"], ["audit_versions.version"], name=op.f("fk_audit_participants_version_audit_versions")
        ),
        sa.ForeignKeyConstraint(["seq"], ["audit_entries.seq"], name=op.f("fk_audit_participants_seq_audit_entries")),
        sa.PrimaryKeyConstraint("version", "clinic_id", name=op.f("pk_audit_participants")),
    )
    op.create_index(op.f("ix_audit_participants_clinic_id"), "audit_participants", ["clinic_id"])
    op.create_index(op.f("ix_audit_participants_seq"), "audit_participants", ["seq"])

    op.create_table(
        "audit_deployments",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("clinic_id", sa.String(length=200), nullable=False),
        sa.Column("version", sa.String(length=32), nullable=False),
        sa.ForeignKeyConstraint(["seq"], ["audit_entries.seq"], name=op.f("fk_audit_deployments_seq_audit_entries")),
        sa.ForeignKeyConstraint(
            ["version"], ["audit_versions.version"], name=op.f("fk_audit_deployments_version_audit_versions")
        ),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_deployments")),
    )
    op.create_index(op.f("ix_audit_deployments_clinic_id"), "audit_deployments", ["clinic_id"])
    op.create_index(op.f("ix_audit_deployments_version"), "audit_deployments", ["version"])

    op.create_table(
        "audit_rejections",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("run_id", sa.String(length=200), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("clinic_id", sa.String(length=200), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["seq"], ["audit_entries.seq"], name=op.f("fk_audit_rejections_seq_audit_entries")),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_rejections")),
    )
    op.create_index(op.f("ix_audit_rejections_clinic_id"), "audit_rejections", ["clinic_id"])

    op.create_table(
        "audit_class_additions",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("run_id", sa.String(length=200), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("class_name", sa.String(length=200), nullable=False),
        sa.Column("clinic_id", sa.String(length=200), nullable=False),
        sa.ForeignKeyConstraint(
            ["seq"], ["audit_entries.seq"], name=op.f("fk_audit_class_additions_seq_audit_entries")
        ),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_class_additions")),
    )
    op.create_index(op.f("ix_audit_class_additions_clinic_id"), "audit_class_additions", ["clinic_id"])

    op.create_table(
        "audit_rollbacks",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("version", sa.String(length=32), nullable=False),
        sa.Column("previous_version", sa.String(length=32), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("actor", sa.String(length=200), nullable=True),
        sa.ForeignKeyConstraint(["seq"], ["audit_entries.seq"], name=op.f("fk_audit_rollbacks_seq_audit_entries")),
        sa.ForeignKeyConstraint(
            ["version"], ["audit_versions.version"], name=op.f("fk_audit_rollbacks_version_audit_versions")
        ),
        sa.ForeignKeyConstraint(
            ["previous_version"],
            ["audit_versions.version"],
            name=op.f("fk_audit_rollbacks_previous_version_audit_versions"),
        ),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_rollbacks")),
    )
    op.create_index(op.f("ix_audit_rollbacks_version"), "audit_rollbacks", ["version"])


def downgrade() -> None:
    for table in (
        "audit_rollbacks",
        "audit_class_additions",
        "audit_rejections",
        "audit_deployments",
        "audit_participants",
        "audit_versions",
        "audit_artifacts",
        "audit_entries",
        "audit_chain_head",
    ):
        op.drop_table(table)
