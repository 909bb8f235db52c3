"""Index for finance listings filtered by billing period (``period_from``/``period_to``).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_invoices_period_start_created_at_id", "invoices", ["period_start", "created_at", "id"]
    )


def downgrade() -> None:
    op.drop_index("ix_invoices_period_start_created_at_id", table_name="invoices")
