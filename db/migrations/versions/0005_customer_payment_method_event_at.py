"""Customers remember the newest provider event about their default card, so an older event
delivered late (webhooks arrive in any order) cannot bring back an older card.

Revision ID: 0005
Revises: 0004

Written by hand to match ``CustomerRow`` in db/models.py exactly (tests/db compares them).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # batch_alter_table: SQLite cannot alter tables in place.
    with op.batch_alter_table("customers") as batch:
        batch.add_column(
            sa.Column("default_payment_method_event_at", sa.DateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("customers") as batch:
        batch.drop_column("default_payment_method_event_at")
