"""Signups: a per-customer lease so concurrent signups for one customer run one at a time;
idempotency keys scoped to the API key that sent them; the card a signup attached, for the
sweeper that cleans up signups that can never start; an index for that sweeper.

Revision ID: 0008
Revises: 0007

Written by hand to match ``CustomerRow`` and ``SubscriptionRow`` in db/models.py exactly
(tests/db compares them). Existing subscriptions keep ``signup_key_scope`` NULL: their keys
were sent before scoping, so any caller's retry still finds them.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # batch_alter_table: SQLite cannot alter tables in place.
    with op.batch_alter_table("customers") as batch:
        batch.add_column(sa.Column("signup_lease_token", sa.String(40), nullable=True))
        batch.add_column(
            sa.Column("signup_lease_expires_at", sa.DateTime(timezone=True), nullable=True)
        )
    with op.batch_alter_table("subscriptions") as batch:
        batch.add_column(sa.Column("signup_key_scope", sa.String(64), nullable=True))
        batch.add_column(sa.Column("signup_payment_method_id", sa.String(100), nullable=True))
        batch.drop_constraint("uq_subscriptions_signup_idempotency_key", type_="unique")
        batch.create_unique_constraint(
            "uq_subscriptions_signup_key_scope_signup_idempotency_key",
            ["signup_key_scope", "signup_idempotency_key"],
        )
        batch.create_index("ix_subscriptions_status_created_at", ["status", "created_at"])


def downgrade() -> None:
    # Keys from different API keys may coincide by now and the old constraint cannot hold
    # them: the oldest subscription keeps its key, the others forget theirs.
    op.execute(
        "UPDATE subscriptions SET signup_idempotency_key = NULL "
        "WHERE signup_idempotency_key IS NOT NULL AND id NOT IN ("
        "SELECT MIN(id) FROM subscriptions WHERE signup_idempotency_key IS NOT NULL "
        "GROUP BY signup_idempotency_key)"
    )
    with op.batch_alter_table("subscriptions") as batch:
        batch.drop_index("ix_subscriptions_status_created_at")
        batch.drop_constraint(
            "uq_subscriptions_signup_key_scope_signup_idempotency_key", type_="unique"
        )
        batch.create_unique_constraint(
            "uq_subscriptions_signup_idempotency_key", ["signup_idempotency_key"]
        )
        batch.drop_column("signup_payment_method_id")
        batch.drop_column("signup_key_scope")
    with op.batch_alter_table("customers") as batch:
        batch.drop_column("signup_lease_expires_at")
        batch.drop_column("signup_lease_token")
