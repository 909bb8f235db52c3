"""Subscription status changes: the audit trail of every status a subscription moved to.

Revision ID: 0004
Revises: 0003

Written by hand to match ``SubscriptionStatusChangeRow`` in db/models.py exactly (tests/db
compares them).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# Frozen here, as 0001 does: a later status gets its own revision.
_STATUSES = "'pending', 'trialing', 'active', 'past_due', 'paused', 'unpaid', 'canceled'"


def upgrade() -> None:
    op.create_table(
        "subscription_status_changes",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("subscription_id", sa.String(40), nullable=False),
        sa.Column("from_status", sa.String(16), nullable=False),
        sa.Column("to_status", sa.String(16), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.String(500), nullable=True),
        sa.CheckConstraint(
            f'"to_status" IN ({_STATUSES})',
            name=op.f("ck_subscription_status_changes_to_status"),
        ),
        sa.ForeignKeyConstraint(
            ["subscription_id"],
            ["subscriptions.id"],
            name=op.f("fk_subscription_status_changes_subscription_id_subscriptions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_subscription_status_changes")),
    )
    op.create_index(
        "ix_subscription_status_changes_subscription_id_changed_at",
        "subscription_status_changes",
        ["subscription_id", "changed_at"],
    )


def downgrade() -> None:
    op.drop_index(
        "ix_subscription_status_changes_subscription_id_changed_at",
        table_name="subscription_status_changes",
    )
    op.drop_table("subscription_status_changes")
