"""Status ``needs_attention``: a subscription whose workflow parked it for an operator, with
the reason (``subscriptions.attention_reason``).

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

# Frozen here, as 0001 and 0004 do: a later status gets its own revision.
_BEFORE = "'pending', 'trialing', 'active', 'past_due', 'paused', 'unpaid', 'canceled'"
_AFTER = (
    "'pending', 'trialing', 'active', 'past_due', 'paused', 'unpaid', 'needs_attention', 'canceled'"
)


def _statuses(allowed: str) -> None:
    # Batch mode: SQLite cannot alter a CHECK constraint in place (the table is copied).
    with op.batch_alter_table("subscriptions") as batch:
        batch.drop_constraint(op.f("ck_subscriptions_status"), type_="check")
        batch.create_check_constraint(op.f("ck_subscriptions_status"), f'"status" IN ({allowed})')
    with op.batch_alter_table("subscription_status_changes") as batch:
        batch.drop_constraint(op.f("ck_subscription_status_changes_to_status"), type_="check")
        batch.create_check_constraint(
            op.f("ck_subscription_status_changes_to_status"), f'"to_status" IN ({allowed})'
        )


def upgrade() -> None:
    with op.batch_alter_table("subscriptions") as batch:
        batch.add_column(sa.Column("attention_reason", sa.String(2000), nullable=True))
    _statuses(_AFTER)


def downgrade() -> None:
    _statuses(_BEFORE)
    with op.batch_alter_table("subscriptions") as batch:
        batch.drop_column("attention_reason")
