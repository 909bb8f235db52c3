"""The dataclasses that cross the workflow/activity boundary, and the activity names.

Each activity takes one ``XInput`` and returns one ``XResult``. They live in the domain so the
workflow can name activities without importing ``activities/`` (which imports stripe and
sqlalchemy). New fields must get defaults so recorded histories still decode.
Amounts are integer minor units; instants are aware UTC datetimes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from billing.errors import InvalidInput
from billing.invoices import InvoiceStatus
from billing.payments import ChargeOutcomeKind
from billing.plans import Plan, validate_plan
from billing.proration import ProrationLine
from billing.subscription import SubscriptionStatus
from billing.text import OUR_ID, PAYMENT_METHOD_ID, PLAN_CODE, PLAN_NAME, PROVIDER_ID, REASON


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
    CANCEL_INVOICE_PAYMENT = "cancel_invoice_payment"
    CREATE_CHANGE_INVOICE = "create_change_invoice"
    RECORD_INVOICE_PAYMENT = "record_invoice_payment"


#: Start-to-close timeout of every activity that calls the payment provider (charge, settle,
#: attach, confirm, cancel). Here, not in the workflow, so the settings can check that the
#: Stripe client's worst case fits inside it without the domain importing stripe: a client
#: still waiting when Temporal times the attempt out would keep running beside its retry.
PROVIDER_ACTIVITY_TIMEOUT = timedelta(seconds=60)

#: Heartbeat timeout of those activities: the worker's event loop beats while they run
#: (``activities.keepalive``), so a worker killed mid-call has its attempts retried (re-driven
#: under their own keys) after this long instead of the whole start-to-close timeout.
PROVIDER_HEARTBEAT_TIMEOUT = timedelta(seconds=15)


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
class SubscriptionTerms:
    """What a subscription is billed after a plan or quantity change (the database's
    snapshot): the plan's unit amount (minor units) per ``interval_count`` ``interval``, times
    ``quantity``; billing dates from ``anchor_at`` (UTC)."""

    plan_code: str
    amount_minor: int
    currency: str
    interval: str
    interval_count: int
    quantity: int
    anchor_at: datetime

    def columns(self) -> dict[str, object]:
        return {
            "plan_code": self.plan_code,
            "amount_minor": self.amount_minor,
            "currency": self.currency,
            "interval": self.interval,
            "interval_count": self.interval_count,
            "quantity": self.quantity,
            "anchor_at": self.anchor_at,
        }


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
    #: When the workflow decided this state (UTC); logged with a status change. None: the
    #: activity's clock (histories recorded before the field).
    changed_at: datetime | None = None
    #: Status needs_attention: what failed and why, for operators (None otherwise).
    attention_reason: str | None = None
    #: Set when a plan or quantity change was applied: the new snapshot to mirror.
    terms: SubscriptionTerms | None = None
    #: The open invoice the workflow is collecting, if any. With ``sweep_orphans``, every other
    #: open invoice of the subscription that no charge was ever attempted for is voided: a
    #: renewal written by a workflow task that was then discarded, when the task that replaced
    #: it did not bill that period as written (a pause, a cancel or an interval change applied
    #: first).
    open_invoice_id: str | None = None
    #: False for syncs recorded before ``open_invoice_id`` existed: they void orphans only on
    #: a cancel, as then.
    sweep_orphans: bool = False


@dataclass
class SyncSubscriptionResult:
    updated: bool
    #: The activity's clock as it finished (UTC): the workflow starts a timer decided in the
    #: same task from it rather than from the task's start (``billing.collection.timer_delay``).
    #: None in histories recorded before the field.
    observed_at: datetime | None = None


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
    #: When the workflow decided this step (UTC). Database-only steps run as local
    #: activities, whose own clock is the worker's, not the workflow's; None: the activity's
    #: clock (histories recorded before the field).
    issued_at: datetime | None = None
    #: Seats and the price of one (``amount_minor`` is their product); None: one seat at
    #: ``amount_minor`` (histories recorded before seats).
    quantity: int = 1
    unit_amount_minor: int | None = None
    #: Proration lines carried to this renewal (``create_prorations``), after its
    #: subscription line.
    extra_lines: list[ProrationLine] = field(default_factory=list)


@dataclass
class CreateInvoiceResult:
    invoice_id: str
    number: str
    status: InvoiceStatus
    amount_due_minor: int
    currency: str
    #: False when the invoice for this (subscription, period) already existed.
    created: bool = True
    #: The period as the invoice stores it (UTC). The workflow keeps these, not its own
    #: computation, so a replay on a worker with other zone rules keeps the invoiced period.
    #: None in results recorded before they existed.
    period_start: datetime | None = None
    period_end: datetime | None = None


@dataclass
class CreateChangeInvoiceInput:
    """Issue the invoice of plan change ``change_id``: its proration lines (and, when it
    replaces the period's unpaid renewal, that renewal's lines again first). Idempotent per
    change."""

    subscription_id: str
    customer_id: str
    change_id: str
    period_index: int
    period_start: datetime
    period_end: datetime
    currency: str
    description: str
    issued_at: datetime
    lines: list[ProrationLine] = field(default_factory=list)
    #: The voided renewal whose subscription line is billed again on this invoice.
    replaces_invoice_id: str | None = None


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
    #: The settled payment, when the charge activity also settled the invoice (the usual
    #: case); None means the workflow settles it with ``settle_invoice``.
    payment_id: str | None = None
    #: The invoice is paid without any charge of ours (a credit note, or the customer's
    #: balance, brought its amount due to 0): nothing was sent, and there is nothing to settle.
    paid_by_credit: bool = False
    #: The amount this attempt charged, minor units (the invoice's amount due when it was
    #: recorded); None in results recorded before the field.
    amount_due_minor: int | None = None
    #: AUTHENTICATION_REQUIRED: the page where the customer authenticates, as the provider
    #: gave it (Stripe's ``next_action.redirect_to_url.url``); None when it gave none.
    authentication_url: str | None = None


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
    #: When the workflow decided this step (UTC). Database-only steps run as local
    #: activities, whose own clock is the worker's, not the workflow's; None: the activity's
    #: clock (histories recorded before the field).
    at: datetime | None = None


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
    #: When the workflow decided this step (UTC). Database-only steps run as local
    #: activities, whose own clock is the worker's, not the workflow's; None: the activity's
    #: clock (histories recorded before the field).
    created_at: datetime | None = None


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
    #: The customer's other subscriptions that have not ended: the new card is theirs too.
    other_subscription_ids: list[str] = field(default_factory=list)


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


# ---- cancel_invoice_payment ----------------------------------------------------------------


@dataclass
class CancelInvoicePaymentInput:
    """Before an invoice is voided or written off: settle what the provider says about its
    payment (an attempt whose outcome is unknown included), and cancel its PaymentIntent so
    nobody can pay it behind our back afterwards."""

    invoice_id: str
    #: Why the invoice is being closed ("subscription_canceled", "dunning_exhausted").
    reason: str = ""
    #: Only settle an invoice that is already paid (a credit note paid it): cancel its
    #: PaymentIntent then; an invoice still open is left exactly as it is (``paid`` False).
    only_if_paid: bool = False


@dataclass
class CancelInvoicePaymentResult:
    #: The provider holds a succeeded payment for the invoice. It is now recorded (payment row,
    #: invoice paid): the caller must not close the invoice.
    paid: bool
    payment_intent_id: str | None = None
    payment_id: str | None = None
    #: The attempt the payment belongs to, when ``paid``.
    attempt_number: int = 0
    #: The PaymentIntent was canceled at the provider (False: there was none to cancel).
    canceled: bool = False
    #: ``paid`` without any charge of ours: a credit note (or the customer's balance) paid it.
    paid_by_credit: bool = False


# ---- record_invoice_payment ----------------------------------------------------------------


@dataclass
class RecordInvoicePaymentInput:
    """A provider success that no subscription workflow will record (the invoice was closed
    unpaid, or its workflow has ended): check it with the provider and record it."""

    invoice_id: str
    payment_intent_id: str


@dataclass
class RecordInvoicePaymentResult:
    #: The payment is recorded (now or before): payment row, attempt succeeded, invoice paid.
    recorded: bool
    payment_id: str | None = None
    attempt_number: int = 0
    #: Why nothing was recorded (the intent did not succeed, or is not this invoice's).
    reason: str = ""


# ---- InvoicePaymentWorkflow ------------------------------------------------------------------


def invoice_payment_workflow_id_for(invoice_id: str) -> str:
    """One late-payment workflow per invoice: a second start for it joins the first."""
    return f"invoice-payment-{invoice_id}"


@dataclass
class InvoicePaymentWorkflowInput:
    invoice_id: str
    payment_intent_id: str
    #: Task queue of the provider activity (None: the workflow's own).
    payments_task_queue: str | None = None


@dataclass
class InvoicePaymentWorkflowResult:
    recorded: bool
    payment_id: str | None = None
    reason: str = ""


# ==== the subscription workflow's own messages ================================================

from billing.subscription import SubscriptionState  # noqa: E402


class WorkflowName:
    SUBSCRIPTION = "SubscriptionWorkflow"
    INVOICE_PAYMENT = "InvoicePaymentWorkflow"


class SubscriptionMessage:
    """Update, signal and query names of the subscription workflow."""

    CANCEL = "cancel"
    PAUSE = "pause"
    RESUME = "resume"
    UPDATE_PAYMENT_METHOD = "update_payment_method"
    PAYMENT_METHOD_CHANGED = "payment_method_changed"
    PAYMENT_AUTHENTICATED = "payment_authenticated"
    RESUME_BILLING = "resume_billing"
    CHANGE_PLAN = "change_plan"
    #: Update: the preview of a change at the workflow's own time (the CLI's --preview).
    PREVIEW_CHANGE_NOW = "preview_change_now"
    CANCEL_PENDING_CHANGE = "cancel_pending_change"
    INVOICE_CREDITED = "invoice_credited"
    GET_STATE = "get_state"
    PREVIEW_CHANGE = "preview_change"


#: The most recent invoice ids a workflow keeps in its state (the database keeps them all).
#: Bounds the continue-as-new payload however long a subscription lives.
MAX_INVOICE_IDS_IN_STATE = 1000


#: Billed periods per workflow run before it continues as new (a year of monthly billing).
DEFAULT_PERIODS_PER_RUN = 12


@dataclass
class SubscriptionWorkflowInput:
    state: SubscriptionState
    #: Continue-as-new after this many billed periods in one run (or once the run is a year
    #: old), so every run's history is bounded whatever the subscription's age. Runs started
    #: before this default existed carry 1 in their input and keep continuing every period.
    periods_per_run: int = DEFAULT_PERIODS_PER_RUN
    #: Task queue of the provider activities (charge, settle, attach, confirm): a queue whose
    #: workers cap their rate (``Settings.charge_rate_per_s``). None, as in runs started before
    #: it existed: the workflow's own task queue.
    payments_task_queue: str | None = None
    #: The answers of the last plan changes applied (at most ``MAX_RECENT_CHANGES``), carried
    #: across continue-as-new: a change Update repeated with the same id (an Idempotency-Key's
    #: retry) in a later run answers the first result instead of changing again. Temporal
    #: dedupes Update ids only within one run.
    recent_changes: list[ChangePlanResult] = field(default_factory=list)


#: How many applied plan changes' answers a subscription workflow keeps (see above).
MAX_RECENT_CHANGES = 20


@dataclass
class SubscriptionWorkflowResult:
    subscription_id: str
    status: SubscriptionStatus
    ended_at: datetime | None
    invoices_issued: int


@dataclass
class CancelInput:
    #: True: stop at the end of the paid period. False: stop now and void an open invoice.
    at_period_end: bool = True
    reason: str = ""

    def check(self) -> None:
        """InvalidInput (field ``reason``) if the reason is text the database would refuse.
        Pure: the workflow's update validator calls it, so such a value is refused before it
        enters the workflow's history, as the API and the CLI refuse it before sending."""
        if not isinstance(self.at_period_end, bool):
            raise InvalidInput("at_period_end must be true or false", field="at_period_end")
        REASON.check(self.reason, field="reason")


