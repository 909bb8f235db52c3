"""The provider schedule becomes a ring of slots (``provider_pacing_slots``, ``billing.pacing``):
a slot is used again only a second and a margin after its last request was stamped, as it
left, so a worker that wakes late uses its slot late instead of giving up a turn that the
single-row schedule of fixed instants (``provider_pacing``, 0015) had already promised away.

The old schedule's table is dropped: its rows are only the next free instant of each paced
queue, worth nothing once no worker reads them. Workers of the older code still running when
this is applied fail to take a turn; their activity attempt fails before any request is sent,
and its retry runs on a worker of this code. The slots are created by the first worker that
paces each queue, all free.

Revision ID: 0025
Revises: 0024
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0025"
down_revision: str | Sequence[str] | None = "0024"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "provider_pacing_slots",
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("free_at", sa.Double(), nullable=False),
        sa.Column("planned_at", sa.Double(), nullable=False),
        sa.Column("held_by", sa.String(64), nullable=True),
        sa.Column("held_until", sa.Double(), nullable=True),
        sa.CheckConstraint("slot >= 0", name=op.f("ck_provider_pacing_slots_slot_not_negative")),
        sa.CheckConstraint(
            "(held_by IS NULL) = (held_until IS NULL)",
            name=op.f("ck_provider_pacing_slots_hold_has_lease"),
        ),
        sa.PrimaryKeyConstraint("name", "slot", name=op.f("pk_provider_pacing_slots")),
    )
    op.drop_table("provider_pacing")


def downgrade() -> None:
    op.create_table(
        "provider_pacing",
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("next_free_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_provider_pacing")),
    )
    op.drop_table("provider_pacing_slots")
