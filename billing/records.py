"""What the database repositories return: plain frozen dataclasses, one per table row.

They carry no SQLAlchemy state, so activities, the API and tests can hold them after the
session is gone. Field names equal the column names. Amounts are integer minor units;
every instant is an aware UTC datetime.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from billing.balance import BalanceEntryKind
from billing.calendar import IntervalUnit
from billing.credit_notes import CreditNoteReason, RefundReason, RefundSource, RefundStatus
from billing.disputes import DisputeStatus
from billing.invoices import InvoiceLineKind, InvoiceStatus
from billing.payments import ChargeOutcomeKind
from billing.plans import Plan
from billing.subscription import SubscriptionStatus


class AttemptStatus(StrEnum):
    """Where one charge attempt stands with the payment provider."""

    #: Recorded before the provider is called, so a crash mid-charge leaves a trace.
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    #: The customer must authenticate (SCA); a webhook or a later attempt finishes it.
    REQUIRES_ACTION = "requires_action"


@dataclass(frozen=True, slots=True, kw_only=True)
class CustomerRecord:
    """A customer. ``invoice_prefix`` plus ``next_invoice_sequence`` number their invoices."""

    id: str
    invoice_prefix: str
    timezone: str
    created_at: datetime
    updated_at: datetime
    #: The business's own reference for this customer.
    external_id: str | None = None
    email: str | None = None
    name: str | None = None
    stripe_customer_id: str | None = None
    default_payment_method_id: str | None = None
    #: The sequence number the customer's next invoice gets (1-based).
    next_invoice_sequence: int = 1
    #: ``created`` (UTC) of the newest provider event about the default card acted on.
    default_payment_method_event_at: datetime | None = None
    #: The signup in progress for this customer (token) and when its hold lapses (UTC).
    signup_lease_token: str | None = None
    signup_lease_expires_at: datetime | None = None
    #: The customer's CLDR locale (``de-CH`` or ``fr_FR``) for mails and invoice documents;
    #: None: English mails, the seller's default for documents.
    locale: str | None = None
    #: Opted out of non-essential mails (receipts, trial reminders); never of dunning notices.
    mail_opt_out: bool = False
    #: The default card's brand and last 4 digits as the provider reported them at attach.
    default_card_brand: str | None = None
    default_card_last4: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SubscriptionRecord:
    """A subscription with the plan's price snapshotted (minor units) at signup."""

    id: str
    customer_id: str
    plan_code: str
    status: SubscriptionStatus
    amount_minor: int
    currency: str
    interval: IntervalUnit
    interval_count: int
    timezone: str
    anchor_at: datetime
    workflow_id: str
    created_at: datetime
    updated_at: datetime
    trial_end_at: datetime | None = None
    current_period_start: datetime | None = None
    current_period_end: datetime | None = None
    next_billing_at: datetime | None = None
    cancel_at_period_end: bool = False
    cancel_reason: str | None = None
    canceled_at: datetime | None = None
    ended_at: datetime | None = None
    paused_at: datetime | None = None
    #: Status needs_attention: the step that failed and why.
    attention_reason: str | None = None
    signup_idempotency_key: str | None = None
    #: SHA-256 hex of the signup request, to refuse a reused key with a different request.
    signup_request_hash: str | None = None
    #: Digest of the API key whose idempotency key this is ("" in-process; None: before keys
    #: were scoped, matched by any caller).
    signup_key_scope: str | None = None
    #: The card the signup attached (``pm_...``).
    signup_payment_method_id: str | None = None
    #: Seats: each period bills ``quantity x amount_minor``.
    quantity: int = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class CatalogPlan:
    """A plan as the catalog lists it: its terms, whether it takes new signups, and when it
    was created (UTC). ``plan.amount_minor`` is the price of one seat per period."""

    plan: Plan
    active: bool
    created_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class InvoiceRecord:
    """One invoice per (subscription, period). Amounts in minor units."""

    id: str
    number: str
    subscription_id: str
    customer_id: str
    period_index: int
    period_start: datetime
    period_end: datetime
    amount_due_minor: int
    currency: str
    status: InvoiceStatus
    created_at: datetime
    description: str = ""
    amount_paid_minor: int = 0
    status_reason: str | None = None
    finalized_at: datetime | None = None
    paid_at: datetime | None = None
    voided_at: datetime | None = None
    marked_uncollectible_at: datetime | None = None
    #: The invoice's one PaymentIntent, once a charge attempt created it; every later attempt
    #: confirms it again (Stripe Billing's model).
    stripe_payment_intent_id: str | None = None
    #: The sum of the invoice's lines (minor units; negative when credits outweigh charges).
    subtotal_minor: int = 0
    #: Credit balance used to pay it at finalization (minor units, 0 <= it <= subtotal).
    #: ``amount_due_minor`` is what is left to charge: subtotal - credit applied, at least 0.
    credit_applied_minor: int = 0
    #: The plan change this invoice bills (prorations), or None for a renewal.
    change_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class InvoiceLineRecord:
    """One line of an invoice. ``amount_minor`` is signed (a proration credit is negative);
    ``period_start``/``period_end`` (UTC) say which time it bills."""

    id: str
    invoice_id: str
    #: 1-based order on the invoice; the subscription line of a renewal is 1.
    position: int
    kind: InvoiceLineKind
    description: str
    amount_minor: int
    currency: str
    period_start: datetime
    period_end: datetime
    created_at: datetime
    plan_code: str | None = None
    quantity: int = 1
    #: Price per unit for the whole period (minor units); a proration's amount is the
    #: time-weighted share of ``quantity x unit_amount_minor``.
    unit_amount_minor: int | None = None
    #: The plan change that produced a proration line (the workflow's update id).
    change_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class BalanceEntryRecord:
    """One movement of a customer's credit balance (see ``billing.balance``). ``amount_minor``
    is signed: positive grants credit, negative uses it."""

    id: str
    customer_id: str
    currency: str
    amount_minor: int
    kind: BalanceEntryKind
    #: Unique: the decision that made the entry (e.g. ``applied:in_...``), so a retry or a
    #: replay records it once.
    source_key: str
    description: str
    created_at: datetime
    invoice_id: str | None = None
    #: The credit note it came from (settlement), when it did.
    credit_note_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PaymentAttemptRecord:
    """One charge attempt of an invoice; ``idempotency_key`` is what the provider saw."""

    id: str
    invoice_id: str
    attempt_number: int
    idempotency_key: str
    amount_minor: int
    currency: str
    #: Why the attempt ran: "scheduled", "retry", "payment_method_updated".
    reason: str
    created_at: datetime
    status: AttemptStatus = AttemptStatus.PENDING
    outcome: ChargeOutcomeKind | None = None
    decline_code: str | None = None
    failure_message: str | None = None
    stripe_payment_intent_id: str | None = None
    stripe_charge_id: str | None = None
    payment_method_id: str | None = None
    completed_at: datetime | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PaymentRecord:
    """The settlement of an invoice: the one successful charge. Amounts in minor units."""

    id: str
    invoice_id: str
    attempt_id: str
    stripe_payment_intent_id: str
    amount_minor: int
    currency: str
    settled_at: datetime
    stripe_charge_id: str | None = None
    balance_transaction_id: str | None = None
    #: Provider fee and net as the balance transaction reports them, in the settlement
    #: currency (which may differ from ``currency``); None when unknown.
    fee_minor: int | None = None
    net_minor: int | None = None
    settlement_amount_minor: int | None = None
    settlement_currency: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusChangeRecord:
    """A subscription's move from one status to another (``changed_at`` UTC)."""

    id: int
    subscription_id: str
    from_status: SubscriptionStatus
    to_status: SubscriptionStatus
    changed_at: datetime
    reason: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TermsChangeRecord:
    """A plan or seat change of a subscription's billing terms (``changed_at`` UTC): the plan,
    unit amount (minor units), quantity and interval before and after."""

    id: int
    subscription_id: str
    changed_at: datetime
    from_plan_code: str
    to_plan_code: str
    from_amount_minor: int
    to_amount_minor: int
    from_quantity: int
    to_quantity: int
    from_interval: IntervalUnit
    to_interval: IntervalUnit
    from_interval_count: int
    to_interval_count: int
    #: Each side's monthly amount (billing.reports.monthly_recurring_minor).
    from_monthly_minor: int
    to_monthly_minor: int