@dataclass
class CancelResult:
    status: SubscriptionStatus
    cancel_at_period_end: bool
    #: When the subscription ends (or ended, for an immediate cancel), UTC.
    ends_at: datetime | None
    voided_invoice_id: str | None = None


@dataclass
class PauseInput:
    reason: str = ""

    def check(self) -> None:
        """InvalidInput (field ``reason``) if the reason is text the database would refuse."""
        REASON.check(self.reason, field="reason")


@dataclass
class PauseResult:
    status: SubscriptionStatus
    paused_at: datetime


@dataclass
class ResumeInput:
    reason: str = ""

    def check(self) -> None:
        """InvalidInput (field ``reason``) if the reason is text the database would refuse."""
        REASON.check(self.reason, field="reason")


@dataclass
class ResumeResult:
    status: SubscriptionStatus
    next_billing_at: datetime | None


@dataclass
class ResumeBillingInput:
    """An operator fixed what parked the subscription (status needs_attention): billing
    resumes by running the failed step again."""

    reason: str = ""

    def check(self) -> None:
        """InvalidInput (field ``reason``) if the reason is text the database would refuse."""
        REASON.check(self.reason, field="reason")


@dataclass
class ResumeBillingResult:
    status: SubscriptionStatus
    #: The step that had failed, which runs again now.
    resumed_step: str


