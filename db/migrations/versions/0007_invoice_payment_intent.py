"""Each invoice records its one PaymentIntent (Stripe Billing's model): every charge attempt
after the first confirms that same intent again, and the intent is canceled when the invoice
is voided or written off. Unique: a PaymentIntent pays one invoice.

Revision ID: 0007
Revises: 0006

Written by hand to match ``InvoiceRow`` in db/models.py exactly (tests/db compares them).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # batch_alter_table: SQLite cannot add a constraint to a table in place.
    with op.batch_alter_table("invoices") as batch:
        batch.add_column(sa.Column("stripe_payment_intent_id", sa.String(100), nullable=True))
        batch.create_unique_constraint(
            op.f("uq_invoices_stripe_payment_intent_id"), ["stripe_payment_intent_id"]
        )


def downgrade() -> None:
    with op.batch_alter_table("invoices") as batch:
        batch.drop_constraint(op.f("uq_invoices_stripe_payment_intent_id"), type_="unique")
        batch.drop_column("stripe_payment_intent_id")
