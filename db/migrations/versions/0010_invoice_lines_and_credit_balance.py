"""Invoice lines and the customer's credit balance.

Invoices gain ``subtotal_minor`` (the sum of their lines) and ``credit_applied_minor`` (the
credit balance used to pay them); ``invoice_lines`` holds each line (the subscription line,
prorations); ``customer_balance_entries`` holds every signed movement of a customer's credit
balance. Every existing invoice gets its one subscription line, so all invoices read alike.

Revision ID: 0010
Revises: 0009

Written by hand to match db/models.py exactly (tests/db compares them).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen here: a later kind gets its own revision.
_LINE_KINDS = "'subscription', 'proration'"
_ENTRY_KINDS = (
    "'proration_credit', 'invoice_credit', 'credit_note', 'applied_to_invoice', "
    "'restored_from_invoice', 'adjustment'"
)


def upgrade() -> None:
    with op.batch_alter_table("invoices") as batch:
        batch.add_column(
            sa.Column("subtotal_minor", sa.BigInteger(), server_default="0", nullable=False)
        )
        batch.add_column(
            sa.Column("credit_applied_minor", sa.BigInteger(), server_default="0", nullable=False)
        )
        batch.create_check_constraint(
            op.f("ck_invoices_credit_applied_within_subtotal"),
            "credit_applied_minor >= 0 AND credit_applied_minor <= "
            "CASE WHEN subtotal_minor > 0 THEN subtotal_minor ELSE 0 END",
        )
    op.execute("UPDATE invoices SET subtotal_minor = amount_due_minor")

    op.create_table(
        "invoice_lines",
        sa.Column("id", sa.String(48), nullable=False),
        sa.Column("invoice_id", sa.String(40), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("description", sa.String(500), nullable=False),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("period_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("period_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("plan_code", sa.String(63), nullable=True),
        sa.Column("quantity", sa.Integer(), server_default="1", nullable=False),
        sa.Column("unit_amount_minor", sa.BigInteger(), nullable=True),
        sa.Column("change_id", sa.String(200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("position >= 1", name=op.f("ck_invoice_lines_position_positive")),
        sa.CheckConstraint("quantity >= 1", name=op.f("ck_invoice_lines_quantity_positive")),
        sa.CheckConstraint(f'"kind" IN ({_LINE_KINDS})', name=op.f("ck_invoice_lines_kind")),
        sa.CheckConstraint(
            "period_end >= period_start", name=op.f("ck_invoice_lines_period_ordered")
        ),
        sa.ForeignKeyConstraint(
            ["invoice_id"], ["invoices.id"], name=op.f("fk_invoice_lines_invoice_id_invoices")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_invoice_lines")),
        sa.UniqueConstraint(
            "invoice_id", "position", name=op.f("uq_invoice_lines_invoice_id_position")
        ),
    )
    # Each existing invoice billed exactly its subscription's price for its period.
    op.execute(
        """
        INSERT INTO invoice_lines (id, invoice_id, position, kind, description, amount_minor,
            currency, period_start, period_end, plan_code, quantity, unit_amount_minor,
            change_id, created_at)
        SELECT 'il_' || substr(i.id, 4), i.id, 1, 'subscription', i.description,
            i.amount_due_minor, i.currency, i.period_start, i.period_end, s.plan_code, 1,
            i.amount_due_minor, NULL, i.created_at
        FROM invoices i JOIN subscriptions s ON s.id = i.subscription_id
        """
    )

    op.create_table(
        "customer_balance_entries",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("customer_id", sa.String(40), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(24), nullable=False),
        sa.Column("source_key", sa.String(200), nullable=False),
        sa.Column("description", sa.String(500), nullable=False),
        sa.Column("invoice_id", sa.String(40), nullable=True),
        sa.Column("credit_note_id", sa.String(40), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            f'"kind" IN ({_ENTRY_KINDS})', name=op.f("ck_customer_balance_entries_kind")
        ),
        sa.CheckConstraint(
            "amount_minor <> 0", name=op.f("ck_customer_balance_entries_amount_nonzero")
        ),
        sa.ForeignKeyConstraint(
            ["customer_id"],
            ["customers.id"],
            name=op.f("fk_customer_balance_entries_customer_id_customers"),
        ),
        sa.ForeignKeyConstraint(
            ["invoice_id"],
            ["invoices.id"],
            name=op.f("fk_customer_balance_entries_invoice_id_invoices"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_customer_balance_entries")),
        sa.UniqueConstraint("source_key", name=op.f("uq_customer_balance_entries_source_key")),
    )
    op.create_index(
        "ix_customer_balance_entries_customer_currency",
        "customer_balance_entries",
        ["customer_id", "currency"],
    )


def downgrade() -> None:
    op.drop_index(
        "ix_customer_balance_entries_customer_currency", table_name="customer_balance_entries"
    )
    op.drop_table("customer_balance_entries")
    op.drop_table("invoice_lines")
    with op.batch_alter_table("invoices") as batch:
        batch.drop_constraint(op.f("ck_invoices_credit_applied_within_subtotal"), type_="check")
        batch.drop_column("credit_applied_minor")
        batch.drop_column("subtotal_minor")