@dataclass
class UpdatePaymentMethodInput:
    payment_method_id: str

    def check(self) -> None:
        """InvalidInput (field ``payment_method_id``) if the id is empty or text the database
        would refuse."""
        _check_payment_method_id(self.payment_method_id)


@dataclass
class UpdatePaymentMethodResult:
    payment_method_id: str
    #: An open invoice will be retried at once with the new payment method.
    retry_scheduled: bool
    status: SubscriptionStatus
    card_brand: str | None = None
    card_last4: str | None = None


@dataclass
class PaymentMethodChangedInput:
    """From a webhook: the customer already set a new default payment method at the provider."""

    payment_method_id: str

    def check(self) -> None:
        """InvalidInput if the id is empty or text the database would refuse: the signal
        handler drops such a signal (a signal has nobody to answer)."""
        _check_payment_method_id(self.payment_method_id)


@dataclass
class PaymentAuthenticatedInput:
    """From a webhook: a payment intent that required authentication has succeeded."""

    payment_intent_id: str
    invoice_id: str | None = None

    def check(self) -> None:
        """InvalidInput if an id is empty or text the database would refuse: the signal
        handler drops such a signal."""
        if not isinstance(self.payment_intent_id, str) or not self.payment_intent_id.strip():
            raise InvalidInput("payment_intent_id must not be empty", field="payment_intent_id")
        PROVIDER_ID.check(self.payment_intent_id, field="payment_intent_id")
        OUR_ID.check_optional(self.invoice_id, field="invoice_id")