@dataclass(frozen=True, slots=True, kw_only=True)
class NotificationRecord:
    """A notice waiting in the outbox (``sent_at`` None) or already delivered."""

    id: str
    kind: str
    #: The customer told; None for a mail to the business (then ``recipient``).
    customer_id: str | None
    #: Unique per notice, so activity retries and replays enqueue it once.
    dedupe_key: str
    created_at: datetime
    subscription_id: str | None = None
    invoice_id: str | None = None
    payload: dict[str, Any] = field(default_factory=dict)
    #: When the mail server accepted it (UTC).
    sent_at: datetime | None = None
    #: A ``billing.notices.NoticeStatus`` value.
    status: str = "pending"
    attempts: int = 0
    #: Why the last attempt failed, or why it was skipped.
    last_error: str | None = None
    message_id: str | None = None
    failed_at: datetime | None = None
    dispatched_at: datetime | None = None
    #: A mail to the business: the address it goes to.
    recipient: str | None = None


class WebhookOutcome(StrEnum):
    """What the webhook endpoint did with one provider event."""

    #: Claimed by a request that has not finished yet (or crashed; see ``claimed_at``).
    PROCESSING = "processing"
    #: At least one subscription workflow was signalled.
    ROUTED = "routed"
    #: Nothing to do: an event type we do not act on, or news we already have.
    IGNORED = "ignored"
    #: About a customer or payment we do not know, or one with no live subscription.
    NO_SUBSCRIPTION = "no_subscription"
    #: Every workflow it was meant for has already finished; nothing was signalled.
    WORKFLOW_CLOSED = "workflow_closed"
    #: Settlement news (a refund, a dispute) read back from the provider and recorded.
    RECORDED = "recorded"


