"""Mails to the business (an event endpoint disabled after failing for 3 days) go through the
same outbox as customer notices: ``notifications.customer_id`` may be empty when
``notifications.recipient`` names the address; ``event_endpoints.contact_email`` is whom to
tell about that endpoint (else ``BILLING_EVENTS_CONTACT_EMAIL``).

Revision ID: 0018
Revises: 0016
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("notifications") as batch:
        batch.alter_column("customer_id", existing_type=sa.String(40), nullable=True)
        batch.add_column(sa.Column("recipient", sa.String(320), nullable=True))
    with op.batch_alter_table("event_endpoints") as batch:
        batch.add_column(sa.Column("contact_email", sa.String(320), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("event_endpoints") as batch:
        batch.drop_column("contact_email")
    op.execute("DELETE FROM notifications WHERE customer_id IS NULL")
    with op.batch_alter_table("notifications") as batch:
        batch.drop_column("recipient")
        batch.alter_column("customer_id", existing_type=sa.String(40), nullable=False)
