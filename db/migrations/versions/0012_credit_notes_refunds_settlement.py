"""Credit notes and refunds.

``credit_notes`` (numbered per customer, split into refund, credit and an amount settled
outside), ``credit_note_lines`` (by invoice line, or the invoice as a whole) and ``refunds``
(ours, recorded pending before the provider is called, and those made elsewhere).

Revision ID: 0012
Revises: 0011

Written by hand to match db/models.py exactly (tests/db compares them).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | Sequence[str] | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen here: a later value gets its own revision.
_CREDIT_NOTE_REASONS = "'duplicate', 'fraudulent', 'order_change', 'product_unsatisfactory'"
_REFUND_REASONS = "'duplicate', 'fraudulent', 'requested_by_customer'"
_REFUND_STATUSES = "'pending', 'requires_action', 'succeeded', 'failed', 'canceled'"
_REFUND_SOURCES = "'credit_note', 'provider'"
_DISPUTE_STATUSES = (
    "'warning_needs_response', 'warning_under_review', 'warning_closed', 'needs_response', "
    "'under_review', 'won', 'lost'"
)


def upgrade() -> None:
    op.create_table(
        "credit_notes",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("number", sa.String(40), nullable=False),
        sa.Column("customer_id", sa.String(40), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("invoice_id", sa.String(40), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("reason", sa.String(32), nullable=True),
        sa.Column("memo", sa.String(500), nullable=True),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("refund_amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("credit_amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("out_of_band_amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("amount_due_reduction_minor", sa.BigInteger(), nullable=False),
        sa.Column("idempotency_key", sa.String(200), nullable=True),
        sa.Column("key_scope", sa.String(64), nullable=True),
        sa.Column("request_hash", sa.String(64), nullable=True),
        sa.Column("created_by", sa.String(200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("sequence >= 1", name=op.f("ck_credit_notes_sequence_positive")),
        sa.CheckConstraint("amount_minor > 0", name=op.f("ck_credit_notes_amount_positive")),
        sa.CheckConstraint(
            "refund_amount_minor >= 0 AND credit_amount_minor >= 0 "
            "AND out_of_band_amount_minor >= 0 AND amount_due_reduction_minor >= 0",
            name=op.f("ck_credit_notes_parts_nonnegative"),
        ),
        sa.CheckConstraint(
            "refund_amount_minor + credit_amount_minor + out_of_band_amount_minor "
            "+ amount_due_reduction_minor = amount_minor",
            name=op.f("ck_credit_notes_parts_add_up"),
        ),
        sa.CheckConstraint(
            f'"reason" IN ({_CREDIT_NOTE_REASONS})', name=op.f("ck_credit_notes_reason")
        ),
        sa.CheckConstraint(
            "type IN ('pre_payment', 'post_payment')", name=op.f("ck_credit_notes_type")
        ),
        sa.ForeignKeyConstraint(
            ["customer_id"], ["customers.id"], name=op.f("fk_credit_notes_customer_id_customers")
        ),
        sa.ForeignKeyConstraint(
            ["invoice_id"], ["invoices.id"], name=op.f("fk_credit_notes_invoice_id_invoices")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_credit_notes")),
        sa.UniqueConstraint("number", name=op.f("uq_credit_notes_number")),
        sa.UniqueConstraint(
            "customer_id", "sequence", name=op.f("uq_credit_notes_customer_id_sequence")
        ),
        sa.UniqueConstraint(
            "key_scope", "idempotency_key", name=op.f("uq_credit_notes_key_scope_idempotency_key")
        ),
    )
    op.create_index("ix_credit_notes_invoice_id", "credit_notes", ["invoice_id"])
    op.create_index("ix_credit_notes_created_at_id", "credit_notes", ["created_at", "id"])

    op.create_table(
        "credit_note_lines",
        sa.Column("id", sa.String(48), nullable=False),
        sa.Column("credit_note_id", sa.String(40), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("invoice_line_id", sa.String(48), nullable=True),
        sa.Column("description", sa.String(500), nullable=False),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("position >= 1", name=op.f("ck_credit_note_lines_position_positive")),
        sa.CheckConstraint("amount_minor > 0", name=op.f("ck_credit_note_lines_amount_positive")),
        sa.ForeignKeyConstraint(
            ["credit_note_id"],
            ["credit_notes.id"],
            name=op.f("fk_credit_note_lines_credit_note_id_credit_notes"),
        ),
        sa.ForeignKeyConstraint(
            ["invoice_line_id"],
            ["invoice_lines.id"],
            name=op.f("fk_credit_note_lines_invoice_line_id_invoice_lines"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_credit_note_lines")),
        sa.UniqueConstraint(
            "credit_note_id", "position", name=op.f("uq_credit_note_lines_credit_note_id_position")
        ),
    )
    op.create_index(
        "ix_credit_note_lines_invoice_line_id", "credit_note_lines", ["invoice_line_id"]
    )

    op.create_table(
        "refunds",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("invoice_id", sa.String(40), nullable=False),
        sa.Column("payment_id", sa.String(40), nullable=False),
        sa.Column("credit_note_id", sa.String(40), nullable=True),
        sa.Column("refund_number", sa.Integer(), nullable=True),
        sa.Column("idempotency_key", sa.String(200), nullable=True),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("reason", sa.String(32), nullable=True),
        sa.Column("status", sa.String(24), nullable=False),
        sa.Column("stripe_refund_id", sa.String(100), nullable=True),
        sa.Column("stripe_charge_id", sa.String(100), nullable=True),
        sa.Column("balance_transaction_id", sa.String(100), nullable=True),
        sa.Column("failure_reason", sa.String(500), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("amount_minor > 0", name=op.f("ck_refunds_amount_positive")),
        sa.CheckConstraint("refund_number >= 1", name=op.f("ck_refunds_refund_number_positive")),
        sa.CheckConstraint(f'"status" IN ({_REFUND_STATUSES})', name=op.f("ck_refunds_status")),
        sa.CheckConstraint(f'"source" IN ({_REFUND_SOURCES})', name=op.f("ck_refunds_source")),
        sa.CheckConstraint(f'"reason" IN ({_REFUND_REASONS})', name=op.f("ck_refunds_reason")),
        sa.CheckConstraint(
            "(source = 'credit_note' AND credit_note_id IS NOT NULL "
            "AND refund_number IS NOT NULL AND idempotency_key IS NOT NULL) "
            "OR (source = 'provider' AND stripe_refund_id IS NOT NULL)",
            name=op.f("ck_refunds_source_identified"),
        ),
        sa.ForeignKeyConstraint(
            ["invoice_id"], ["invoices.id"], name=op.f("fk_refunds_invoice_id_invoices")
        ),
        sa.ForeignKeyConstraint(
            ["payment_id"], ["payments.id"], name=op.f("fk_refunds_payment_id_payments")
        ),
        sa.ForeignKeyConstraint(
            ["credit_note_id"],
            ["credit_notes.id"],
            name=op.f("fk_refunds_credit_note_id_credit_notes"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_refunds")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_refunds_idempotency_key")),
        sa.UniqueConstraint("stripe_refund_id", name=op.f("uq_refunds_stripe_refund_id")),
        sa.UniqueConstraint(
            "credit_note_id", "refund_number", name=op.f("uq_refunds_credit_note_id_refund_number")
        ),
    )
    op.create_index("ix_refunds_payment_id", "refunds", ["payment_id"])
    op.create_index("ix_refunds_status_created_at", "refunds", ["status", "created_at"])

    op.create_table(
        "disputes",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("stripe_dispute_id", sa.String(100), nullable=False),
        sa.Column("stripe_charge_id", sa.String(100), nullable=False),
        sa.Column("payment_id", sa.String(40), nullable=True),
        sa.Column("invoice_id", sa.String(40), nullable=True),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("reason", sa.String(64), nullable=True),
        sa.Column("evidence_due_by", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("amount_minor > 0", name=op.f("ck_disputes_amount_positive")),
        sa.CheckConstraint(f'"status" IN ({_DISPUTE_STATUSES})', name=op.f("ck_disputes_status")),
        sa.ForeignKeyConstraint(
            ["payment_id"], ["payments.id"], name=op.f("fk_disputes_payment_id_payments")
        ),
        sa.ForeignKeyConstraint(
            ["invoice_id"], ["invoices.id"], name=op.f("fk_disputes_invoice_id_invoices")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_disputes")),
        sa.UniqueConstraint("stripe_dispute_id", name=op.f("uq_disputes_stripe_dispute_id")),
    )
    op.create_index("ix_disputes_payment_id", "disputes", ["payment_id"])

    op.create_table(
        "ledger_entries",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("balance_transaction_id", sa.String(100), nullable=False),
        sa.Column("type", sa.String(40), nullable=False),
        sa.Column("reporting_category", sa.String(40), nullable=True),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("fee_minor", sa.BigInteger(), nullable=False),
        sa.Column("net_minor", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("source_id", sa.String(100), nullable=True),
        sa.Column("source_amount_minor", sa.BigInteger(), nullable=True),
        sa.Column("source_currency", sa.String(3), nullable=True),
        sa.Column("exchange_rate", sa.String(32), nullable=True),
        sa.Column("payment_id", sa.String(40), nullable=True),
        sa.Column("refund_id", sa.String(40), nullable=True),
        sa.Column("dispute_id", sa.String(40), nullable=True),
        sa.Column("description", sa.String(500), nullable=True),
        sa.Column("provider_created_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("available_on", sa.DateTime(timezone=True), nullable=True),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_entries")),
        sa.UniqueConstraint(
            "balance_transaction_id", name=op.f("uq_ledger_entries_balance_transaction_id")
        ),
    )
    op.create_index("ix_ledger_entries_source_id", "ledger_entries", ["source_id"])
    op.create_index(
        "ix_ledger_entries_provider_created_at", "ledger_entries", ["provider_created_at"]
    )

    op.create_table(
        "payouts",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("stripe_payout_id", sa.String(100), nullable=False),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("automatic", sa.Boolean(), nullable=False),
        sa.Column("balance_transaction_id", sa.String(100), nullable=True),
        sa.Column("arrival_date", sa.DateTime(timezone=True), nullable=True),
        sa.Column("provider_created_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("failure_code", sa.String(64), nullable=True),
        sa.Column("imported_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_payouts")),
        sa.UniqueConstraint("stripe_payout_id", name=op.f("uq_payouts_stripe_payout_id")),
    )
    op.create_index("ix_payouts_provider_created_at", "payouts", ["provider_created_at"])

    op.create_table(
        "payout_items",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("payout_id", sa.String(40), nullable=False),
        sa.Column("balance_transaction_id", sa.String(100), nullable=False),
        sa.ForeignKeyConstraint(
            ["payout_id"], ["payouts.id"], name=op.f("fk_payout_items_payout_id_payouts")
        ),
        sa.ForeignKeyConstraint(
            ["balance_transaction_id"],
            ["ledger_entries.balance_transaction_id"],
            name=op.f("fk_payout_items_balance_transaction_id_ledger_entries"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_payout_items")),
        sa.UniqueConstraint(
            "payout_id",
            "balance_transaction_id",
            name=op.f("uq_payout_items_payout_id_balance_transaction_id"),
        ),
    )
    op.create_index(
        "ix_payout_items_balance_transaction_id", "payout_items", ["balance_transaction_id"]
    )

    op.create_table(
        "reconciliation_findings",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("severity", sa.String(8), nullable=False),
        sa.Column("subject_key", sa.String(200), nullable=False),
        sa.Column("invoice_id", sa.String(40), nullable=True),
        sa.Column("payment_intent_id", sa.String(100), nullable=True),
        sa.Column("charge_id", sa.String(100), nullable=True),
        sa.Column("amount_minor", sa.BigInteger(), nullable=True),
        sa.Column("currency", sa.String(3), nullable=True),
        sa.Column("detail", sa.String(1000), nullable=False),
        sa.Column("found_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("run_id", sa.String(100), nullable=False),
        sa.CheckConstraint(
            "severity IN ('info', 'warning', 'error')",
            name=op.f("ck_reconciliation_findings_severity"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reconciliation_findings")),
        sa.UniqueConstraint(
            "kind", "subject_key", name=op.f("uq_reconciliation_findings_kind_subject_key")
        ),
    )
    op.create_index("ix_reconciliation_findings_found_at", "reconciliation_findings", ["found_at"])


def downgrade() -> None:
    op.drop_index("ix_reconciliation_findings_found_at", table_name="reconciliation_findings")
    op.drop_table("reconciliation_findings")
    op.drop_index("ix_payout_items_balance_transaction_id", table_name="payout_items")
    op.drop_table("payout_items")
    op.drop_index("ix_payouts_provider_created_at", table_name="payouts")
    op.drop_table("payouts")
    op.drop_index("ix_ledger_entries_provider_created_at", table_name="ledger_entries")
    op.drop_index("ix_ledger_entries_source_id", table_name="ledger_entries")
    op.drop_table("ledger_entries")
    op.drop_index("ix_disputes_payment_id", table_name="disputes")
    op.drop_table("disputes")
    op.drop_index("ix_refunds_status_created_at", table_name="refunds")
    op.drop_index("ix_refunds_payment_id", table_name="refunds")
    op.drop_table("refunds")
    op.drop_index("ix_credit_note_lines_invoice_line_id", table_name="credit_note_lines")
    op.drop_table("credit_note_lines")
    op.drop_index("ix_credit_notes_created_at_id", table_name="credit_notes")
    op.drop_index("ix_credit_notes_invoice_id", table_name="credit_notes")
    op.drop_table("credit_notes")
