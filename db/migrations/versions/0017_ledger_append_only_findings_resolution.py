"""The ledger is append-only in the database; reconciliation findings can be resolved; the
customer balance takes Stripe's ``invoice_too_small`` debit.

* ``ledger_entries``: triggers refuse every UPDATE and DELETE (PostgreSQL: a trigger function
  raising; SQLite: ``RAISE(ABORT, ...)``). A correction is a new entry, as Stripe's balance
  transactions are.
* ``reconciliation_findings``: ``resolved_at``, ``resolved_by``, ``resolution_note`` (all set
  or none).
* ``customer_balance_entries.kind``: ``invoice_too_small`` (an amount below Stripe's minimum
  charge carried to the customer's balance as a debit).

Revision ID: 0017
Revises: 0019
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0019"
branch_labels = None
depends_on = None

# Frozen here: a later kind gets its own revision.
_ENTRY_KINDS_BEFORE = (
    "'proration_credit', 'invoice_credit', 'credit_note', 'applied_to_invoice', "
    "'restored_from_invoice', 'adjustment'"
)
_ENTRY_KINDS_AFTER = (
    "'proration_credit', 'invoice_credit', 'credit_note', 'applied_to_invoice', "
    "'restored_from_invoice', 'adjustment', 'invoice_too_small'"
)
_RESOLVED_TOGETHER = (
    "(resolved_at IS NULL AND resolved_by IS NULL AND resolution_note IS NULL) OR "
    "(resolved_at IS NOT NULL AND resolved_by IS NOT NULL AND resolution_note IS NOT NULL)"
)

_MESSAGE = "ledger_entries is append-only: record a correcting entry instead"

_POSTGRES_UP = [
    f"""
    CREATE FUNCTION ledger_entries_append_only() RETURNS trigger AS $$
    BEGIN
        RAISE EXCEPTION '{_MESSAGE} (% refused)', TG_OP USING ERRCODE = 'restrict_violation';
    END;
    $$ LANGUAGE plpgsql
    """,
    """
    CREATE TRIGGER ledger_entries_no_update BEFORE UPDATE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_entries_append_only()
    """,
    """
    CREATE TRIGGER ledger_entries_no_delete BEFORE DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_entries_append_only()
    """,
    # TRUNCATE skips row triggers: refuse it too.
    """
    CREATE TRIGGER ledger_entries_no_truncate BEFORE TRUNCATE ON ledger_entries
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_entries_append_only()
    """,
]
_POSTGRES_DOWN = [
    "DROP TRIGGER IF EXISTS ledger_entries_no_truncate ON ledger_entries",
    "DROP TRIGGER IF EXISTS ledger_entries_no_delete ON ledger_entries",
    "DROP TRIGGER IF EXISTS ledger_entries_no_update ON ledger_entries",
    "DROP FUNCTION IF EXISTS ledger_entries_append_only()",
]
_SQLITE_UP = [
    f"""
    CREATE TRIGGER ledger_entries_no_update BEFORE UPDATE ON ledger_entries
    BEGIN SELECT RAISE(ABORT, '{_MESSAGE} (UPDATE refused)'); END
    """,
    f"""
    CREATE TRIGGER ledger_entries_no_delete BEFORE DELETE ON ledger_entries
    BEGIN SELECT RAISE(ABORT, '{_MESSAGE} (DELETE refused)'); END
    """,
]
_SQLITE_DOWN = [
    "DROP TRIGGER IF EXISTS ledger_entries_no_delete",
    "DROP TRIGGER IF EXISTS ledger_entries_no_update",
]


def _entry_kinds(allowed: str) -> None:
    # Batch mode: SQLite cannot alter a CHECK constraint in place (the table is copied).
    with op.batch_alter_table("customer_balance_entries") as batch:
        batch.drop_constraint(op.f("ck_customer_balance_entries_kind"), type_="check")
        batch.create_check_constraint(
            op.f("ck_customer_balance_entries_kind"), f'"kind" IN ({allowed})'
        )


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    for statement in _POSTGRES_UP if postgres else _SQLITE_UP:
        op.execute(statement)
    with op.batch_alter_table("reconciliation_findings") as batch:
        batch.add_column(sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("resolved_by", sa.String(200), nullable=True))
        batch.add_column(sa.Column("resolution_note", sa.String(2000), nullable=True))
        batch.create_check_constraint(
            op.f("ck_reconciliation_findings_resolved_together"), _RESOLVED_TOGETHER
        )
    _entry_kinds(_ENTRY_KINDS_AFTER)


def downgrade() -> None:
    _entry_kinds(_ENTRY_KINDS_BEFORE)
    with op.batch_alter_table("reconciliation_findings") as batch:
        batch.drop_constraint(op.f("ck_reconciliation_findings_resolved_together"), type_="check")
        batch.drop_column("resolution_note")
        batch.drop_column("resolved_by")
        batch.drop_column("resolved_at")
    postgres = op.get_bind().dialect.name == "postgresql"
    for statement in _POSTGRES_DOWN if postgres else _SQLITE_DOWN:
        op.execute(statement)