@dataclass(frozen=True, slots=True, kw_only=True)
class WebhookEventRecord:
    """One provider webhook event, keyed by the provider's event id (``evt_...``) so that a
    redelivery is recognised. Instants UTC."""

    id: str
    type: str
    #: A ``WebhookOutcome`` value.
    outcome: str
    #: When the event first arrived.
    received_at: datetime
    #: When the request now processing it took it on; a stale claim with no
    #: ``processed_at`` means that request died, and a redelivery may take over.
    claimed_at: datetime
    processed_at: datetime | None = None
    #: The subscription it was routed to (the first one, if the customer has several).
    subscription_id: str | None = None
    #: Why it was ignored, or which workflows were signalled.
    detail: str | None = None


class DeliveryStatus(StrEnum):
    """Where one event's delivery to one endpoint stands."""

    PENDING = "pending"
    #: The endpoint answered 2xx.
    DELIVERED = "delivered"
    #: Retried for 3 days without success (the endpoint was disabled), or the endpoint was
    #: disabled before it was sent.
    FAILED = "failed"


@dataclass(frozen=True, slots=True, kw_only=True)
class EventEndpointRecord:
    """An endpoint of the business's that receives our events. ``secret`` signs them."""

    id: str
    url: str
    #: SHA-256 hex of ``url`` (one endpoint per URL).
    url_digest: str
    event_types: list[str]
    secret: str
    created_at: datetime
    updated_at: datetime
    description: str | None = None
    enabled: bool = True
    disabled_reason: str | None = None
    #: Whom to tell when it is disabled (else ``BILLING_EVENTS_CONTACT_EMAIL``).
    contact_email: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class EventRecord:
    """An event for the business: ``object`` is the API's view of it when it happened;
    ``sequence`` counts the subscription's events from 1."""

    id: str
    type: str
    subscription_id: str
    sequence: int
    object_id: str
    object: dict[str, Any]
    dedupe_key: str
    created_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class EventDeliveryRecord:
    id: str
    event_id: str
    endpoint_id: str
    subscription_id: str
    sequence: int
    status: DeliveryStatus
    created_at: datetime
    attempts: int = 0
    last_status_code: int | None = None
    last_error: str | None = None
    delivered_at: datetime | None = None
    dispatched_at: datetime | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class EventDeliveryAttemptRecord:
    id: int
    delivery_id: str
    attempted_at: datetime
    duration_ms: int
    status_code: int | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class CreditNoteRecord:
    """A credit note (``billing.credit_notes``). Amounts in minor units; the parts add up to
    ``amount_minor``."""

    id: str
    number: str
    customer_id: str
    sequence: int
    invoice_id: str
    #: ``post_payment`` (a paid invoice) or ``pre_payment`` (an open one), as Stripe says.
    type: str
    currency: str
    amount_minor: int
    refund_amount_minor: int
    credit_amount_minor: int
    out_of_band_amount_minor: int
    amount_due_reduction_minor: int
    created_at: datetime
    reason: CreditNoteReason | None = None
    memo: str | None = None
    idempotency_key: str | None = None
    key_scope: str | None = None
    request_hash: str | None = None
    created_by: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class CreditNoteLineRecord:
    id: str
    credit_note_id: str
    position: int
    description: str
    amount_minor: int
    invoice_line_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RefundRecord:
    """A refund of a payment: a credit note's (``source=credit_note``, with its key) or one made
    elsewhere (``source=provider``)."""

    id: str
    invoice_id: str
    payment_id: str
    source: RefundSource
    amount_minor: int
    currency: str
    status: RefundStatus
    created_at: datetime
    updated_at: datetime
    credit_note_id: str | None = None
    refund_number: int | None = None
    idempotency_key: str | None = None
    reason: RefundReason | None = None
    stripe_refund_id: str | None = None
    stripe_charge_id: str | None = None
    balance_transaction_id: str | None = None
    failure_reason: str | None = None
    completed_at: datetime | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class DisputeRecord:
    """A dispute as the provider last reported it (minor units)."""

    id: str
    stripe_dispute_id: str
    stripe_charge_id: str
    amount_minor: int
    currency: str
    status: DisputeStatus
    created_at: datetime
    updated_at: datetime
    payment_id: str | None = None
    invoice_id: str | None = None
    reason: str | None = None
    evidence_due_by: datetime | None = None
    closed_at: datetime | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerEntryRecord:
    """One mirrored balance transaction (``billing.ledger``); settlement currency, signed."""

    id: str
    balance_transaction_id: str
    type: str
    amount_minor: int
    fee_minor: int
    net_minor: int
    currency: str
    recorded_at: datetime
    reporting_category: str | None = None
    source_id: str | None = None
    source_amount_minor: int | None = None
    source_currency: str | None = None
    exchange_rate: str | None = None
    payment_id: str | None = None
    refund_id: str | None = None
    dispute_id: str | None = None
    description: str | None = None
    provider_created_at: datetime | None = None
    available_on: datetime | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PayoutRecord:
    id: str
    stripe_payout_id: str
    amount_minor: int
    currency: str
    status: str
    automatic: bool
    recorded_at: datetime
    updated_at: datetime
    balance_transaction_id: str | None = None
    arrival_date: datetime | None = None
    provider_created_at: datetime | None = None
    failure_code: str | None = None
    imported_at: datetime | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ReconciliationFindingRecord:
    id: str
    kind: str
    severity: str
    subject_key: str
    detail: str
    found_at: datetime
    run_id: str
    invoice_id: str | None = None
    payment_intent_id: str | None = None
    charge_id: str | None = None
    amount_minor: int | None = None
    currency: str | None = None
    resolved_at: datetime | None = None
    resolved_by: str | None = None
    resolution_note: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanChangeRequestRecord:
    """A plan change asked with an Idempotency-Key (``plan_change_requests``): the key scoped
    to the API key that sent it, the request's digest, the workflow Update id (``change_id``)
    and, once given, the first answer (the API's JSON body). Instants UTC."""

    id: str
    subscription_id: str
    key_scope: str
    idempotency_key: str
    request_hash: str
    change_id: str
    status: str
    created_at: datetime
    result: dict[str, Any] | None = None
    completed_at: datetime | None = None
