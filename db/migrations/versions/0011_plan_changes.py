"""Plan and quantity changes: seats on subscriptions, proration invoices keyed by their change.

* ``customers.default_card_brand`` / ``default_card_last4``: the card on file, for reads.
* ``subscriptions.quantity`` (seats; the plan's ``amount_minor`` is the price of one).
* ``invoices.change_id``: the plan change an invoice was issued for (NULL for a renewal).
  The one-invoice-per-period rule becomes a partial unique index over renewals only
  (``change_id IS NULL``), and a change's invoice is unique by its change: a change applied at
  the very instant a period renews gives one renewal and one proration invoice, never a
  collision and never two of either.

Revision ID: 0011
Revises: 0014
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("customers") as batch:
        batch.add_column(sa.Column("default_card_brand", sa.String(32), nullable=True))
        batch.add_column(sa.Column("default_card_last4", sa.String(4), nullable=True))
    with op.batch_alter_table("subscriptions") as batch:
        batch.add_column(sa.Column("quantity", sa.Integer(), server_default="1", nullable=False))
        batch.create_check_constraint(op.f("ck_subscriptions_quantity_positive"), "quantity >= 1")
    with op.batch_alter_table("invoices") as batch:
        batch.add_column(sa.Column("change_id", sa.String(200), nullable=True))
        batch.drop_constraint(op.f("uq_invoices_subscription_id_period_start"), type_="unique")
        batch.create_unique_constraint(op.f("uq_invoices_change_id"), ["change_id"])
    op.create_index(
        "uq_invoices_renewal_period",
        "invoices",
        ["subscription_id", "period_start"],
        unique=True,
        sqlite_where=sa.text("change_id IS NULL"),
        postgresql_where=sa.text("change_id IS NULL"),
    )


def downgrade() -> None:
    # Change invoices would break the per-period rule the older schema enforces.
    op.execute(
        "DELETE FROM customer_balance_entries WHERE invoice_id IN "
        "(SELECT id FROM invoices WHERE change_id IS NOT NULL)"
    )
    op.execute(
        "DELETE FROM invoice_lines WHERE invoice_id IN "
        "(SELECT id FROM invoices WHERE change_id IS NOT NULL)"
    )
    op.execute(
        "DELETE FROM payments WHERE invoice_id IN "
        "(SELECT id FROM invoices WHERE change_id IS NOT NULL)"
    )
    op.execute(
        "DELETE FROM payment_attempts WHERE invoice_id IN "
        "(SELECT id FROM invoices WHERE change_id IS NOT NULL)"
    )
    op.execute(
        "DELETE FROM notifications WHERE invoice_id IN "
        "(SELECT id FROM invoices WHERE change_id IS NOT NULL)"
    )
    op.execute("DELETE FROM invoices WHERE change_id IS NOT NULL")
    op.drop_index("uq_invoices_renewal_period", table_name="invoices")
    with op.batch_alter_table("invoices") as batch:
        batch.drop_constraint(op.f("uq_invoices_change_id"), type_="unique")
        batch.create_unique_constraint(
            op.f("uq_invoices_subscription_id_period_start"), ["subscription_id", "period_start"]
        )
        batch.drop_column("change_id")
    with op.batch_alter_table("subscriptions") as batch:
        batch.drop_constraint(op.f("ck_subscriptions_quantity_positive"), type_="check")
        batch.drop_column("quantity")
    with op.batch_alter_table("customers") as batch:
        batch.drop_column("default_card_last4")
        batch.drop_column("default_card_brand")
