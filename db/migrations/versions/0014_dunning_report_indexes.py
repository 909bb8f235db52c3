"""Two partial indexes for the dunning report: first attempts that failed, and the later
attempts that paid.

Revision ID: 0014
Revises: 0013

(Invoice documents read ``customers.locale``, added by 0013 for mails.)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


# Frozen here (db.models has the same text).
_FIRST_FAILED = "attempt_number = 1 AND outcome <> 'paid'"
_RECOVERED = "outcome = 'paid' AND attempt_number > 1"


def upgrade() -> None:
    op.create_index(
        "ix_payment_attempts_first_failed",
        "payment_attempts",
        ["invoice_id", "outcome"],
        postgresql_where=sa.text(_FIRST_FAILED),
        sqlite_where=sa.text(_FIRST_FAILED),
    )
    op.create_index(
        "ix_payment_attempts_recovered",
        "payment_attempts",
        ["invoice_id", "attempt_number"],
        postgresql_where=sa.text(_RECOVERED),
        sqlite_where=sa.text(_RECOVERED),
    )


def downgrade() -> None:
    op.drop_index("ix_payment_attempts_recovered", table_name="payment_attempts")
    op.drop_index("ix_payment_attempts_first_failed", table_name="payment_attempts")
