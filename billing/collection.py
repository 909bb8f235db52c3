"""What a subscription workflow does next: a pure function of its state and the time.

The workflow asks ``decide(state, now, run)`` and carries out the typed step it gets back:
sleep, bill a period, charge the open invoice, confirm an authenticated payment, end the
collection of an invoice a credit note paid, take the final action, end, continue as new, or
wait for a change or an operator. The dunning rules (which retry is due, how far apart
automatic attempts must be, when retries run out) live here, where hypothesis can test them
without a Temporal server.

Retry rules (``RetryRules.SPACED``, every run started since the money-safety change):

* an open invoice is retried at the policy's offsets from its first failure;
* a retry slot that passed while the invoice could not be retried (blocked by a hard decline
  or by authentication, or an outage) is skipped, never caught up: at most the latest missed
  slot fires, once;
* a slot at or before the invoice's last attempt is covered by that attempt;
* automatic attempts are at least ``DunningPolicy.min_retry_spacing`` after the previous
  attempt of the invoice, whatever caused it; only the customer's own action (a new card, an
  authentication) is acted on sooner.

``RetryRules.LEGACY`` is the rule of runs recorded before that change: each passed slot fires in
turn. It is kept, bit for bit, so those runs replay (see ``workflow.patched`` in the workflow).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from billing.dunning import DunningPolicy
from billing.subscription import OpenInvoice, SubscriptionState, SubscriptionStatus


class RetryRules(StrEnum):
    #: Every passed slot fires in turn (runs recorded before the money-safety change).
    LEGACY = "legacy"
    #: Missed slots are skipped and automatic attempts are spaced (see the module docstring).
    SPACED = "spaced"


class AttemptReason(StrEnum):
    """Why a charge attempt runs; recorded on the attempt (``payment_attempts.reason``)."""

    #: The invoice's first attempt, on its billing date.
    SCHEDULED = "scheduled"
    #: A retry on the dunning schedule.
    RETRY = "retry"
    #: The customer gave a new card: retried at once.
    PAYMENT_METHOD_UPDATED = "payment_method_updated"

    @property
    def automatic(self) -> bool:
        return self is not AttemptReason.PAYMENT_METHOD_UPDATED


# ============================================================================ steps ==========


@dataclass(frozen=True)
class Finish:
    """The subscription has ended: the workflow returns."""


@dataclass(frozen=True)
class WaitForChange:
    """Nothing is due until a change arrives (paused, unpaid, or parked for an operator)."""


@dataclass(frozen=True)
class SleepUntil:
    """Nothing is due before ``at`` (UTC); a change arriving sooner wakes the workflow.
    ``then``: what to do if the sleep runs to its end, without deciding again (the billing
    date or the period end has come)."""

    at: datetime
    then: BillPeriod | EndAtPeriodEnd | None = None


@dataclass(frozen=True)
class ContinueAsNew:
    """End this run and carry the state into a new one (bounded history)."""


@dataclass(frozen=True)
class BillPeriod:
    """Issue the invoice of period ``index``."""

    index: int


@dataclass(frozen=True)
class EndAtPeriodEnd:
    """A cancel at period end has come due."""

    ended_at: datetime


@dataclass(frozen=True)
class Charge:
    """Attempt the open invoice now. ``retry_slots_done``: the schedule position once this
    attempt is made (slots it consumes, including skipped ones)."""

    reason: AttemptReason
    retry_slots_done: int
    #: The customer changed the card: the block (hard decline, authentication) is lifted.
    unblock: bool = False


@dataclass(frozen=True)
class ConfirmAuthenticated:
    """The customer authenticated ``payment_intent_id``: check it and settle."""

    payment_intent_id: str


@dataclass(frozen=True)
class Settle:
    """A charge of the open invoice succeeded but its settlement is not recorded yet (a run
    that was parked after the charge): settle it."""


@dataclass(frozen=True)
class SettleByCredit:
    """A credit note paid the open invoice (its amount due is 0): cancel its PaymentIntent so
    nobody can pay it, and end its collection without charging."""


@dataclass(frozen=True)
class TakeFinalAction:
    """Retries ran out: the policy's final action."""


Step = (
    Finish
    | WaitForChange
    | SleepUntil
    | ContinueAsNew
    | BillPeriod
    | EndAtPeriodEnd
    | Charge
    | ConfirmAuthenticated
    | Settle
    | SettleByCredit
    | TakeFinalAction
)


@dataclass(frozen=True)
class RunFacts:
    """What the workflow knows about its run, beyond the state: whether it should continue as
    new at the next safe point (the server suggests it, or the run is long enough)."""

    continue_as_new_due: bool = False
    #: The server suggests continue-as-new now (also safe mid-dunning).
    continue_as_new_suggested: bool = False
    rules: RetryRules = RetryRules.SPACED


# ============================================================================ decisions ======


#: The shortest timer ``timer_delay`` gives for an instant still to come by ``workflow.now()``.
MIN_TIMER = timedelta(milliseconds=1)
#: The most a timer is started ahead of ``workflow.now()`` (see ``timer_delay``): a workflow
#: task that outlives Temporal's 10 s task timeout is run again, so no task's local activities
#: can have taken longer.
MAX_TIMER_LEAD = timedelta(seconds=10)


