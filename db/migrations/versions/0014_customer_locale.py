"""``customers.locale``: the language and region invoice documents are written in (a BCP 47 /
CLDR tag such as ``fr_FR``); NULL means the seller's default (``BILLING_INVOICE_LOCALE``).

Revision ID: 0014
Revises: 0009 (the lead re-chains it after 0010 at merge)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("customers") as batch:
        batch.add_column(sa.Column("locale", sa.String(35), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("customers") as batch:
        batch.drop_column("locale")
