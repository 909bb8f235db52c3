"""Customer mails and events for the business: the notification outbox gets a delivery
status (attempts, last error, Message-ID), customers a mail locale and an opt-out of
non-essential mails; new tables for event endpoints, events, deliveries and their attempts.

Revision ID: 0013
Revises: 0015
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0015"
branch_labels = None
depends_on = None

# Frozen here: a later status gets its own revision.
_NOTICE_STATUSES = "'pending', 'sent', 'failed', 'skipped'"
_DELIVERY_STATUSES = "'pending', 'delivered', 'failed'"


def upgrade() -> None:
    with op.batch_alter_table("customers") as batch:
        batch.add_column(sa.Column("locale", sa.String(35), nullable=True))
        batch.add_column(
            sa.Column("mail_opt_out", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    with op.batch_alter_table("notifications") as batch:
        batch.add_column(
            sa.Column("status", sa.String(16), nullable=False, server_default="pending")
        )
        batch.add_column(sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("last_error", sa.String(500), nullable=True))
        batch.add_column(sa.Column("message_id", sa.String(250), nullable=True))
        batch.add_column(sa.Column("failed_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_check_constraint(
            op.f("ck_notifications_status"), f'"status" IN ({_NOTICE_STATUSES})'
        )
        batch.create_check_constraint(
            op.f("ck_notifications_attempts_nonnegative"), "attempts >= 0"
        )
        batch.create_index("ix_notifications_status_created_at", ["status", "created_at"])
    # Notices a sender already delivered by other means (none in this codebase) stay sent.
    op.execute("UPDATE notifications SET status = 'sent' WHERE sent_at IS NOT NULL")

    op.create_table(
        "event_endpoints",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("url", sa.String(2000), nullable=False),
        sa.Column("url_digest", sa.String(64), nullable=False),
        sa.Column("description", sa.String(500), nullable=True),
        sa.Column("event_types", sa.JSON(), nullable=False),
        sa.Column("secret", sa.String(100), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False, server_default=sa.true()),
        sa.Column("disabled_reason", sa.String(500), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_event_endpoints")),
        sa.UniqueConstraint("url_digest", name=op.f("uq_event_endpoints_url_digest")),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("subscription_id", sa.String(40), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("object_id", sa.String(40), nullable=False),
        sa.Column("object", sa.JSON(), nullable=False),
        sa.Column("dedupe_key", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
        sa.UniqueConstraint("dedupe_key", name=op.f("uq_events_dedupe_key")),
        sa.UniqueConstraint(
            "subscription_id", "sequence", name=op.f("uq_events_subscription_id_sequence")
        ),
        sa.CheckConstraint("sequence >= 1", name=op.f("ck_events_sequence_positive")),
    )
    op.create_index("ix_events_created_at_id", "events", ["created_at", "id"])
    op.create_table(
        "event_deliveries",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("event_id", sa.String(40), nullable=False),
        sa.Column("endpoint_id", sa.String(40), nullable=False),
        sa.Column("subscription_id", sa.String(40), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.String(500), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_event_deliveries")),
        sa.ForeignKeyConstraint(
            ["event_id"], ["events.id"], name=op.f("fk_event_deliveries_event_id_events")
        ),
        sa.ForeignKeyConstraint(
            ["endpoint_id"],
            ["event_endpoints.id"],
            name=op.f("fk_event_deliveries_endpoint_id_event_endpoints"),
        ),
        sa.UniqueConstraint(
            "event_id", "endpoint_id", name=op.f("uq_event_deliveries_event_id_endpoint_id")
        ),
        sa.CheckConstraint(
            f'"status" IN ({_DELIVERY_STATUSES})', name=op.f("ck_event_deliveries_status")
        ),
    )
    op.create_index(
        "ix_event_deliveries_stream",
        "event_deliveries",
        ["endpoint_id", "subscription_id", "status", "sequence"],
    )
    op.create_index(
        "ix_event_deliveries_status_dispatched_at", "event_deliveries", ["status", "dispatched_at"]
    )
    op.create_table(
        "event_delivery_attempts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("delivery_id", sa.String(40), nullable=False),
        sa.Column("attempted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.String(500), nullable=True),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_event_delivery_attempts")),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            ["event_deliveries.id"],
            name=op.f("fk_event_delivery_attempts_delivery_id_event_deliveries"),
        ),
    )
    op.create_index(
        "ix_event_delivery_attempts_delivery_id", "event_delivery_attempts", ["delivery_id"]
    )


def downgrade() -> None:
    op.drop_table("event_delivery_attempts")
    op.drop_table("event_deliveries")
    op.drop_table("events")
    op.drop_table("event_endpoints")
    with op.batch_alter_table("notifications") as batch:
        batch.drop_index("ix_notifications_status_created_at")
        batch.drop_constraint(op.f("ck_notifications_attempts_nonnegative"), type_="check")
        batch.drop_constraint(op.f("ck_notifications_status"), type_="check")
        for column in ("dispatched_at", "failed_at", "message_id", "last_error", "attempts"):
            batch.drop_column(column)
        batch.drop_column("status")
    with op.batch_alter_table("customers") as batch:
        batch.drop_column("mail_opt_out")
        batch.drop_column("locale")
