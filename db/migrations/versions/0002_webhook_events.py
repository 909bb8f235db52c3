"""Provider webhook events, keyed by the provider's event id to recognise redeliveries.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25

Written by hand to match ``WebhookEventRow`` in db/models.py exactly (tests/db compares them).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "webhook_events",
        sa.Column("id", sa.String(255), nullable=False),
        sa.Column("type", sa.String(100), nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("subscription_id", sa.String(40), nullable=True),
        sa.Column("detail", sa.String(500), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_events")),
    )
    op.create_index(
        op.f("ix_webhook_events_subscription_id"), "webhook_events", ["subscription_id"]
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_webhook_events_subscription_id"), table_name="webhook_events")
    op.drop_table("webhook_events")