@dataclass
class InvoiceCreditedInput:
    """From the credit-note API or CLI, after the credit note committed: a pre-payment credit
    note lowered the open invoice's amount due to ``amount_due_minor`` (minor units; 0: the
    credit paid it, and dunning stops). The database is the truth: a lost signal only delays
    what the next charge attempt finds there."""

    invoice_id: str
    amount_due_minor: int
    credit_note_id: str | None = None

    def check(self) -> None:
        """InvalidInput for an id the database would refuse or a negative amount: the signal
        handler drops such a signal."""
        OUR_ID.check(self.invoice_id, field="invoice_id")
        OUR_ID.check_optional(self.credit_note_id, field="credit_note_id")
        if (
            isinstance(self.amount_due_minor, bool)
            or not isinstance(self.amount_due_minor, int)
            or self.amount_due_minor < 0
        ):
            raise InvalidInput(
                "amount_due_minor must be 0 or more minor units", field="amount_due_minor"
            )


def _check_payment_method_id(payment_method_id: str) -> None:
    if not isinstance(payment_method_id, str) or not payment_method_id.strip():
        raise InvalidInput(
            "payment_method_id must not be empty; pass the provider's payment method id ('pm_...')",
            field="payment_method_id",
        )
    PAYMENT_METHOD_ID.check(payment_method_id, field="payment_method_id")


