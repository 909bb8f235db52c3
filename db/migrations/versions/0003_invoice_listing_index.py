"""Index for finance listings: invoices in (created_at, id) keyset order.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_invoices_created_at_id", "invoices", ["created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_invoices_created_at_id", table_name="invoices")
