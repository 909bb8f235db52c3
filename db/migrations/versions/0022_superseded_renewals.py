"""A renewal invoice voided as superseded no longer holds its period: one *live* renewal per
(subscription, period start), voided ones aside.

``create_invoice`` runs as a local activity inside the workflow task that decides the period's
invoice. When that task is discarded (worker killed, server restarted) and the task that
replaces it decides otherwise (a plan change or a pause applied first), the row the lost task
wrote is not the invoice the workflow bills. Before, the next ``create_invoice`` for that
period adopted it at the amount first written. Now it voids it (never charged: charges are
ordinary activities, scheduled only by completed tasks) and issues the invoice the workflow
decided, for the same period, which this index allows.

Revision ID: 0022
Revises: 0021
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0022"
down_revision = "0021"
branch_labels = None
depends_on = None

_LIVE_RENEWAL = "change_id IS NULL AND status <> 'void'"
_RENEWAL = "change_id IS NULL"


def upgrade() -> None:
    op.drop_index("uq_invoices_renewal_period", table_name="invoices")
    op.create_index(
        "uq_invoices_renewal_period",
        "invoices",
        ["subscription_id", "period_start"],
        unique=True,
        sqlite_where=sa.text(_LIVE_RENEWAL),
        postgresql_where=sa.text(_LIVE_RENEWAL),
    )


def downgrade() -> None:
    doubled = (
        op.get_bind()
        .execute(
            sa.text(
                "SELECT subscription_id, period_start FROM invoices WHERE change_id IS NULL "
                "GROUP BY subscription_id, period_start HAVING count(*) > 1 LIMIT 5"
            )
        )
        .all()
    )
    if doubled:
        raise RuntimeError(
            "cannot downgrade below 0022: these (subscription, period start) pairs have a "
            f"superseded renewal beside the live one: {[tuple(map(str, d)) for d in doubled]}"
        )
    op.drop_index("uq_invoices_renewal_period", table_name="invoices")
    op.create_index(
        "uq_invoices_renewal_period",
        "invoices",
        ["subscription_id", "period_start"],
        unique=True,
        sqlite_where=sa.text(_RENEWAL),
        postgresql_where=sa.text(_RENEWAL),
    )