@dataclass
class ChangePlanInput:
    """Change the plan and/or the seats. ``plan``: the new plan's terms as the catalog has them
    (the caller looks it up and refuses an unknown or archived code); None keeps the plan.
    ``quantity`` None keeps the seats. ``effective`` (``now``/``period_end``) and
    ``proration`` (``always_invoice``/``create_prorations``/``none``) None take the
    defaults (``billing.plan_change``)."""

    plan: Plan | None = None
    quantity: int | None = None
    effective: str | None = None
    proration: str | None = None

    def check(self) -> None:
        if self.plan is None and self.quantity is None:
            raise InvalidInput("give a plan, a quantity, or both", field="plan")
        if self.plan is not None:
            PLAN_CODE.check(self.plan.code, field="plan")
            PLAN_NAME.check(self.plan.name, field="plan.name")
            # The plan comes from the caller's catalog read; anything the catalog would not
            # hold (a negative price, an unknown currency) never reaches the state. (Update
            # validators do not run on replay, so library data cannot break a history.)
            validate_plan(self.plan)
        if self.quantity is not None and (
            isinstance(self.quantity, bool) or not isinstance(self.quantity, int)
        ):
            raise InvalidInput("quantity must be a whole number of seats", field="quantity")
        for name in ("effective", "proration"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or len(value) > 32):
                raise InvalidInput(f"{name} must be a short word", field=name)


@dataclass
class ChangePlanResult:
    """What the change did. ``lines``: its proration lines (minor units, signed)."""

    change_id: str
    effective: str
    effective_at: datetime
    plan_code: str
    quantity: int
    lines: list[ProrationLine] = field(default_factory=list)
    proration: str = "none"
    #: The invoice issued for the lines now, if any, and what it leaves to charge.
    invoice_id: str | None = None
    invoice_status: str | None = None
    amount_due_minor: int | None = None
    #: The unpaid renewal voided and billed again on the change's invoice.
    voided_invoice_id: str | None = None
    #: True: scheduled for ``effective_at`` (the next renewal), cancelable until then.
    pending: bool = False


@dataclass
class CancelPendingChangeInput:
    reason: str = ""

    def check(self) -> None:
        REASON.check(self.reason, field="reason")


@dataclass
class CancelPendingChangeResult:
    change_id: str
    plan_code: str
    quantity: int


@dataclass
class PreviewChangeInput:
    """What ``change`` would bill if applied at ``at`` (UTC)."""

    change: ChangePlanInput
    at: datetime


@dataclass
class ChangePreview:
    """The answer of the preview query: the same decision the workflow would take, or the
    reason it would refuse (``refused``, with ``error_type``)."""

    effective: str = ""
    effective_at: datetime | None = None
    plan_code: str = ""
    quantity: int = 1
    proration: str = "none"
    lines: list[ProrationLine] = field(default_factory=list)
    #: Sum of the lines (minor units); credit from the balance is applied when invoiced.
    subtotal_minor: int = 0
    currency: str = ""
    #: Invoiced now, carried to the renewal, or scheduled for the period end.
    invoice_now: bool = False
    carried_to_renewal: bool = False
    #: The period's unpaid renewal that would be voided and billed again with the lines.
    adjusts_invoice_id: str | None = None
    refused: str | None = None
    error_type: str | None = None


@dataclass
class PendingChangeView:
    change_id: str
    plan_code: str
    quantity: int
    effective_at: datetime | None
    requested_at: datetime


@dataclass
class OpenInvoiceView:
    invoice_id: str
    number: str
    amount_minor: int
    currency: str
    period_start: datetime
    period_end: datetime
    #: Charge attempts made so far (the dunning attempt count).
    attempts: int
    first_failure_at: datetime | None
    next_retry_at: datetime | None
    blocked: str | None
    last_decline_code: str | None


@dataclass
class SubscriptionView:
    """The live state a query returns. Instants UTC; amounts minor units."""

    subscription_id: str
    customer_id: str
    status: SubscriptionStatus
    plan_code: str
    amount_minor: int
    currency: str
    interval: str
    interval_count: int
    timezone: str
    anchor_at: datetime
    trial_end_at: datetime | None
    current_period_start: datetime | None
    current_period_end: datetime | None
    next_billing_at: datetime | None
    cancel_at_period_end: bool
    canceled_at: datetime | None
    ended_at: datetime | None
    paused_at: datetime | None
    open_invoice: OpenInvoiceView | None
    invoice_ids: list[str]
    invoices_issued: int
    run_number: int
    history_length: int
    #: Status needs_attention: the step that failed and why.
    attention_step: str | None = None
    attention_reason: str | None = None
    attention_since: datetime | None = None
    #: Seats, and a change waiting for the next renewal (None: none).
    quantity: int = 1
    pending_change: PendingChangeView | None = None
    #: Proration lines waiting for the next renewal invoice (``create_prorations``).
    pending_lines: list[ProrationLine] = field(default_factory=list)