def timer_delay(when: datetime, now: datetime, observed_at: datetime | None) -> timedelta:
    """How long a durable timer must run to fire at ``when``.

    A workflow computes a delay from ``now`` (``workflow.now()``: when its current task
    started), but Temporal starts the timer when it records the command, at the task's end.
    On billing day a task that ran local activities queued behind every other due
    subscription's can end seconds after it started, and its timer then fires as many seconds
    late (2.9 s at the median in the burst benchmark). ``observed_at``, the clock a local
    activity of this task read as it finished (recorded in its marker, so a replay computes
    the same), is a later lower bound of the instant the timer starts: the delay counts from
    it, by at most ``MAX_TIMER_LEAD``, and never below ``MIN_TIMER``: 0 only when ``when`` has
    come by ``now``, so the workflow never acts on the activity's clock alone. A worker clock
    ahead of Temporal's can fire a timer early: the workflow checks ``now`` when it fires and
    sleeps the rest, with ``observed_at`` None (it belongs to the task that read it)."""
    remaining = when - now
    if remaining <= timedelta(0):
        return timedelta(0)
    lead = timedelta(0) if observed_at is None else observed_at - now
    lead = min(max(lead, timedelta(0)), MAX_TIMER_LEAD)
    return max(remaining - lead, min(remaining, MIN_TIMER))


def decide(state: SubscriptionState, now: datetime, run: RunFacts) -> Step:
    """The next step of a subscription at ``now`` (UTC)."""
    s = state
    if s.status == SubscriptionStatus.CANCELED:
        return Finish()
    if s.status == SubscriptionStatus.NEEDS_ATTENTION:
        return WaitForChange()
    if s.open_invoice is not None:
        return collection_step(s, s.open_invoice, now, run)
    if run.continue_as_new_due:
        return ContinueAsNew()
    if s.cancel_at_period_end:
        # Also while paused or unpaid: the subscription still ends when its paid period does
        # (or now, if that end has already passed).
        ends_at = max(s.end_of_paid_through(), now)
        step = EndAtPeriodEnd(ends_at)
        return step if ends_at <= now else SleepUntil(ends_at, then=step)
    if s.status in (SubscriptionStatus.PAUSED, SubscriptionStatus.UNPAID):
        return WaitForChange()
    due = s.period(s.next_period_index).start
    bill = BillPeriod(s.next_period_index)
    return bill if due <= now else SleepUntil(due, then=bill)


def collection_step(
    state: SubscriptionState, inv: OpenInvoice, now: datetime, run: RunFacts
) -> Step:
    """The next step for the open invoice ``inv``."""
    if inv.paid_by_credit:
        # Before anything else: no charge, no retry and no final action for a paid invoice.
        return SettleByCredit()
    if inv.paid_attempt_number is not None:
        return Settle()
    if inv.attempts == 0:
        return Charge(AttemptReason.SCHEDULED, inv.scheduled_retries_done)
    if state.payment_method_version != inv.payment_method_version_seen:
        # A new card clears a hard decline or pending authentication: retry at once.
        return Charge(
            AttemptReason.PAYMENT_METHOD_UPDATED, inv.scheduled_retries_done, unblock=True
        )
    if state.authenticated_payment_intent_id is not None:
        return ConfirmAuthenticated(state.authenticated_payment_intent_id)
    policy = state.plan.dunning
    assert inv.first_failure_at is not None, "an attempted, unpaid invoice has failed once"
    nxt = next_retry(policy, inv, now, run.rules)
    if nxt is not None and nxt.at <= now:
        return Charge(AttemptReason.RETRY, nxt.slot + 1)
    window_end = policy.window_end(inv.first_failure_at)
    if nxt is None and now >= window_end:
        return TakeFinalAction()
    if run.continue_as_new_suggested:
        # Safe mid-dunning: the state carries attempts, schedule position and blocks.
        return ContinueAsNew()
    return SleepUntil(nxt.at if nxt is not None else window_end)


@dataclass(frozen=True)
class NextRetry:
    """The next automatic retry: when, and which schedule slot (0-based) it stands for."""

    at: datetime
    slot: int


def next_retry(
    policy: DunningPolicy, inv: OpenInvoice, now: datetime, rules: RetryRules
) -> NextRetry | None:
    """The next automatic retry of ``inv``, or None when none is left or the invoice waits for
    the customer (hard decline, authentication)."""
    if inv.blocked is not None or inv.first_failure_at is None:
        return None
    first = inv.first_failure_at
    done = inv.scheduled_retries_done
    if rules == RetryRules.LEGACY:
        at = policy.retry_at(first, done)
        return None if at is None else NextRetry(at, done)
    slots = [
        (k, first + timedelta(days=offset))
        for k, offset in enumerate(policy.retry_offsets_days)
        if k >= done
    ]
    last = inv.last_attempt_at
    if last is not None:
        # A slot at or before the last attempt is covered by it.
        slots = [(k, at) for k, at in slots if at > last]
    if not slots:
        return None
    missed = [(k, at) for k, at in slots if at <= now]
    # Of the slots that passed while nothing could run, only the latest fires.
    slot, at = missed[-1] if missed else slots[0]
    if last is not None:
        at = max(at, last + policy.min_retry_spacing)
    return NextRetry(at, slot)


__all__ = [
    "AttemptReason",
    "BillPeriod",
    "Charge",
    "ConfirmAuthenticated",
    "ContinueAsNew",
    "EndAtPeriodEnd",
    "Finish",
    "NextRetry",
    "RetryRules",
    "RunFacts",
    "Settle",
    "SettleByCredit",
    "SleepUntil",
    "Step",
    "TakeFinalAction",
    "WaitForChange",
    "collection_step",
    "decide",
    "next_retry",
]
