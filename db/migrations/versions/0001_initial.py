"""Initial schema: customers, plans, subscriptions, invoices, payment attempts, payments and
the notification outbox.

Revision ID: 0001
Revises:
Create Date: 2026-11-24

Written by hand to match db/models.py exactly (tests/db compares them). The CHECK lists are
spelled out rather than read from the enums, so this revision keeps meaning what it meant
when it ran; adding an enum value needs a new revision.
"""

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SUBSCRIPTION_STATUSES = (
    "'pending', 'trialing', 'active', 'past_due', 'paused', 'unpaid', 'canceled'"
)
INVOICE_STATUSES = "'draft', 'open', 'paid', 'void', 'uncollectible'"
ATTEMPT_STATUSES = "'pending', 'succeeded', 'failed', 'requires_action'"
CHARGE_OUTCOMES = "'paid', 'soft_decline', 'hard_decline', 'authentication_required'"
INTERVALS = "'day', 'week', 'month', 'year'"
FINAL_ACTIONS = "'cancel', 'mark_unpaid'"


def instant(name: str, *, nullable: bool = False) -> sa.Column[datetime]:
    """An instant column; db.types.UTCDateTime keeps it UTC in application code."""
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "customers",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("external_id", sa.String(200), nullable=True),
        sa.Column("email", sa.String(320), nullable=True),
        sa.Column("name", sa.String(200), nullable=True),
        sa.Column("timezone", sa.String(64), nullable=False),
        sa.Column("stripe_customer_id", sa.String(100), nullable=True),
        sa.Column("default_payment_method_id", sa.String(100), nullable=True),
        sa.Column("invoice_prefix", sa.String(12), nullable=False),
        sa.Column("next_invoice_sequence", sa.Integer(), server_default="1", nullable=False),
        instant("created_at"),
        instant("updated_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_customers")),
        sa.UniqueConstraint("external_id", name=op.f("uq_customers_external_id")),
        sa.UniqueConstraint("stripe_customer_id", name=op.f("uq_customers_stripe_customer_id")),
        sa.UniqueConstraint("invoice_prefix", name=op.f("uq_customers_invoice_prefix")),
        sa.CheckConstraint(
            "next_invoice_sequence >= 1", name=op.f("ck_customers_next_invoice_sequence")
        ),
    )

    op.create_table(
        "plans",
        sa.Column("code", sa.String(63), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("interval", sa.String(8), nullable=False),
        sa.Column("interval_count", sa.Integer(), nullable=False),
        sa.Column("trial_days", sa.Integer(), nullable=False),
        sa.Column("dunning_retry_offsets_days", sa.JSON(), nullable=False),
        sa.Column("dunning_final_action", sa.String(16), nullable=False),
        sa.Column("active", sa.Boolean(), server_default=sa.true(), nullable=False),
        instant("created_at"),
        sa.PrimaryKeyConstraint("code", name=op.f("pk_plans")),
        sa.CheckConstraint("amount_minor >= 0", name=op.f("ck_plans_amount_minor_nonnegative")),
        sa.CheckConstraint(f'"interval" IN ({INTERVALS})', name=op.f("ck_plans_interval")),
        sa.CheckConstraint("interval_count >= 1", name=op.f("ck_plans_interval_count_positive")),
        sa.CheckConstraint("trial_days >= 0", name=op.f("ck_plans_trial_days_nonnegative")),
        sa.CheckConstraint(
            f'"dunning_final_action" IN ({FINAL_ACTIONS})',
            name=op.f("ck_plans_dunning_final_action"),
        ),
    )

    op.create_table(
        "subscriptions",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("customer_id", sa.String(40), nullable=False),
        sa.Column("plan_code", sa.String(63), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("interval", sa.String(8), nullable=False),
        sa.Column("interval_count", sa.Integer(), nullable=False),
        sa.Column("timezone", sa.String(64), nullable=False),
        instant("anchor_at"),
        instant("trial_end_at", nullable=True),
        instant("current_period_start", nullable=True),
        instant("current_period_end", nullable=True),
        instant("next_billing_at", nullable=True),
        sa.Column("cancel_at_period_end", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("cancel_reason", sa.String(500), nullable=True),
        instant("canceled_at", nullable=True),
        instant("ended_at", nullable=True),
        instant("paused_at", nullable=True),
        sa.Column("workflow_id", sa.String(100), nullable=False),
        sa.Column("signup_idempotency_key", sa.String(200), nullable=True),
        sa.Column("signup_request_hash", sa.String(64), nullable=True),
        instant("created_at"),
        instant("updated_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_subscriptions")),
        sa.ForeignKeyConstraint(
            ["customer_id"], ["customers.id"], name=op.f("fk_subscriptions_customer_id_customers")
        ),
        sa.ForeignKeyConstraint(
            ["plan_code"], ["plans.code"], name=op.f("fk_subscriptions_plan_code_plans")
        ),
        sa.UniqueConstraint("workflow_id", name=op.f("uq_subscriptions_workflow_id")),
        sa.UniqueConstraint(
            "signup_idempotency_key", name=op.f("uq_subscriptions_signup_idempotency_key")
        ),
        sa.CheckConstraint(
            f'"status" IN ({SUBSCRIPTION_STATUSES})', name=op.f("ck_subscriptions_status")
        ),
        sa.CheckConstraint(
            "amount_minor >= 0", name=op.f("ck_subscriptions_amount_minor_nonnegative")
        ),
        sa.CheckConstraint(f'"interval" IN ({INTERVALS})', name=op.f("ck_subscriptions_interval")),
        sa.CheckConstraint(
            "interval_count >= 1", name=op.f("ck_subscriptions_interval_count_positive")
        ),
    )
    op.create_index(op.f("ix_subscriptions_customer_id"), "subscriptions", ["customer_id"])

    op.create_table(
        "invoices",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("number", sa.String(32), nullable=False),
        sa.Column("subscription_id", sa.String(40), nullable=False),
        sa.Column("customer_id", sa.String(40), nullable=False),
        sa.Column("period_index", sa.Integer(), nullable=False),
        instant("period_start"),
        instant("period_end"),
        sa.Column("amount_due_minor", sa.BigInteger(), nullable=False),
        sa.Column("amount_paid_minor", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("description", sa.String(500), nullable=False),
        sa.Column("status_reason", sa.String(500), nullable=True),
        instant("created_at"),
        instant("finalized_at", nullable=True),
        instant("paid_at", nullable=True),
        instant("voided_at", nullable=True),
        instant("marked_uncollectible_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_invoices")),
        sa.ForeignKeyConstraint(
            ["subscription_id"],
            ["subscriptions.id"],
            name=op.f("fk_invoices_subscription_id_subscriptions"),
        ),
        sa.ForeignKeyConstraint(
            ["customer_id"], ["customers.id"], name=op.f("fk_invoices_customer_id_customers")
        ),
        sa.UniqueConstraint("number", name=op.f("uq_invoices_number")),
        sa.UniqueConstraint(
            "subscription_id",
            "period_start",
            name=op.f("uq_invoices_subscription_id_period_start"),
        ),
        sa.CheckConstraint(
            "amount_due_minor >= 0", name=op.f("ck_invoices_amount_due_nonnegative")
        ),
        sa.CheckConstraint(
            "amount_paid_minor >= 0 AND amount_paid_minor <= amount_due_minor",
            name=op.f("ck_invoices_amount_paid_within_due"),
        ),
        sa.CheckConstraint(f'"status" IN ({INVOICE_STATUSES})', name=op.f("ck_invoices_status")),
    )
    op.create_index(
        op.f("ix_invoices_customer_id_created_at"), "invoices", ["customer_id", "created_at"]
    )
    op.create_index(op.f("ix_invoices_status"), "invoices", ["status"])

    op.create_table(
        "payment_attempts",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("invoice_id", sa.String(40), nullable=False),
        sa.Column("attempt_number", sa.Integer(), nullable=False),
        sa.Column("idempotency_key", sa.String(200), nullable=False),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("status", sa.String(24), nullable=False),
        sa.Column("outcome", sa.String(32), nullable=True),
        sa.Column("decline_code", sa.String(64), nullable=True),
        sa.Column("failure_message", sa.String(500), nullable=True),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("stripe_payment_intent_id", sa.String(100), nullable=True),
        sa.Column("stripe_charge_id", sa.String(100), nullable=True),
        sa.Column("payment_method_id", sa.String(100), nullable=True),
        instant("created_at"),
        instant("completed_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_payment_attempts")),
        sa.ForeignKeyConstraint(
            ["invoice_id"], ["invoices.id"], name=op.f("fk_payment_attempts_invoice_id_invoices")
        ),
        sa.UniqueConstraint(
            "invoice_id",
            "attempt_number",
            name=op.f("uq_payment_attempts_invoice_id_attempt_number"),
        ),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_payment_attempts_idempotency_key")),
        sa.CheckConstraint(
            "attempt_number >= 1", name=op.f("ck_payment_attempts_attempt_number_positive")
        ),
        sa.CheckConstraint(
            "amount_minor >= 0", name=op.f("ck_payment_attempts_amount_minor_nonnegative")
        ),
        sa.CheckConstraint(
            f'"status" IN ({ATTEMPT_STATUSES})', name=op.f("ck_payment_attempts_status")
        ),
        sa.CheckConstraint(
            f'"outcome" IN ({CHARGE_OUTCOMES})', name=op.f("ck_payment_attempts_outcome")
        ),
    )
    op.create_index(
        op.f("ix_payment_attempts_stripe_payment_intent_id"),
        "payment_attempts",
        ["stripe_payment_intent_id"],
    )

    op.create_table(
        "payments",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("invoice_id", sa.String(40), nullable=False),
        sa.Column("attempt_id", sa.String(40), nullable=False),
        sa.Column("stripe_payment_intent_id", sa.String(100), nullable=False),
        sa.Column("stripe_charge_id", sa.String(100), nullable=True),
        sa.Column("balance_transaction_id", sa.String(100), nullable=True),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("fee_minor", sa.BigInteger(), nullable=True),
        sa.Column("net_minor", sa.BigInteger(), nullable=True),
        sa.Column("settlement_amount_minor", sa.BigInteger(), nullable=True),
        sa.Column("settlement_currency", sa.String(3), nullable=True),
        instant("settled_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_payments")),
        sa.ForeignKeyConstraint(
            ["invoice_id"], ["invoices.id"], name=op.f("fk_payments_invoice_id_invoices")
        ),
        sa.ForeignKeyConstraint(
            ["attempt_id"],
            ["payment_attempts.id"],
            name=op.f("fk_payments_attempt_id_payment_attempts"),
        ),
        # At most one settled payment per invoice: a second successful charge cannot be booked.
        sa.UniqueConstraint("invoice_id", name=op.f("uq_payments_invoice_id")),
        sa.UniqueConstraint("attempt_id", name=op.f("uq_payments_attempt_id")),
        sa.UniqueConstraint(
            "stripe_payment_intent_id", name=op.f("uq_payments_stripe_payment_intent_id")
        ),
        sa.UniqueConstraint("stripe_charge_id", name=op.f("uq_payments_stripe_charge_id")),
        sa.CheckConstraint("amount_minor > 0", name=op.f("ck_payments_amount_minor_positive")),
    )

    op.create_table(
        "notifications",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("customer_id", sa.String(40), nullable=False),
        sa.Column("subscription_id", sa.String(40), nullable=True),
        sa.Column("invoice_id", sa.String(40), nullable=True),
        sa.Column("dedupe_key", sa.String(200), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        instant("created_at"),
        instant("sent_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notifications")),
        sa.ForeignKeyConstraint(
            ["customer_id"], ["customers.id"], name=op.f("fk_notifications_customer_id_customers")
        ),
        sa.ForeignKeyConstraint(
            ["subscription_id"],
            ["subscriptions.id"],
            name=op.f("fk_notifications_subscription_id_subscriptions"),
        ),
        sa.ForeignKeyConstraint(
            ["invoice_id"], ["invoices.id"], name=op.f("fk_notifications_invoice_id_invoices")
        ),
        sa.UniqueConstraint("dedupe_key", name=op.f("uq_notifications_dedupe_key")),
    )
    op.create_index(
        op.f("ix_notifications_customer_id_created_at"),
        "notifications",
        ["customer_id", "created_at"],
    )
    op.create_index(op.f("ix_notifications_subscription_id"), "notifications", ["subscription_id"])


def downgrade() -> None:
    # Children before parents, so foreign keys never point at a dropped table.
    for table in (
        "notifications",
        "payments",
        "payment_attempts",
        "invoices",
        "subscriptions",
        "plans",
        "customers",
    ):
        op.drop_table(table)
