"""The dataclasses that cross the workflow/activity boundary, and the activity names.

Each activity takes one ``XInput`` and returns one ``XResult``. They live in the domain so the
workflow can name activities without importing ``activities/`` (which imports stripe and
sqlalchemy). New fields must get defaults so recorded histories still decode.
Amounts are integer minor units; instants are aware UTC datetimes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from billing.invoices import InvoiceStatus
from billing.payments import ChargeOutcomeKind
from billing.subscription import SubscriptionStatus


class ActivityName:
    """Registered activity names (``@activity.defn(name=...)``)."""

    SYNC_SUBSCRIPTION = "sync_subscription"
    CREATE_INVOICE = "create_invoice"
    CHARGE_INVOICE = "charge_invoice"
    SETTLE_INVOICE = "settle_invoice"
    CLOSE_INVOICE = "close_invoice"
    ENQUEUE_NOTIFICATION = "enqueue_notification"
    ATTACH_PAYMENT_METHOD = "attach_payment_method"
    CONFIRM_AUTHENTICATED_PAYMENT = "confirm_authenticated_payment"


def workflow_id_for(subscription_id: str) -> str:
    """Deterministic workflow id: one workflow per subscription, and a second start is refused."""
    return f"subscription-{subscription_id}"


def idempotency_key_for(invoice_id: str, attempt_number: int) -> str:
    """The provider idempotency key of one charge attempt: invoice plus attempt number.

    Every retry of the same attempt (Temporal retries, a worker restarted mid-charge) sends the
    same key, so the provider returns the first result instead of charging again.
    """
    return f"{invoice_id}-attempt-{attempt_number}"


# ---- sync_subscription ---------------------------------------------------------------------


@dataclass
class SyncSubscriptionInput:
    """Mirror the workflow's view of the subscription into the database."""

    subscription_id: str
    status: SubscriptionStatus
    current_period_start: datetime | None = None
    current_period_end: datetime | None = None
    next_billing_at: datetime | None = None
    cancel_at_period_end: bool = False
    canceled_at: datetime | None = None
    ended_at: datetime | None = None
    paused_at: datetime | None = None
    cancel_reason: str | None = None


@dataclass
class SyncSubscriptionResult:
    updated: bool


# ---- create_invoice ------------------------------------------------------------------------


@dataclass
class CreateInvoiceInput:
    subscription_id: str
    customer_id: str
    plan_code: str
    period_index: int
    period_start: datetime
    period_end: datetime
    amount_minor: int
    currency: str
    description: str = ""


@dataclass
class CreateInvoiceResult:
    invoice_id: str
    number: str
    status: InvoiceStatus
    amount_due_minor: int
    currency: str
    #: False when the invoice for this (subscription, period) already existed.
    created: bool = True


# ---- charge_invoice ------------------------------------------------------------------------


@dataclass
class ChargeInvoiceInput:
    invoice_id: str
    attempt_number: int
    #: Why this attempt runs: "scheduled", "retry", "payment_method_updated".
    reason: str = "scheduled"


@dataclass
class ChargeInvoiceResult:
    outcome: ChargeOutcomeKind
    attempt_number: int
    idempotency_key: str
    payment_intent_id: str | None = None
    charge_id: str | None = None
    decline_code: str | None = None
    failure_message: str | None = None
    #: The invoice was already paid before this attempt; nothing was sent to the provider.
    already_paid: bool = False


# ---- settle_invoice ------------------------------------------------------------------------


@dataclass
class SettleInvoiceInput:
    invoice_id: str
    attempt_number: int
    payment_intent_id: str
    charge_id: str | None = None


@dataclass
class SettleInvoiceResult:
    payment_id: str
    paid_at: datetime
    amount_minor: int
    currency: str
    fee_minor: int | None = None
    net_minor: int | None = None


# ---- close_invoice (void / uncollectible) --------------------------------------------------


@dataclass
class CloseInvoiceInput:
    invoice_id: str
    #: InvoiceStatus.VOID or InvoiceStatus.UNCOLLECTIBLE.
    status: InvoiceStatus
    reason: str = ""


@dataclass
class CloseInvoiceResult:
    invoice_id: str
    status: InvoiceStatus
    #: The invoice was found already paid, so it was not closed (payment wins a race with void).
    was_paid: bool = False


# ---- enqueue_notification ------------------------------------------------------------------


class NoticeKind:
    PAYMENT_FAILED = "payment_failed"
    ACTION_REQUIRED = "action_required"
    PAYMENT_SUCCEEDED_AFTER_FAILURE = "payment_recovered"
    SUBSCRIPTION_CANCELED = "subscription_canceled"
    SUBSCRIPTION_UNPAID = "subscription_unpaid"
    TRIAL_ENDING = "trial_ending"


@dataclass
class EnqueueNotificationInput:
    kind: str
    customer_id: str
    subscription_id: str
    #: Unique per notice, so activity retries and replays enqueue it once.
    dedupe_key: str
    invoice_id: str | None = None
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass
class EnqueueNotificationResult:
    notification_id: str
    created: bool


# ---- attach_payment_method ------------------------------------------------------------------


@dataclass
class AttachPaymentMethodInput:
    subscription_id: str
    customer_id: str
    payment_method_id: str


@dataclass
class AttachPaymentMethodResult:
    payment_method_id: str
    card_brand: str | None = None
    card_last4: str | None = None


# ---- confirm_authenticated_payment ---------------------------------------------------------


@dataclass
class ConfirmAuthenticatedPaymentInput:
    invoice_id: str
    payment_intent_id: str


@dataclass
class ConfirmAuthenticatedPaymentResult:
    """Whether the provider says the payment intent succeeded for this invoice's amount."""

    succeeded: bool
    attempt_number: int = 0
    charge_id: str | None = None
    reason: str = ""
