"""Plan changes asked with an Idempotency-Key (``plan_change_requests``: the key, scoped to the
API key that sent it, the request's digest, the workflow Update's id and the first answer), and
the invoice line kind ``credit_note`` (credit notes of a voided invoice carried to the plan
change's invoice that bills its lines again).

Revision ID: 0016
Revises: 0017

Written by hand to match db/models.py exactly (tests/db compares them).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | Sequence[str] | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen here: a later kind gets its own revision.
_LINE_KINDS_BEFORE = "'subscription', 'proration'"
_LINE_KINDS_AFTER = "'subscription', 'proration', 'credit_note'"


def _line_kinds(allowed: str) -> None:
    # Batch mode: SQLite cannot alter a CHECK constraint in place (the table is copied).
    with op.batch_alter_table("invoice_lines") as batch:
        batch.drop_constraint(op.f("ck_invoice_lines_kind"), type_="check")
        batch.create_check_constraint(op.f("ck_invoice_lines_kind"), f'"kind" IN ({allowed})')


def upgrade() -> None:
    _line_kinds(_LINE_KINDS_AFTER)
    op.create_table(
        "plan_change_requests",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("subscription_id", sa.String(40), nullable=False),
        sa.Column("key_scope", sa.String(64), nullable=False),
        sa.Column("idempotency_key", sa.String(200), nullable=False),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("change_id", sa.String(200), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('requested', 'applied')", name=op.f("ck_plan_change_requests_status")
        ),
        sa.ForeignKeyConstraint(
            ["subscription_id"],
            ["subscriptions.id"],
            name=op.f("fk_plan_change_requests_subscription_id_subscriptions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_plan_change_requests")),
        sa.UniqueConstraint("change_id", name=op.f("uq_plan_change_requests_change_id")),
        sa.UniqueConstraint(
            "key_scope",
            "idempotency_key",
            name=op.f("uq_plan_change_requests_key_scope_idempotency_key"),
        ),
    )
    op.create_index(
        "ix_plan_change_requests_subscription_id", "plan_change_requests", ["subscription_id"]
    )


def downgrade() -> None:
    op.drop_index("ix_plan_change_requests_subscription_id", table_name="plan_change_requests")
    op.drop_table("plan_change_requests")
    carried = op.get_bind().execute(
        sa.text("SELECT count(*) FROM invoice_lines WHERE kind = 'credit_note'")
    )
    if carried.scalar_one():
        # Those lines are money on issued invoices: never dropped to fit an older schema.
        raise RuntimeError(
            "invoice_lines holds credit_note lines (credit notes carried to a plan change's "
            "invoice); revision 0012 cannot represent them, so it cannot be downgraded to"
        )
    _line_kinds(_LINE_KINDS_BEFORE)
