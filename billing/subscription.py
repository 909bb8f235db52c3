"""Subscription lifecycle: statuses, the state a subscription workflow carries (also what
continue-as-new carries), and the pure rules for the changes a caller may ask for.

The workflow only sequences these decisions and calls activities; everything here is pure and
deterministic, so it is tested without Temporal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from billing.calendar import BillingPeriod, first_index_at_or_after, period
from billing.errors import ChangeRefused
from billing.plans import Plan
from billing.proration import ProrationLine


class SubscriptionStatus(StrEnum):
    #: Recorded by signup, workflow not yet running.
    PENDING = "pending"
    TRIALING = "trialing"
    ACTIVE = "active"
    #: The latest invoice failed and dunning is retrying it.
    PAST_DUE = "past_due"
    PAUSED = "paused"
    #: Dunning ran out with final action "mark unpaid": no new invoices until the card changes.
    UNPAID = "unpaid"
    #: A step failed in a way retrying cannot fix (an amount mismatch, an unexpected provider
    #: answer): billing waits for an operator, who fixes the cause and resumes billing. Changes
    #: are still accepted meanwhile.
    NEEDS_ATTENTION = "needs_attention"
    CANCELED = "canceled"


TERMINAL_STATUSES = frozenset({SubscriptionStatus.CANCELED})


class BlockedReason(StrEnum):
    """Why dunning is not retrying on schedule."""

    HARD_DECLINE = "hard_decline"
    AUTHENTICATION_REQUIRED = "authentication_required"


@dataclass
class OpenInvoice:
    """The invoice currently being collected. Amount in minor units; instants in UTC."""

    invoice_id: str
    number: str
    period_index: int
    period_start: datetime
    period_end: datetime
    amount_minor: int
    currency: str
    #: Charge attempts made so far; the next attempt's number is ``attempts + 1``.
    attempts: int = 0
    first_failure_at: datetime | None = None
    #: Scheduled retries consumed (card-update retries do not consume the schedule).
    scheduled_retries_done: int = 0
    blocked: BlockedReason | None = None
    last_decline_code: str | None = None
    last_outcome: str | None = None
    next_retry_at: datetime | None = None
    #: The subscription's payment_method_version at the last attempt; a newer version means
    #: the customer changed the card since, which triggers an immediate retry.
    payment_method_version_seen: int = 0
    #: When the last attempt of this invoice was made (UTC): automatic retries keep their
    #: distance from it. None in runs recorded before the field.
    last_attempt_at: datetime | None = None
    #: A charge of this invoice succeeded (this attempt) but its settlement is not recorded
    #: yet; set while a run is parked after the charge, so resuming settles instead of charging.
    paid_attempt_number: int | None = None
    paid_payment_intent_id: str | None = None
    paid_charge_id: str | None = None
    #: The plan change this invoice bills (None: a renewal).
    change_id: str | None = None
    #: A credit note brought the amount due to 0 and paid the invoice (Stripe's pre-payment
    #: credit note): collection ends without a charge, once its PaymentIntent is canceled.
    paid_by_credit: bool = False


class ChangeEffective(StrEnum):
    """When a plan or quantity change applies."""

    NOW = "now"
    #: At the next renewal: pending until then, cancelable.
    PERIOD_END = "period_end"


class ProrationBehavior(StrEnum):
    """What an immediate change bills for the rest of the period."""

    #: The proration lines are invoiced and collected now.
    ALWAYS_INVOICE = "always_invoice"
    #: The lines are carried to the next renewal invoice.
    CREATE_PRORATIONS = "create_prorations"
    #: Nothing is prorated; the new terms bill from the next renewal.
    NONE = "none"


@dataclass
class PendingChange:
    """A change scheduled for the next renewal (``effective: period_end``)."""

    change_id: str
    plan: Plan
    quantity: int
    requested_at: datetime


@dataclass
class Attention:
    """Why a subscription waits for an operator (status ``needs_attention``)."""

    #: The step that failed, e.g. "settle invoice INV-0001-0003".
    step: str
    #: What failed, as the activity reported it.
    reason: str
    since: datetime
    #: The status to return to when an operator resumes billing.
    previous_status: SubscriptionStatus


@dataclass
class SubscriptionState:
    """Everything a subscription workflow knows. Instants are UTC; amounts are minor units.

    New fields must get defaults so histories recorded before them still decode.
    """

    subscription_id: str
    customer_id: str
    plan: Plan
    timezone: str
    started_at: datetime
    #: Billing dates are ``anchor_at + k * interval`` in ``timezone``.
    anchor_at: datetime
    trial_end_at: datetime | None = None
    status: SubscriptionStatus = SubscriptionStatus.PENDING
    #: Index of the next period to invoice.
    next_period_index: int = 0
    current_period_start: datetime | None = None
    current_period_end: datetime | None = None
    open_invoice: OpenInvoice | None = None
    cancel_at_period_end: bool = False
    cancel_reason: str | None = None
    canceled_at: datetime | None = None
    ended_at: datetime | None = None
    paused_at: datetime | None = None
    #: Bumped on every payment-method change; dunning retries at once when it moves.
    payment_method_version: int = 0
    payment_method_id: str | None = None
    #: A customer completed authentication for this payment intent (from a webhook).
    authenticated_payment_intent_id: str | None = None
    invoice_ids: list[str] = field(default_factory=list)
    #: Set while the subscription is parked (status needs_attention).
    attention: Attention | None = None
    invoices_issued: int = 0
    #: How many workflow runs came before this one (continue-as-new count).
    run_number: int = 1
    #: Index of the invoiced period [current_period_start, current_period_end); None in runs
    #: recorded before it existed (the calendar then computes every period, as they did).
    current_period_index: int | None = None
    #: Seats: each period bills ``quantity x plan.amount_minor``.
    quantity: int = 1
    #: What was billed for the current terms in the current period and not credited since
    #: (minor units): the renewal's subscription line, or the last change's charge line. A
    #: proration credit never exceeds it. None: nothing billed under these terms yet.
    terms_billed_minor: int | None = None
    #: A change waiting for the next renewal.
    pending_change: PendingChange | None = None
    #: Proration lines carried to the next renewal invoice (``create_prorations``).
    pending_lines: list[ProrationLine] = field(default_factory=list)
    #: Plan or quantity changes applied so far.
    changes_applied: int = 0

    # ---- calendar -------------------------------------------------------------------------

    def period(self, index: int) -> BillingPeriod:
        """Period ``index``. The invoiced period keeps the boundaries it was invoiced with, and
        the next one starts exactly where it ends: zone rules can change under a running
        subscription (a tzdata release in a deploy, README "Replay safety"), and recomputing
        either boundary then would leave a gap or an overlap between two invoices. Later
        periods follow the rules in force."""
        computed = period(
            self.anchor_at, self.timezone, self.plan.interval, self.plan.interval_count, index
        )
        invoiced = self.current_period_index
        start, end = self.current_period_start, self.current_period_end
        if invoiced is None or start is None or end is None:
            return computed
        if index == invoiced:
            return BillingPeriod(index=index, start=start, end=end)
        if index == invoiced + 1 and computed.end > end:
            return BillingPeriod(index=index, start=end, end=computed.end)
        return computed

    def record_invoiced_period(
        self,
        invoiced: BillingPeriod,
        recorded_start: datetime | None = None,
        recorded_end: datetime | None = None,
    ) -> None:
        """Remember the period just invoiced, with the boundaries the invoice was stored with
        when the activity reports them (its recorded result is what a replay reads, whatever
        zone rules the replaying worker has)."""
        self.next_period_index = invoiced.index + 1
        self.current_period_index = invoiced.index
        self.current_period_start = recorded_start or invoiced.start
        self.current_period_end = recorded_end or invoiced.end

    @property
    def next_billing_at(self) -> datetime | None:
        """When the next invoice will be issued, or None if none will be."""
        if self.status in (
            SubscriptionStatus.CANCELED,
            SubscriptionStatus.PAUSED,
            SubscriptionStatus.UNPAID,
            SubscriptionStatus.PENDING,
            SubscriptionStatus.NEEDS_ATTENTION,
        ):
            return None
        if self.cancel_at_period_end:
            return None
        return self.period(self.next_period_index).start

    def end_of_paid_through(self) -> datetime:
        """Where a cancel-at-period-end subscription ends: the end of the last invoiced period,
        or the trial's end if nothing was invoiced yet."""
        if self.current_period_end is not None:
            return self.current_period_end
        return self.trial_end_at or self.started_at

    # ---- changes: each returns nothing or raises ChangeRefused with a reason ------------------

    def check_cancel(self, at_period_end: bool, queued: Sequence[bool] = ()) -> None:
        """``queued``: the ``at_period_end`` of each cancel accepted but not applied yet (the
        workflow applies accepted changes one at a time, in order). A cancel that one of them
        would refuse once applied is refused now, at once: twenty parallel cancels then hold
        one accepted Update, not twenty in flight (Temporal holds at most 10 per workflow)."""
        if False in queued:
            raise ChangeRefused(
                f"subscription {self.subscription_id} is already being canceled: an immediate "
                "cancel accepted before this one is being applied; if it fails, the "
                "subscription is left as it was and can be canceled again"
            )
        if at_period_end and True in queued:
            raise ChangeRefused(
                f"subscription {self.subscription_id} is already being set to cancel at period "
                "end by a cancel accepted before this one; cancel immediately instead if needed"
            )
        if self.status == SubscriptionStatus.CANCELED:
            raise ChangeRefused(
                f"subscription {self.subscription_id} is already canceled"
                + (f" (since {self.canceled_at.isoformat()})" if self.canceled_at else "")
            )
        if at_period_end and self.cancel_at_period_end:
            raise ChangeRefused(
                f"subscription {self.subscription_id} is already set to cancel at period end "
                f"({self.end_of_paid_through().isoformat()}); cancel immediately instead if needed"
            )

    def check_pause(self) -> None:
        if self.status == SubscriptionStatus.PAUSED:
            raise ChangeRefused(f"subscription {self.subscription_id} is already paused")
        if self.status in (
            SubscriptionStatus.CANCELED,
            SubscriptionStatus.UNPAID,
            SubscriptionStatus.NEEDS_ATTENTION,
        ):
            raise ChangeRefused(
                f"subscription {self.subscription_id} is {self.status.value} and cannot be paused"
            )
        if self.open_invoice is not None:
            raise ChangeRefused(
                f"subscription {self.subscription_id} has unpaid invoice "
                f"{self.open_invoice.number}; update the payment method or cancel instead"
            )
        if self.cancel_at_period_end:
            raise ChangeRefused(
                f"subscription {self.subscription_id} is set to cancel at period end; "
                "it cannot also be paused"
            )

    def check_resume(self) -> None:
        if self.status != SubscriptionStatus.PAUSED:
            raise ChangeRefused(
                f"subscription {self.subscription_id} is {self.status.value}, not paused; "
                "only a paused subscription can be resumed"
            )

    def check_resume_billing(self) -> None:
        if self.status != SubscriptionStatus.NEEDS_ATTENTION or self.attention is None:
            raise ChangeRefused(
                f"subscription {self.subscription_id} is {self.status.value}, not "
                "needs_attention; only a subscription parked for an operator resumes billing"
            )

    def check_payment_method_update(self) -> None:
        if self.status == SubscriptionStatus.CANCELED:
            raise ChangeRefused(
                f"subscription {self.subscription_id} is canceled; its payment method "
                "can no longer be changed"
            )

    def next_index_after_resume(self, resumed_at: datetime) -> int:
        """Resume keeps the anchor: billing restarts at the first anchor date at or after the
        resume, and periods that started while paused are never invoiced (Stripe's
        pause-collection behaviour)."""
        k = first_index_at_or_after(
            self.anchor_at,
            self.timezone,
            self.plan.interval,
            self.plan.interval_count,
            resumed_at,
        )
        return max(k, self.next_period_index)
