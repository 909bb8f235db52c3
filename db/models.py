"""Tables. Amounts are BigInteger minor units, currencies ISO 4217 ``String(3)``, instants
``UTCDateTime``. Every invariant that money depends on is a constraint here, not only a check
in code: one invoice per (subscription, period start), one attempt per (invoice, attempt
number), one settled payment per invoice, no negative amounts, never paid more than due.

Revision ``0001_initial`` creates exactly this schema; ``tests/db`` compares the two.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from enum import StrEnum
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Computed,
    Double,
    ForeignKey,
    Index,
    Integer,
    SmallInteger,
    String,
    Table,
    UniqueConstraint,
    false,
    text,
    true,
)
from sqlalchemy.orm import Mapped, mapped_column

from billing.balance import BalanceEntryKind
from billing.calendar import IntervalUnit
from billing.credit_notes import CreditNoteReason, RefundReason, RefundSource, RefundStatus
from billing.disputes import DisputeStatus
from billing.dunning import FinalAction
from billing.invoices import InvoiceLineKind, InvoiceStatus
from billing.notices import NoticeStatus
from billing.payments import ChargeOutcomeKind
from billing.records import AttemptStatus, DeliveryStatus
from billing.subscription import SubscriptionStatus
from db.base import Base
from db.types import StrEnumType, UTCDateTime


def one_of(column: str, values: Iterable[StrEnum]) -> str:
    """CHECK text allowing only the enum's values. The column is quoted because ``interval``
    is a keyword in PostgreSQL."""
    listed = ", ".join(f"'{v.value}'" for v in values)
    return f'"{column}" IN ({listed})'


class CustomerRow(Base):
    __tablename__ = "customers"
    __table_args__ = (CheckConstraint("next_invoice_sequence >= 1", name="next_invoice_sequence"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    external_id: Mapped[str | None] = mapped_column(String(200), unique=True)
    email: Mapped[str | None] = mapped_column(String(320))
    name: Mapped[str | None] = mapped_column(String(200))
    timezone: Mapped[str] = mapped_column(String(64))
    stripe_customer_id: Mapped[str | None] = mapped_column(String(100), unique=True)
    default_payment_method_id: Mapped[str | None] = mapped_column(String(100))
    invoice_prefix: Mapped[str] = mapped_column(String(12), unique=True)
    #: The next invoice's 1-based sequence; bumped by ``allocate_invoice_number``.
    next_invoice_sequence: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    #: ``created`` of the newest provider event about the default card that was acted on:
    #: an older event delivered late must not bring an older card back.
    default_payment_method_event_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: The signup that holds this customer (a random token) and until when (UTC): signups for
    #: one customer run one at a time, so concurrent ones make one provider customer, attach
    #: a card once, and never race on the default card. An expired lease is free again.
    signup_lease_token: Mapped[str | None] = mapped_column(String(40))
    signup_lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: The customer's language for mails (BCP 47 / CLDR, e.g. ``de-CH``); NULL: English.
    locale: Mapped[str | None] = mapped_column(String(35))
    #: The customer opted out of non-essential mails (receipts, trial reminders); dunning
    #: notices are sent regardless (billing.notices.NON_ESSENTIAL_KINDS).
    mail_opt_out: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    #: The default card as the provider described it when we attached it (brand, last 4),
    #: for reads; NULL when the card came as news from the provider without its details.
    default_card_brand: Mapped[str | None] = mapped_column(String(32))
    default_card_last4: Mapped[str | None] = mapped_column(String(4))


class PlanRow(Base):
    """The plan catalog. Subscriptions snapshot the price, so editing a plan never reprices
    an existing subscription."""

    __tablename__ = "plans"
    __table_args__ = (
        CheckConstraint("amount_minor >= 0", name="amount_minor_nonnegative"),
        CheckConstraint(one_of("interval", IntervalUnit), name="interval"),
        CheckConstraint("interval_count >= 1", name="interval_count_positive"),
        CheckConstraint("trial_days >= 0", name="trial_days_nonnegative"),
        CheckConstraint(one_of("dunning_final_action", FinalAction), name="dunning_final_action"),
    )

    code: Mapped[str] = mapped_column(String(63), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    interval: Mapped[IntervalUnit] = mapped_column(StrEnumType(IntervalUnit, 8))
    interval_count: Mapped[int] = mapped_column(Integer)
    trial_days: Mapped[int] = mapped_column(Integer)
    #: Days after the first failure, ascending (billing.dunning.DunningPolicy).
    dunning_retry_offsets_days: Mapped[list[int]] = mapped_column(JSON)
    dunning_final_action: Mapped[FinalAction] = mapped_column(StrEnumType(FinalAction, 16))
    active: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class SubscriptionRow(Base):
    __tablename__ = "subscriptions"
    __table_args__ = (
        CheckConstraint(one_of("status", SubscriptionStatus), name="status"),
        CheckConstraint("amount_minor >= 0", name="amount_minor_nonnegative"),
        CheckConstraint(one_of("interval", IntervalUnit), name="interval"),
        CheckConstraint("interval_count >= 1", name="interval_count_positive"),
        CheckConstraint("quantity >= 1", name="quantity_positive"),
        Index("ix_subscriptions_customer_id", "customer_id"),
        # Idempotency keys belong to the API key that sent them (as Stripe's belong to the
        # account): the same key from two API keys is two signups.
        UniqueConstraint("signup_key_scope", "signup_idempotency_key"),
        # The sweeper looks for signups whose workflow never started.
        Index("ix_subscriptions_status_created_at", "status", "created_at"),
        # MRR: the subscriptions created since a report's first month (migration 0021).
        Index("ix_subscriptions_created_at", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(40), ForeignKey("customers.id"))
    plan_code: Mapped[str] = mapped_column(String(63), ForeignKey("plans.code"))
    status: Mapped[SubscriptionStatus] = mapped_column(StrEnumType(SubscriptionStatus, 16))
    # Plan snapshot at signup: what this subscription is billed, whatever the catalog says later.
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    interval: Mapped[IntervalUnit] = mapped_column(StrEnumType(IntervalUnit, 8))
    interval_count: Mapped[int] = mapped_column(Integer)
    timezone: Mapped[str] = mapped_column(String(64))
    anchor_at: Mapped[datetime] = mapped_column(UTCDateTime)
    trial_end_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    current_period_start: Mapped[datetime | None] = mapped_column(UTCDateTime)
    current_period_end: Mapped[datetime | None] = mapped_column(UTCDateTime)
    next_billing_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancel_at_period_end: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default=false()
    )
    cancel_reason: Mapped[str | None] = mapped_column(String(500))
    canceled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    paused_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: Status needs_attention: the step that failed and why (for operators).
    attention_reason: Mapped[str | None] = mapped_column(String(2000))
    workflow_id: Mapped[str] = mapped_column(String(100), unique=True)
    signup_idempotency_key: Mapped[str | None] = mapped_column(String(200))
    signup_request_hash: Mapped[str | None] = mapped_column(String(64))
    #: Whose idempotency key it is: a digest of the API key that sent it ("" for signups made
    #: in-process, NULL for signups made before keys were scoped). Never the API key itself.
    signup_key_scope: Mapped[str | None] = mapped_column(String(64))
    #: The card this signup attached at the provider (``pm_...``), so a signup that can never
    #: start can detach it again.
    signup_payment_method_id: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    #: Seats: each period bills ``quantity x amount_minor`` (the plan's unit amount).
    quantity: Mapped[int] = mapped_column(Integer, default=1, server_default="1")


#: The renewal invoices the period's unique index holds (also in migration 0022).
LIVE_RENEWAL = "change_id IS NULL AND status <> 'void'"

#: An invoice neither paid, voided nor written off (also in migration 0019).
UNSETTLED = "paid_at IS NULL AND voided_at IS NULL AND marked_uncollectible_at IS NULL"
SETTLED_STAMPS = ("paid_at", "voided_at", "marked_uncollectible_at")


class InvoiceRow(Base):
    __tablename__ = "invoices"
    __table_args__ = (
        # One live renewal invoice per billing period: a retried or replayed create_invoice
        # finds this row instead of billing the customer twice. Its unique index also serves
        # lookups by (subscription_id, period_start), so no second index on those columns. An
        # invoice issued for a plan change is keyed by its change instead (``change_id``,
        # unique), so a change at the very instant a period renews never collides with the
        # renewal. A renewal voided as superseded (written by a discarded workflow task, see
        # migration 0022) leaves the period to the invoice the workflow decided.
        Index(
            "uq_invoices_renewal_period",
            "subscription_id",
            "period_start",
            unique=True,
            sqlite_where=text(LIVE_RENEWAL),
            postgresql_where=text(LIVE_RENEWAL),
        ),
        CheckConstraint("amount_due_minor >= 0", name="amount_due_nonnegative"),
        CheckConstraint(
            "credit_applied_minor >= 0 AND credit_applied_minor <= "
            "CASE WHEN subtotal_minor > 0 THEN subtotal_minor ELSE 0 END",
            name="credit_applied_within_subtotal",
        ),
        CheckConstraint(
            "amount_paid_minor >= 0 AND amount_paid_minor <= amount_due_minor",
            name="amount_paid_within_due",
        ),
        CheckConstraint(one_of("status", InvoiceStatus), name="status"),
        Index("ix_invoices_customer_id_created_at", "customer_id", "created_at"),
        Index("ix_invoices_status", "status"),
        # Finance listings and CSV exports page through invoices in (created_at, id) order.
        Index("ix_invoices_created_at_id", "created_at", "id"),
        # Listings filtered by billing period (e.g. "March's invoices"), see
        # db/repositories/finance.py.
        Index("ix_invoices_period_start_created_at_id", "period_start", "created_at", "id"),
        # AR aging (db/repositories/reports.py): the invoices owed now, read from the index
        # alone, and those settled after a past instant, by the stamp that settled them.
        Index(
            "ix_invoices_unsettled_finalized_at",
            "finalized_at",
            "currency",
            "amount_due_minor",
            postgresql_where=text(UNSETTLED),
            sqlite_where=text(UNSETTLED),
        ),
        *(
            Index(
                f"ix_invoices_{stamp}",
                stamp,
                postgresql_where=text(f"{stamp} IS NOT NULL"),
                sqlite_where=text(f"{stamp} IS NOT NULL"),
            )
            for stamp in SETTLED_STAMPS
        ),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    #: ``PREFIX-NNNN``, gap-free per customer.
    number: Mapped[str] = mapped_column(String(32), unique=True)
    subscription_id: Mapped[str] = mapped_column(String(40), ForeignKey("subscriptions.id"))
    customer_id: Mapped[str] = mapped_column(String(40), ForeignKey("customers.id"))
    period_index: Mapped[int] = mapped_column(Integer)
    period_start: Mapped[datetime] = mapped_column(UTCDateTime)
    period_end: Mapped[datetime] = mapped_column(UTCDateTime)
    amount_due_minor: Mapped[int] = mapped_column(BigInteger)
    amount_paid_minor: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[InvoiceStatus] = mapped_column(StrEnumType(InvoiceStatus, 16))
    description: Mapped[str] = mapped_column(String(500))
    status_reason: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finalized_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    paid_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    voided_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    marked_uncollectible_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: The invoice's one PaymentIntent (Stripe Billing's model): created by its first charge
    #: attempt that reaches the provider, confirmed again by every later one, canceled when
    #: the invoice is voided or written off. Unique: an intent pays one invoice, and a
    #: ``payment_intent.succeeded`` webhook finds its invoice by it.
    stripe_payment_intent_id: Mapped[str | None] = mapped_column(String(100), unique=True)
    #: Sum of the lines, and the credit balance used to pay it (minor units).
    subtotal_minor: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    credit_applied_minor: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    #: The plan change this invoice bills (its prorations), or NULL for a renewal.
    change_id: Mapped[str | None] = mapped_column(String(200), unique=True)


class InvoiceLineRow(Base):
    __tablename__ = "invoice_lines"
    __table_args__ = (
        # A retried or replayed issue writes each line once; lines are read in this order.
        UniqueConstraint("invoice_id", "position"),
        CheckConstraint("position >= 1", name="position_positive"),
        CheckConstraint("quantity >= 1", name="quantity_positive"),
        CheckConstraint(one_of("kind", InvoiceLineKind), name="kind"),
        CheckConstraint("period_end >= period_start", name="period_ordered"),
    )

    id: Mapped[str] = mapped_column(String(48), primary_key=True)
    invoice_id: Mapped[str] = mapped_column(String(40), ForeignKey("invoices.id"))
    position: Mapped[int] = mapped_column(Integer)
    kind: Mapped[InvoiceLineKind] = mapped_column(StrEnumType(InvoiceLineKind, 16))
    description: Mapped[str] = mapped_column(String(500))
    #: Signed minor units: a proration credit is negative.
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    period_start: Mapped[datetime] = mapped_column(UTCDateTime)
    period_end: Mapped[datetime] = mapped_column(UTCDateTime)
    plan_code: Mapped[str | None] = mapped_column(String(63))
    quantity: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    unit_amount_minor: Mapped[int | None] = mapped_column(BigInteger)
    change_id: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class BalanceEntryRow(Base):
    """The customer's credit balance, one signed entry per movement (``billing.balance``).
    Append-only: a correction is a new entry."""

    __tablename__ = "customer_balance_entries"
    __table_args__ = (
        CheckConstraint(one_of("kind", BalanceEntryKind), name="kind"),
        CheckConstraint("amount_minor <> 0", name="amount_nonzero"),
        Index("ix_customer_balance_entries_customer_currency", "customer_id", "currency"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(40), ForeignKey("customers.id"))
    currency: Mapped[str] = mapped_column(String(3))
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[BalanceEntryKind] = mapped_column(StrEnumType(BalanceEntryKind, 24))
    #: The decision that made it (``applied:in_...``); unique, so it is recorded once.
    source_key: Mapped[str] = mapped_column(String(200), unique=True)
    description: Mapped[str] = mapped_column(String(500))
    invoice_id: Mapped[str | None] = mapped_column(String(40), ForeignKey("invoices.id"))
    credit_note_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


#: The partial indexes' conditions (also in migration 0014).
FIRST_FAILED = "attempt_number = 1 AND outcome <> 'paid'"
RECOVERED = "outcome = 'paid' AND attempt_number > 1"


class PaymentAttemptRow(Base):
    __tablename__ = "payment_attempts"
    __table_args__ = (
        # One row per (invoice, attempt number): the attempt number is part of the provider
        # idempotency key, so a duplicate row would mean two charges under two keys.
        UniqueConstraint("invoice_id", "attempt_number"),
        CheckConstraint("attempt_number >= 1", name="attempt_number_positive"),
        CheckConstraint("amount_minor >= 0", name="amount_minor_nonnegative"),
        CheckConstraint(one_of("status", AttemptStatus), name="status"),
        CheckConstraint(one_of("outcome", ChargeOutcomeKind), name="outcome"),
        Index("ix_payment_attempts_stripe_payment_intent_id", "stripe_payment_intent_id"),
        # The dunning report (db/repositories/reports.py): invoices whose first attempt
        # failed, and the later attempt that paid them. Partial, so each holds a few percent
        # of the attempts.
        Index(
            "ix_payment_attempts_first_failed",
            "invoice_id",
            "outcome",
            postgresql_where=text(FIRST_FAILED),
            sqlite_where=text(FIRST_FAILED),
        ),
        Index(
            "ix_payment_attempts_recovered",
            "invoice_id",
            "attempt_number",
            postgresql_where=text(RECOVERED),
            sqlite_where=text(RECOVERED),
        ),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    invoice_id: Mapped[str] = mapped_column(String(40), ForeignKey("invoices.id"))
    attempt_number: Mapped[int] = mapped_column(Integer)
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[AttemptStatus] = mapped_column(StrEnumType(AttemptStatus, 24))
    # NULL passes the IN check (SQL three-valued logic): no outcome until the provider answers.
    outcome: Mapped[ChargeOutcomeKind | None] = mapped_column(StrEnumType(ChargeOutcomeKind, 32))
    decline_code: Mapped[str | None] = mapped_column(String(64))
    failure_message: Mapped[str | None] = mapped_column(String(500))
    reason: Mapped[str] = mapped_column(String(32))
    stripe_payment_intent_id: Mapped[str | None] = mapped_column(String(100))
    stripe_charge_id: Mapped[str | None] = mapped_column(String(100))
    payment_method_id: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class PaymentRow(Base):
    """A settled charge. ``invoice_id`` is unique: two successful charges can never both be
    recorded against one invoice, whatever races the workers run into."""

    __tablename__ = "payments"
    __table_args__ = (CheckConstraint("amount_minor > 0", name="amount_minor_positive"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    invoice_id: Mapped[str] = mapped_column(String(40), ForeignKey("invoices.id"), unique=True)
    attempt_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("payment_attempts.id"), unique=True
    )
    stripe_payment_intent_id: Mapped[str] = mapped_column(String(100), unique=True)
    stripe_charge_id: Mapped[str | None] = mapped_column(String(100), unique=True)
    balance_transaction_id: Mapped[str | None] = mapped_column(String(100))
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    #: Fee, net and gross as the account received them, in ``settlement_currency``.
    fee_minor: Mapped[int | None] = mapped_column(BigInteger)
    net_minor: Mapped[int | None] = mapped_column(BigInteger)
    settlement_amount_minor: Mapped[int | None] = mapped_column(BigInteger)
    settlement_currency: Mapped[str | None] = mapped_column(String(3))
    settled_at: Mapped[datetime] = mapped_column(UTCDateTime)


class CreditNoteRow(Base):
    """A credit note on an invoice (``billing.credit_notes``): its total, and on a paid
    invoice the split into refund, credit to the balance and an amount settled outside.
    Numbered gap-free per customer (``sequence``, under the customer's lock)."""

    __tablename__ = "credit_notes"
    __table_args__ = (
        UniqueConstraint("customer_id", "sequence"),
        # A repeated request (same Idempotency-Key from the same API key) finds its note.
        UniqueConstraint("key_scope", "idempotency_key"),
        CheckConstraint("sequence >= 1", name="sequence_positive"),
        CheckConstraint("amount_minor > 0", name="amount_positive"),
        CheckConstraint(
            "refund_amount_minor >= 0 AND credit_amount_minor >= 0 "
            "AND out_of_band_amount_minor >= 0 AND amount_due_reduction_minor >= 0",
            name="parts_nonnegative",
        ),
        CheckConstraint(
            "refund_amount_minor + credit_amount_minor + out_of_band_amount_minor "
            "+ amount_due_reduction_minor = amount_minor",
            name="parts_add_up",
        ),
        CheckConstraint(one_of("reason", CreditNoteReason), name="reason"),
        CheckConstraint("type IN ('pre_payment', 'post_payment')", name="type"),
        Index("ix_credit_notes_invoice_id", "invoice_id"),
        Index("ix_credit_notes_created_at_id", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    number: Mapped[str] = mapped_column(String(40), unique=True)
    customer_id: Mapped[str] = mapped_column(String(40), ForeignKey("customers.id"))
    sequence: Mapped[int] = mapped_column(Integer)
    invoice_id: Mapped[str] = mapped_column(String(40), ForeignKey("invoices.id"))
    #: Stripe's: ``post_payment`` on a paid invoice, ``pre_payment`` on an open one.
    type: Mapped[str] = mapped_column(String(16))
    currency: Mapped[str] = mapped_column(String(3))
    reason: Mapped[CreditNoteReason | None] = mapped_column(StrEnumType(CreditNoteReason, 32))
    memo: Mapped[str | None] = mapped_column(String(500))
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    refund_amount_minor: Mapped[int] = mapped_column(BigInteger)
    credit_amount_minor: Mapped[int] = mapped_column(BigInteger)
    out_of_band_amount_minor: Mapped[int] = mapped_column(BigInteger)
    amount_due_reduction_minor: Mapped[int] = mapped_column(BigInteger)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    #: Whose key it is (a digest of the API key; "" in-process), as for signups.
    key_scope: Mapped[str | None] = mapped_column(String(64))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    #: The API key's name (or "cli") that issued it, for the audit trail.
    created_by: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class CreditNoteLineRow(Base):
    __tablename__ = "credit_note_lines"
    __table_args__ = (
        UniqueConstraint("credit_note_id", "position"),
        CheckConstraint("position >= 1", name="position_positive"),
        CheckConstraint("amount_minor > 0", name="amount_positive"),
        Index("ix_credit_note_lines_invoice_line_id", "invoice_line_id"),
    )

    id: Mapped[str] = mapped_column(String(48), primary_key=True)
    credit_note_id: Mapped[str] = mapped_column(String(40), ForeignKey("credit_notes.id"))
    position: Mapped[int] = mapped_column(Integer)
    #: The invoice line it credits; None for a credit on the invoice as a whole.
    invoice_line_id: Mapped[str | None] = mapped_column(String(48), ForeignKey("invoice_lines.id"))
    description: Mapped[str] = mapped_column(String(500))
    amount_minor: Mapped[int] = mapped_column(BigInteger)


class RefundRow(Base):
    """A refund of a payment: ours (a credit note's, recorded ``pending`` before the provider
    is called, with the key derived from (credit note, refund number)) or one made elsewhere
    and learnt from the provider. One row per provider refund (``stripe_refund_id``)."""

    __tablename__ = "refunds"
    __table_args__ = (
        UniqueConstraint("credit_note_id", "refund_number"),
        CheckConstraint("amount_minor > 0", name="amount_positive"),
        CheckConstraint("refund_number >= 1", name="refund_number_positive"),
        CheckConstraint(one_of("status", RefundStatus), name="status"),
        CheckConstraint(one_of("source", RefundSource), name="source"),
        CheckConstraint(one_of("reason", RefundReason), name="reason"),
        # A credit note's refund has its key; one made elsewhere has its provider id.
        CheckConstraint(
            "(source = 'credit_note' AND credit_note_id IS NOT NULL "
            "AND refund_number IS NOT NULL AND idempotency_key IS NOT NULL) "
            "OR (source = 'provider' AND stripe_refund_id IS NOT NULL)",
            name="source_identified",
        ),
        Index("ix_refunds_payment_id", "payment_id"),
        Index("ix_refunds_status_created_at", "status", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    invoice_id: Mapped[str] = mapped_column(String(40), ForeignKey("invoices.id"))
    payment_id: Mapped[str] = mapped_column(String(40), ForeignKey("payments.id"))
    credit_note_id: Mapped[str | None] = mapped_column(String(40), ForeignKey("credit_notes.id"))
    refund_number: Mapped[int | None] = mapped_column(Integer)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    source: Mapped[RefundSource] = mapped_column(StrEnumType(RefundSource, 16))
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    reason: Mapped[RefundReason | None] = mapped_column(StrEnumType(RefundReason, 32))
    status: Mapped[RefundStatus] = mapped_column(StrEnumType(RefundStatus, 24))
    stripe_refund_id: Mapped[str | None] = mapped_column(String(100), unique=True)
    stripe_charge_id: Mapped[str | None] = mapped_column(String(100))
    balance_transaction_id: Mapped[str | None] = mapped_column(String(100))
    failure_reason: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class DisputeRow(Base):
    """A dispute of one of our payments (or of a charge we cannot place: ``payment_id``
    NULL), as the provider last reported it."""

    __tablename__ = "disputes"
    __table_args__ = (
        CheckConstraint("amount_minor > 0", name="amount_positive"),
        CheckConstraint(one_of("status", DisputeStatus), name="status"),
        Index("ix_disputes_payment_id", "payment_id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    stripe_dispute_id: Mapped[str] = mapped_column(String(100), unique=True)
    stripe_charge_id: Mapped[str] = mapped_column(String(100))
    payment_id: Mapped[str | None] = mapped_column(String(40), ForeignKey("payments.id"))
    invoice_id: Mapped[str | None] = mapped_column(String(40), ForeignKey("invoices.id"))
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[DisputeStatus] = mapped_column(StrEnumType(DisputeStatus, 32))
    reason: Mapped[str | None] = mapped_column(String(64))
    evidence_due_by: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class LedgerEntryRow(Base):
    """One Stripe balance transaction, mirrored (``billing.ledger``). Append-only: the
    repository only inserts, once per transaction id; a correction is a new transaction."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        Index("ix_ledger_entries_source_id", "source_id"),
        Index("ix_ledger_entries_provider_created_at", "provider_created_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    balance_transaction_id: Mapped[str] = mapped_column(String(100), unique=True)
    type: Mapped[str] = mapped_column(String(40))
    reporting_category: Mapped[str | None] = mapped_column(String(40))
    #: Gross, fee and net in the settlement ``currency`` (minor units; signed).
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    fee_minor: Mapped[int] = mapped_column(BigInteger)
    net_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    source_id: Mapped[str | None] = mapped_column(String(100))
    #: The source's own amount and currency (the charge as the customer paid it), when known.
    source_amount_minor: Mapped[int | None] = mapped_column(BigInteger)
    source_currency: Mapped[str | None] = mapped_column(String(3))
    #: Stripe's exchange rate, as its exact decimal text (no float in the database).
    exchange_rate: Mapped[str | None] = mapped_column(String(32))
    payment_id: Mapped[str | None] = mapped_column(String(40))
    refund_id: Mapped[str | None] = mapped_column(String(40))
    dispute_id: Mapped[str | None] = mapped_column(String(40))
    description: Mapped[str | None] = mapped_column(String(500))
    provider_created_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    available_on: Mapped[datetime | None] = mapped_column(UTCDateTime)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime)


class PayoutRow(Base):
    """A Stripe payout, as last read (its status moves: pending, in transit, paid/failed)."""

    __tablename__ = "payouts"
    __table_args__ = (Index("ix_payouts_provider_created_at", "provider_created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    stripe_payout_id: Mapped[str] = mapped_column(String(100), unique=True)
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(16))
    automatic: Mapped[bool] = mapped_column(Boolean)
    balance_transaction_id: Mapped[str | None] = mapped_column(String(100))
    arrival_date: Mapped[datetime | None] = mapped_column(UTCDateTime)
    provider_created_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    failure_code: Mapped[str | None] = mapped_column(String(64))
    #: When its balance transactions were last imported (None: not yet).
    imported_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class PayoutItemRow(Base):
    """A balance transaction a payout paid out (``GET /v1/balance_transactions?payout=``)."""

    __tablename__ = "payout_items"
    __table_args__ = (
        UniqueConstraint("payout_id", "balance_transaction_id"),
        Index("ix_payout_items_balance_transaction_id", "balance_transaction_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    payout_id: Mapped[str] = mapped_column(String(40), ForeignKey("payouts.id"))
    balance_transaction_id: Mapped[str] = mapped_column(
        String(100), ForeignKey("ledger_entries.balance_transaction_id")
    )


class ReconciliationFindingRow(Base):
    """A difference the daily charge reconciliation found between Stripe and our attempts,
    once per (kind, subject): a later run finds it again and records nothing new."""

    __tablename__ = "reconciliation_findings"
    __table_args__ = (
        UniqueConstraint("kind", "subject_key"),
        CheckConstraint("severity IN ('info', 'warning', 'error')", name="severity"),
        CheckConstraint(
            "(resolved_at IS NULL AND resolved_by IS NULL AND resolution_note IS NULL) OR "
            "(resolved_at IS NOT NULL AND resolved_by IS NOT NULL AND resolution_note IS NOT NULL)",
            name="resolved_together",
        ),
        Index("ix_reconciliation_findings_found_at", "found_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    kind: Mapped[str] = mapped_column(String(40))
    severity: Mapped[str] = mapped_column(String(8))
    #: What it is about (a PaymentIntent or charge id), unique per kind.
    subject_key: Mapped[str] = mapped_column(String(200))
    invoice_id: Mapped[str | None] = mapped_column(String(40))
    payment_intent_id: Mapped[str | None] = mapped_column(String(100))
    charge_id: Mapped[str | None] = mapped_column(String(100))
    amount_minor: Mapped[int | None] = mapped_column(BigInteger)
    currency: Mapped[str | None] = mapped_column(String(3))
    detail: Mapped[str] = mapped_column(String(1000))
    found_at: Mapped[datetime] = mapped_column(UTCDateTime)
    #: The run (the schedule's day) that found it first.
    run_id: Mapped[str] = mapped_column(String(100))
    #: Finance's resolution (who, when, why): all three or none. A resolved finding that a
    #: later run finds again stays one row (keyed by kind and subject) and stays resolved.
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    resolved_by: Mapped[str | None] = mapped_column(String(200))
    resolution_note: Mapped[str | None] = mapped_column(String(2000))


class PlanChangeRequestRow(Base):
    """A plan change asked for with an ``Idempotency-Key`` (POST .../change-plan), claimed
    before the workflow is asked: the key belongs to the API key that sent it (``key_scope``,
    a digest, as for signups and credit notes) and to one request (``request_hash``: another
    body under the same key is refused). ``change_id`` is the workflow Update's id, so every
    repeat asks for the same change; ``result`` is the first answer, replayed to every
    repeat, also after the workflow continued as new."""

    __tablename__ = "plan_change_requests"
    __table_args__ = (
        UniqueConstraint("key_scope", "idempotency_key"),
        CheckConstraint("status IN ('requested', 'applied')", name="status"),
        Index("ix_plan_change_requests_subscription_id", "subscription_id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    subscription_id: Mapped[str] = mapped_column(String(40), ForeignKey("subscriptions.id"))
    key_scope: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str] = mapped_column(String(200))
    request_hash: Mapped[str] = mapped_column(String(64))
    change_id: Mapped[str] = mapped_column(String(200), unique=True)
    status: Mapped[str] = mapped_column(String(16))
    #: The first answer (the API's JSON body), once the workflow gave it.
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class SubscriptionStatusChangeRow(Base):
    """Every status a subscription moved to, with the instant its workflow decided it: the
    audit trail finance and support read (and the simulator's status timeline). Written in
    the same transaction as the mirrored status, and only when the status changes, so a
    retried sync writes nothing twice."""

    __tablename__ = "subscription_status_changes"
    __table_args__ = (
        CheckConstraint(one_of("to_status", SubscriptionStatus), name="to_status"),
        Index(
            "ix_subscription_status_changes_subscription_id_changed_at",
            "subscription_id",
            "changed_at",
        ),
        # MRR: the subscriptions changed since a report's first month (migration 0021).
        Index("ix_subscription_status_changes_changed_at", "changed_at", "subscription_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    subscription_id: Mapped[str] = mapped_column(String(40), ForeignKey("subscriptions.id"))
    from_status: Mapped[SubscriptionStatus] = mapped_column(StrEnumType(SubscriptionStatus, 16))
    to_status: Mapped[SubscriptionStatus] = mapped_column(StrEnumType(SubscriptionStatus, 16))
    #: When the workflow decided the change (its deterministic clock), UTC.
    changed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    #: Why, when known: the cancel reason for a cancellation.
    reason: Mapped[str | None] = mapped_column(String(500))


def _monthly_sql(side: str) -> str:
    """billing.reports.monthly_recurring_minor of one side of a terms change, in integer SQL
    (as migration 0024 generates it): p / q rounded half to even, p = amount x quantity x
    (52 a week, 365 a day, else 1), q = count x (1 a month, else 12)."""
    unit = f"{side}_interval"
    p = (
        f"({side}_amount_minor * {side}_quantity * CASE {unit} WHEN 'week' THEN 52 "
        "WHEN 'day' THEN 365 ELSE 1 END)"
    )
    q = f"({side}_interval_count * CASE {unit} WHEN 'month' THEN 1 ELSE 12 END)"
    return (
        f"({p} / {q} + CASE WHEN 2 * ({p} % {q}) > {q} THEN 1 "
        f"WHEN 2 * ({p} % {q}) = {q} THEN ({p} / {q}) % 2 ELSE 0 END)"
    )


class SubscriptionTermsChangeRow(Base):
    """Every plan or seat change a subscription's billing terms went through, with the instant
    its workflow applied it: the price history MRR's expansion and contraction come from
    (migration 0024), and the plan history support reads. Written with the terms themselves,
    only when they change, so a retried sync writes nothing twice. The currency never changes
    (billing.plan_change refuses it), so it is not kept."""

    __tablename__ = "subscription_terms_changes"
    __table_args__ = (
        CheckConstraint(one_of("from_interval", IntervalUnit), name="from_interval"),
        CheckConstraint(one_of("to_interval", IntervalUnit), name="to_interval"),
        Index(
            "ix_subscription_terms_changes_subscription_id_changed_at",
            "subscription_id",
            "changed_at",
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    subscription_id: Mapped[str] = mapped_column(String(40), ForeignKey("subscriptions.id"))
    #: When the workflow applied the change (its deterministic clock), UTC.
    changed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    from_plan_code: Mapped[str] = mapped_column(String(63))
    to_plan_code: Mapped[str] = mapped_column(String(63))
    from_amount_minor: Mapped[int] = mapped_column(BigInteger)
    to_amount_minor: Mapped[int] = mapped_column(BigInteger)
    from_quantity: Mapped[int] = mapped_column(Integer)
    to_quantity: Mapped[int] = mapped_column(Integer)
    from_interval: Mapped[IntervalUnit] = mapped_column(StrEnumType(IntervalUnit, 8))
    to_interval: Mapped[IntervalUnit] = mapped_column(StrEnumType(IntervalUnit, 8))
    from_interval_count: Mapped[int] = mapped_column(Integer)
    to_interval_count: Mapped[int] = mapped_column(Integer)
    #: Each side's monthly amount (billing.reports.monthly_recurring_minor), generated by the
    #: database (migration 0024): what MRR reads.
    from_monthly_minor: Mapped[int] = mapped_column(
        BigInteger, Computed(_monthly_sql("from"), persisted=True)
    )
    to_monthly_minor: Mapped[int] = mapped_column(
        BigInteger, Computed(_monthly_sql("to"), persisted=True)
    )


class NotificationRow(Base):
    """The notification outbox: written in the same transaction as the change it reports."""

    __tablename__ = "notifications"
    __table_args__ = (
        Index("ix_notifications_customer_id_created_at", "customer_id", "created_at"),
        Index("ix_notifications_subscription_id", "subscription_id"),
        CheckConstraint(one_of("status", NoticeStatus), name="status"),
        CheckConstraint("attempts >= 0", name="attempts_nonnegative"),
        # The sender's dispatcher looks for pending notices, oldest first.
        Index("ix_notifications_status_created_at", "status", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    kind: Mapped[str] = mapped_column(String(40))
    #: The customer told; None for a mail to the business (``recipient``).
    customer_id: Mapped[str | None] = mapped_column(String(40), ForeignKey("customers.id"))
    subscription_id: Mapped[str | None] = mapped_column(String(40), ForeignKey("subscriptions.id"))
    invoice_id: Mapped[str | None] = mapped_column(String(40), ForeignKey("invoices.id"))
    #: A mail to the business: its address (customer notices go to the customer's e-mail).
    recipient: Mapped[str | None] = mapped_column(String(320))
    dedupe_key: Mapped[str] = mapped_column(String(200), unique=True)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    #: When the mail server accepted it.
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    status: Mapped[NoticeStatus] = mapped_column(
        StrEnumType(NoticeStatus, 16), default=NoticeStatus.PENDING, server_default="pending"
    )
    #: Delivery attempts made (each one an SMTP conversation).
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: Why the last attempt failed, or why it was skipped (never a secret).
    last_error: Mapped[str | None] = mapped_column(String(500))
    #: The mail's Message-ID, the same on every attempt.
    message_id: Mapped[str | None] = mapped_column(String(250))
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: When the dispatcher last handed it to a delivery workflow.
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class WebhookEventRow(Base):
    """Provider webhook events we accepted. The primary key is the provider's event id, so a
    redelivered event (Stripe delivers at least once) is recognised by the insert itself.

    ``subscription_id`` is deliberately not a foreign key: this is an audit log of what the
    provider told us, and it must not stop a pending subscription from being deleted.
    """

    __tablename__ = "webhook_events"
    __table_args__ = (Index("ix_webhook_events_subscription_id", "subscription_id"),)

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    type: Mapped[str] = mapped_column(String(100))
    outcome: Mapped[str] = mapped_column(String(32))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    claimed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    processed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    subscription_id: Mapped[str | None] = mapped_column(String(40))
    detail: Mapped[str | None] = mapped_column(String(500))


class EventEndpointRow(Base):
    """A URL of the business's that receives our events (webhooks we send), with the secret
    that signs them. The secret is stored as given (it must sign every delivery) and shown
    only once, when the endpoint is created."""

    __tablename__ = "event_endpoints"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    url: Mapped[str] = mapped_column(String(2000))
    #: SHA-256 hex of the URL: one endpoint per URL, so a repeated registration finds the
    #: first (a unique index on the URL itself could exceed PostgreSQL's index row size).
    url_digest: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str | None] = mapped_column(String(500))
    #: Event types it receives (``*``: all).
    event_types: Mapped[list[str]] = mapped_column(JSON)
    secret: Mapped[str] = mapped_column(String(100))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    #: Why it was disabled (by an operator, or after failing for 3 days).
    disabled_reason: Mapped[str | None] = mapped_column(String(500))
    #: Who is told by e-mail when it is disabled (else ``BILLING_EVENTS_CONTACT_EMAIL``).
    contact_email: Mapped[str | None] = mapped_column(String(320))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class EventRow(Base):
    """An event for the business, written in the same transaction as the change it reports.
    ``sequence`` counts the stream's events from 1: receivers can order them and notice a
    gap. The stream is ``subscription_id``: a subscription's id, or ``account`` (reserved;
    ``billing.business_events.ACCOUNT_STREAM``) for account-level events such as payouts, so
    the unique (subscription_id, sequence) and the NOT NULL hold for both."""

    __tablename__ = "events"
    __table_args__ = (
        UniqueConstraint("subscription_id", "sequence"),
        CheckConstraint("sequence >= 1", name="sequence_positive"),
        # GET /v1/events pages in (created_at, id) order.
        Index("ix_events_created_at_id", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    type: Mapped[str] = mapped_column(String(64))
    #: The stream: a subscription's id or ``account``. Not a foreign key, like
    #: webhook_events: an audit log that must not block a deletion.
    subscription_id: Mapped[str] = mapped_column(String(40))
    sequence: Mapped[int] = mapped_column(Integer)
    object_id: Mapped[str] = mapped_column(String(40))
    #: The object as the API shows it, when the event happened.
    object: Mapped[dict[str, Any]] = mapped_column(JSON)
    #: What makes the event unique (e.g. ``in_…:invoice.paid``): a retried activity writes it
    #: once.
    dedupe_key: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class EventDeliveryRow(Base):
    """One event owed to one endpoint. Deliveries of one (endpoint, subscription) go out one
    at a time in ``sequence`` order."""

    __tablename__ = "event_deliveries"
    __table_args__ = (
        UniqueConstraint("event_id", "endpoint_id"),
        CheckConstraint(one_of("status", DeliveryStatus), name="status"),
        Index("ix_event_deliveries_stream", "endpoint_id", "subscription_id", "status", "sequence"),
        Index("ix_event_deliveries_status_dispatched_at", "status", "dispatched_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(40), ForeignKey("events.id"))
    endpoint_id: Mapped[str] = mapped_column(String(40), ForeignKey("event_endpoints.id"))
    subscription_id: Mapped[str] = mapped_column(String(40))
    sequence: Mapped[int] = mapped_column(Integer)
    status: Mapped[DeliveryStatus] = mapped_column(StrEnumType(DeliveryStatus, 16))
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class EventDeliveryAttemptRow(Base):
    """One HTTP request of a delivery, with what the endpoint answered."""

    __tablename__ = "event_delivery_attempts"
    __table_args__ = (Index("ix_event_delivery_attempts_delivery_id", "delivery_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(String(40), ForeignKey("event_deliveries.id"))
    attempted_at: Mapped[datetime] = mapped_column(UTCDateTime)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(String(500))
    duration_ms: Mapped[int] = mapped_column(Integer)


# The same tables as SQLAlchemy Core objects, for the repositories' statements. The repositories
# read and write column values, never ORM entities, and a Core statement skips the ORM's
# per-execution compile and bulk-persistence steps (about a third of the worker's CPU per billed
# period went there).
def _table(model: type[Base]) -> Table:
    return cast(Table, model.__table__)


CUSTOMERS = _table(CustomerRow)
PLANS = _table(PlanRow)
SUBSCRIPTIONS = _table(SubscriptionRow)
INVOICES = _table(InvoiceRow)
PAYMENT_ATTEMPTS = _table(PaymentAttemptRow)
PAYMENTS = _table(PaymentRow)
SUBSCRIPTION_STATUS_CHANGES = _table(SubscriptionStatusChangeRow)
SUBSCRIPTION_TERMS_CHANGES = _table(SubscriptionTermsChangeRow)
NOTIFICATIONS = _table(NotificationRow)
WEBHOOK_EVENTS = _table(WebhookEventRow)
INVOICE_LINES = _table(InvoiceLineRow)
BALANCE_ENTRIES = _table(BalanceEntryRow)


class ProviderPacingSlotRow(Base):
    """The shared schedule of provider requests (``billing.pacing``): a ring of slots per paced
    queue. A slot is used by one request at a time and again only a second and a margin after
    its last request was stamped; any one-second window thus holds at most one request per
    slot. Every worker takes, stamps and lets go of slots with one atomic UPDATE each."""

    __tablename__ = "provider_pacing_slots"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    slot: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: When the slot may next be stamped, Unix seconds (the database server's clock on
    #: PostgreSQL): its last stamp plus the reuse interval.
    free_at: Mapped[float] = mapped_column(Double)
    #: When its last holder planned to stamp it (at or after ``free_at``): the next hold in
    #: the ring plans its own stamp at least ``billing.pacing.min_gap_s`` after the latest.
    planned_at: Mapped[float] = mapped_column(Double)
    #: The request waiting for it (a random token), None if nobody holds it.
    held_by: Mapped[str | None] = mapped_column(String(64))
    #: When that hold lapses (its holder presumed gone), Unix seconds; None when not held.
    held_until: Mapped[float | None] = mapped_column(Double)

    __table_args__ = (
        CheckConstraint("slot >= 0", name="slot_not_negative"),
        CheckConstraint("(held_by IS NULL) = (held_until IS NULL)", name="hold_has_lease"),
    )


PROVIDER_PACING_SLOTS = _table(ProviderPacingSlotRow)
PLAN_CHANGE_REQUESTS = _table(PlanChangeRequestRow)
EVENT_ENDPOINTS = _table(EventEndpointRow)
EVENTS = _table(EventRow)
EVENT_DELIVERIES = _table(EventDeliveryRow)
EVENT_DELIVERY_ATTEMPTS = _table(EventDeliveryAttemptRow)
CREDIT_NOTES = _table(CreditNoteRow)
CREDIT_NOTE_LINES = _table(CreditNoteLineRow)
REFUNDS = _table(RefundRow)
DISPUTES = _table(DisputeRow)
LEDGER_ENTRIES = _table(LedgerEntryRow)
PAYOUTS = _table(PayoutRow)
PAYOUT_ITEMS = _table(PayoutItemRow)
RECONCILIATION_FINDINGS = _table(ReconciliationFindingRow)


class ReportMonthlyTotalsRow(Base):
    """Collected vs invoiced, kept per UTC month and currency so the report reads a few rows
    instead of summing every invoice, payment and refund (1M invoices: seconds).

    Maintained by database triggers on ``invoices``, ``payments`` and ``refunds`` (migration
    0019), in the same transaction as every write to them, whoever makes it: each write takes
    back its rows' old contribution and adds the new one. A month's figures are what
    ``db.repositories.reports.monthly_invoiced`` / ``_collected`` / ``_fees`` /
    ``_refunded`` compute from the rows themselves (tests/db/test_report_totals.py). Counts
    are kept beside the amounts so a month whose rows all went away is known to be empty.
    """

    __tablename__ = "report_monthly_totals"

    #: ``YYYY-MM``, the UTC month.
    month: Mapped[str] = mapped_column(String(7), primary_key=True)
    currency: Mapped[str] = mapped_column(String(3), primary_key=True)
    #: PostgreSQL keeps a month and currency in up to 16 rows, a connection writing to
    #: ``pg_backend_pid() % 16``, so concurrent transactions do not queue on one row lock until
    #: they commit; readers sum the slots. SQLite (one writer at a time) uses slot 0 only.
    slot: Mapped[int] = mapped_column(SmallInteger, primary_key=True, server_default="0")
    #: Invoices issued (``created_at``) that month, neither draft nor void: amount due.
    invoiced_minor: Mapped[int] = mapped_column(BigInteger, server_default="0")
    invoices: Mapped[int] = mapped_column(BigInteger, server_default="0")
    #: Payments settled that month, in the charge currency.
    collected_minor: Mapped[int] = mapped_column(BigInteger, server_default="0")
    payments: Mapped[int] = mapped_column(BigInteger, server_default="0")
    #: Provider fees of the payments settled that month, in their settlement currency.
    fees_minor: Mapped[int] = mapped_column(BigInteger, server_default="0")
    fee_payments: Mapped[int] = mapped_column(BigInteger, server_default="0")
    #: Refunds that succeeded (``completed_at``) that month, in the charge currency.
    refunded_minor: Mapped[int] = mapped_column(BigInteger, server_default="0")
    refunds: Mapped[int] = mapped_column(BigInteger, server_default="0")


REPORT_MONTHLY_TOTALS = _table(ReportMonthlyTotalsRow)


class ReportMrrPriceRow(Base):
    """The subscriptions that count toward MRR now (billing.reports.MRR_STATUSES), per
    currency and price, kept by triggers on ``subscriptions`` (migration 0021). The MRR report
    takes from these the subscriptions created or changed since its first month, and has the
    steady rest without scanning the book (tests/db/test_report_rollups.py)."""

    __tablename__ = "report_mrr_prices"

    currency: Mapped[str] = mapped_column(String(3), primary_key=True)
    amount_minor: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    interval: Mapped[str] = mapped_column(String(8), primary_key=True)
    interval_count: Mapped[int] = mapped_column(Integer, primary_key=True)
    quantity: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: As ``report_monthly_totals.slot``: PostgreSQL spreads writers over 16 rows.
    slot: Mapped[int] = mapped_column(SmallInteger, primary_key=True, server_default="0")
    subscriptions: Mapped[int] = mapped_column(BigInteger, server_default="0")


class ReportMrrCustomerRow(Base):
    """Per currency and customer: how many of their subscriptions count toward MRR now with a
    monthly amount above 0 (migration 0021). Rows at 0 stay."""

    __tablename__ = "report_mrr_customers"

    currency: Mapped[str] = mapped_column(String(3), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    subscriptions: Mapped[int] = mapped_column(BigInteger, server_default="0")


class ReportMrrCurrencyCustomersRow(Base):
    """Per currency: the customers whose ``report_mrr_customers`` count is above 0, summed
    over the slots (migration 0021)."""

    __tablename__ = "report_mrr_currency_customers"

    currency: Mapped[str] = mapped_column(String(3), primary_key=True)
    slot: Mapped[int] = mapped_column(SmallInteger, primary_key=True, server_default="0")
    customers: Mapped[int] = mapped_column(BigInteger, server_default="0")


class ReportDunningInvoiceRow(Base):
    """One row per invoice whose first charge attempt did not pay it: what the dunning report
    groups, copied from the invoice and its attempts by triggers on both (migration 0021) and
    recomputed from them on every change, so it is what
    ``db.repositories.reports.failed_invoices_from_rows`` reads."""

    __tablename__ = "report_dunning_invoices"

    invoice_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    #: ``YYYY-MM``, the UTC month the invoice was issued (``created_at``).
    month: Mapped[str] = mapped_column(String(7))
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(16))
    #: The first attempt's outcome (billing.payments.ChargeOutcomeKind, never ``paid``).
    first_failure: Mapped[str] = mapped_column(String(32))
    #: The lowest attempt number above 1 that paid it; 0 when none did.
    paid_by_attempt: Mapped[int] = mapped_column(Integer)
    amount_due_minor: Mapped[int] = mapped_column(BigInteger)


class ReportDunningMonthlyRow(Base):
    """``report_dunning_invoices`` summed per month and key, in slots as the other totals: the
    dunning report reads these (migration 0021)."""

    __tablename__ = "report_dunning_monthly"

    month: Mapped[str] = mapped_column(String(7), primary_key=True)
    currency: Mapped[str] = mapped_column(String(3), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), primary_key=True)
    first_failure: Mapped[str] = mapped_column(String(32), primary_key=True)
    paid_by_attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    slot: Mapped[int] = mapped_column(SmallInteger, primary_key=True, server_default="0")
    invoices: Mapped[int] = mapped_column(BigInteger, server_default="0")
    amount_due_minor: Mapped[int] = mapped_column(BigInteger, server_default="0")


class ReportMrrCustomerMonthRow(Base):
    """Per currency, customer and month: what the customer's subscriptions add to MRR at the
    month's first instant (levels: MRR, subscriptions and customers counted) and move in the
    month before it (new, reactivated, churned, churned customers, expansion, contraction).
    Recomputed from the customer's subscriptions, status changes and terms changes by triggers
    on all three (migrations 0023, 0024), so it is what ``billing.reports.mrr_report``
    computes from those rows."""

    __tablename__ = "report_mrr_customer_months"

    customer_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    currency: Mapped[str] = mapped_column(String(3), primary_key=True)
    #: ``YYYY-MM``: the levels move at this month's start; the movements are the month before.
    month: Mapped[str] = mapped_column(String(7), primary_key=True)
    mrr_minor: Mapped[int] = mapped_column(BigInteger, server_default="0")
    subscriptions: Mapped[int] = mapped_column(BigInteger, server_default="0")
    customers: Mapped[int] = mapped_column(BigInteger, server_default="0")
    new_minor: Mapped[int] = mapped_column(BigInteger, server_default="0")
    reactivated_minor: Mapped[int] = mapped_column(BigInteger, server_default="0")
    churned_minor: Mapped[int] = mapped_column(BigInteger, server_default="0")
    churned_customers: Mapped[int] = mapped_column(BigInteger, server_default="0")
    expansion_minor: Mapped[int] = mapped_column(BigInteger, server_default="0")
    contraction_minor: Mapped[int] = mapped_column(BigInteger, server_default="0")


class ReportMrrMonthlyRow(Base):
    """``report_mrr_customer_months`` summed per currency and month, in slots as the other
    totals: the MRR report reads these (migration 0023), a few rows a month whatever the range."""

    __tablename__ = "report_mrr_monthly"

    currency: Mapped[str] = mapped_column(String(3), primary_key=True)
    month: Mapped[str] = mapped_column(String(7), primary_key=True)
    slot: Mapped[int] = mapped_column(SmallInteger, primary_key=True, server_default="0")
    mrr_minor: Mapped[int] = mapped_column(BigInteger, server_default="0")
    subscriptions: Mapped[int] = mapped_column(BigInteger, server_default="0")
    customers: Mapped[int] = mapped_column(BigInteger, server_default="0")
    new_minor: Mapped[int] = mapped_column(BigInteger, server_default="0")
    reactivated_minor: Mapped[int] = mapped_column(BigInteger, server_default="0")
    churned_minor: Mapped[int] = mapped_column(BigInteger, server_default="0")
    churned_customers: Mapped[int] = mapped_column(BigInteger, server_default="0")
    expansion_minor: Mapped[int] = mapped_column(BigInteger, server_default="0")
    contraction_minor: Mapped[int] = mapped_column(BigInteger, server_default="0")


REPORT_MRR_PRICES = _table(ReportMrrPriceRow)
REPORT_MRR_CUSTOMERS = _table(ReportMrrCustomerRow)
REPORT_MRR_CURRENCY_CUSTOMERS = _table(ReportMrrCurrencyCustomersRow)
REPORT_DUNNING_INVOICES = _table(ReportDunningInvoiceRow)
REPORT_DUNNING_MONTHLY = _table(ReportDunningMonthlyRow)
REPORT_MRR_CUSTOMER_MONTHS = _table(ReportMrrCustomerMonthRow)
REPORT_MRR_MONTHLY = _table(ReportMrrMonthlyRow)

#: Every table the database keeps from others by trigger: emptied after their sources (whose
#: deletes write to them).
REPORT_ROLLUPS = (
    REPORT_MONTHLY_TOTALS,
    REPORT_MRR_PRICES,
    REPORT_MRR_CUSTOMERS,
    REPORT_MRR_CURRENCY_CUSTOMERS,
    REPORT_DUNNING_INVOICES,
    REPORT_DUNNING_MONTHLY,
    REPORT_MRR_CUSTOMER_MONTHS,
    REPORT_MRR_MONTHLY,
)
