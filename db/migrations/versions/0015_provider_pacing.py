"""The shared schedule of payment-provider requests (``provider_pacing``): every worker takes
its Stripe requests' turns from it, so the configured cap holds across all of them.

Revision ID: 0015
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "provider_pacing",
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("next_free_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_provider_pacing")),
    )


def downgrade() -> None:
    op.drop_table("provider_pacing")
