"""The money-safety invariants the scenario fuzzer checks on a finished simulation: on the
records (database), the workflows (Temporal) and the provider's own records (localstripe,
through the Stripe SDK).

``check(simulation, timeline)`` returns the violations, each a line naming the invariant
(``[one-success-per-invoice]``, ...), so a failure says which rule broke and where.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter, defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import WorkflowExecutionStatus

from billing.dunning import MIN_AUTOMATIC_RETRY_SPACING
from billing.invoices import InvoiceStatus
from billing.records import AttemptStatus
from billing.simulate.runner import Simulation
from billing.simulate.timeline import Timeline
from billing.testing.harness import BillingSnapshot

#: Attempts the engine makes on its own; every other reason is the customer's own action
#: (a new card, an authentication), which may retry sooner.
AUTOMATIC_REASONS = frozenset({"scheduled", "retry"})
#: What a subscription may be at the horizon: live, ended, or parked with a reason.
SETTLED_STATUSES = frozenset(
    {"trialing", "active", "past_due", "paused", "unpaid", "canceled", "needs_attention"}
)
#: Workflow execution states that mean the subscription died.
DEAD = {
    WorkflowExecutionStatus.FAILED,
    WorkflowExecutionStatus.TERMINATED,
    WorkflowExecutionStatus.TIMED_OUT,
    WorkflowExecutionStatus.CANCELED,
}
INVARIANTS = (
    "one-success-per-invoice",
    "provider-success-recorded",
    "retry-spacing",
    "one-invoice-per-billable-period",
    "notice-once",
    "settled-at-horizon",
    "totals-balance",
)


async def check(simulation: Simulation, timeline: Timeline) -> list[str]:
    """Every invariant violation in the finished simulation (empty: all hold)."""
    h = simulation.harness
    snaps = {live.name: h.snapshot(live.subscription_id) for live in simulation.live}
    problems: list[str] = []
    charges = (
        await asyncio.to_thread(h.provider_charges, simulation.live[0].subscription_id)
        if simulation.live
        else []
    )
    problems += _provider(snaps, charges, h.stripe)
    for name, snap in snaps.items():
        problems += _spacing(name, snap)
        problems += _periods(name, snap, timeline.horizon)
        problems += _notices(name, snap)
    for live in simulation.live:
        problems += await _settled(simulation, live.name, live.workflow_id, snaps[live.name])
    problems += _totals(snaps, charges)
    return problems


def _succeeded(charge: dict[str, Any]) -> bool:
    return charge.get("status") == "succeeded" and not charge.get("refunded")


def _provider(
    snaps: dict[str, BillingSnapshot], charges: list[dict[str, Any]], stripe: Any
) -> list[str]:
    """At most one succeeded charge per invoice; each is a recorded payment of that invoice."""
    invoice_of_intent: dict[str, tuple[str, str]] = {}
    recorded_charges: set[str] = set()
    recorded_intents: set[str] = set()
    for name, snap in snaps.items():
        for invoice in snap.invoices:
            for attempt in snap.attempts[invoice.id]:
                if attempt.stripe_payment_intent_id:
                    invoice_of_intent[attempt.stripe_payment_intent_id] = (name, invoice.number)
            for payment in snap.payments[invoice.id]:
                recorded_intents.add(payment.stripe_payment_intent_id)
                if payment.stripe_charge_id:
                    recorded_charges.add(payment.stripe_charge_id)
    problems = []
    per_invoice: Counter[tuple[str, str]] = Counter()
    for charge in filter(_succeeded, charges):
        intent_id = charge.get("payment_intent")
        where = invoice_of_intent.get(str(intent_id))
        if where is None and intent_id:
            metadata = stripe.v1.payment_intents.retrieve(intent_id).metadata or {}
            where = ("?", f"invoice id {metadata.get('invoice_id')}")
        if where is None:
            problems.append(
                f"[provider-success-recorded] charge {charge['id']} succeeded with no invoice"
            )
            continue
        per_invoice[where] += 1
        if charge["id"] not in recorded_charges and intent_id not in recorded_intents:
            problems.append(
                f"[provider-success-recorded] {where[0]} {where[1]}: charge {charge['id']} "
                f"({charge['amount']} {charge['currency']}) succeeded at the provider but is "
                "no recorded payment"
            )
    for (name, number), count in per_invoice.items():
        if count > 1:
            problems.append(f"[one-success-per-invoice] {name} {number}: {count} succeeded charges")
    return problems


def _spacing(name: str, snap: BillingSnapshot) -> list[str]:
    """An automatic attempt keeps the minimum spacing from the invoice's previous attempt,
    whatever caused that one: only the customer's own action may come sooner."""
    problems = []
    for invoice in snap.invoices:
        attempts = sorted(snap.attempts[invoice.id], key=lambda a: a.created_at)
        for before, after in itertools.pairwise(attempts):
            if after.reason not in AUTOMATIC_REASONS:
                continue
            gap = after.created_at - before.created_at
            if gap < MIN_AUTOMATIC_RETRY_SPACING:
                problems.append(
                    f"[retry-spacing] {name} {invoice.number}: automatic attempt "
                    f"#{after.attempt_number} ({after.reason}) {_fmt(gap)} after "
                    f"#{before.attempt_number} ({before.reason}; minimum "
                    f"{_fmt(MIN_AUTOMATIC_RETRY_SPACING)})"
                )
    return problems


def _periods(name: str, snap: BillingSnapshot, horizon: datetime) -> list[str]:
    problems = []
    starts = Counter(i.period_start for i in snap.invoices)
    for start, count in starts.items():
        if count > 1:
            problems.append(
                f"[one-invoice-per-billable-period] {name}: {count} invoices for the period "
                f"starting {start.isoformat()}"
            )
    ended_at = snap.subscription.ended_at
    paused: list[tuple[datetime, datetime]] = []
    changes = snap.status_changes
    for n, change in enumerate(changes):
        if change.to_status.value == "paused":
            until = (
                changes[n + 1].changed_at
                if n + 1 < len(changes)
                else datetime.max.replace(tzinfo=UTC)
            )
            paused.append((change.changed_at, until))
    for invoice in snap.invoices:
        if ended_at is not None and invoice.period_start >= ended_at:
            problems.append(
                f"[one-invoice-per-billable-period] {name} {invoice.number}: the period starts "
                f"{invoice.period_start.isoformat()}, at or after the subscription ended "
                f"({ended_at.isoformat()})"
            )
        for since, until in paused:
            if since <= invoice.period_start < until:
                problems.append(
                    f"[one-invoice-per-billable-period] {name} {invoice.number}: the period "
                    f"starts {invoice.period_start.isoformat()}, while paused"
                )
    return problems


def _notices(name: str, snap: BillingSnapshot) -> list[str]:
    seen: Counter[tuple[str | None, str, object]] = Counter(
        (n.invoice_id, n.kind, n.payload.get("attempt")) for n in snap.notifications
    )
    numbers = {i.id: i.number for i in snap.invoices}
    return [
        f"[notice-once] {name}: {count} {kind} notices for "
        f"{numbers.get(invoice_id or '', invoice_id)} attempt {attempt}"
        for (invoice_id, kind, attempt), count in seen.items()
        if count > 1
    ]


async def _settled(
    simulation: Simulation, name: str, workflow_id: str, snap: BillingSnapshot
) -> list[str]:
    """Live, ended, or parked with a reason: never failed, never stuck."""
    client = simulation.harness.client
    handle = client.get_workflow_handle(workflow_id)
    description = await handle.describe()
    status = snap.subscription.status.value
    open_invoices = [i for i in snap.invoices if i.status == InvoiceStatus.OPEN]
    problems = []
    if description.status in DEAD:
        problems.append(
            f"[settled-at-horizon] {name}: the workflow is {description.status.name} "
            f"(database says {status}, {len(open_invoices)} open invoice(s))"
        )
        return problems
    if status not in SETTLED_STATUSES:
        problems.append(f"[settled-at-horizon] {name}: status {status!r} at the horizon")
    if description.status == WorkflowExecutionStatus.COMPLETED:
        if open_invoices:
            problems.append(
                f"[settled-at-horizon] {name}: the workflow ended with "
                f"{', '.join(i.number for i in open_invoices)} still open"
            )
        return problems
    if open_invoices and status != "needs_attention":
        history = await handle.fetch_history()
        if not _pending_timers(history.events):
            problems.append(
                f"[settled-at-horizon] {name}: {', '.join(i.number for i in open_invoices)} "
                "open with no timer pending (no retry or deadline will ever come)"
            )
    for invoice in open_invoices:
        pending = [a for a in snap.attempts[invoice.id] if a.status == AttemptStatus.PENDING]
        if pending:
            problems.append(
                f"[settled-at-horizon] {name} {invoice.number}: attempt "
                f"#{pending[-1].attempt_number} still pending (outcome unknown) at the horizon"
            )
    return problems


def _pending_timers(events: Sequence[HistoryEvent]) -> set[int]:
    timers: set[int] = set()
    for event in events:
        kind = event.event_type
        if kind == EventType.EVENT_TYPE_TIMER_STARTED:
            timers.add(event.event_id)
        elif kind == EventType.EVENT_TYPE_TIMER_FIRED:
            timers.discard(event.timer_fired_event_attributes.started_event_id)
        elif kind == EventType.EVENT_TYPE_TIMER_CANCELED:
            timers.discard(event.timer_canceled_event_attributes.started_event_id)
    return timers


def _totals(snaps: dict[str, BillingSnapshot], charges: list[dict[str, Any]]) -> list[str]:
    """Per currency: invoiced = paid + open + uncollectible + void, and what the records call
    paid is what the provider took."""
    invoiced: Counter[str] = Counter()
    accounted: Counter[str] = Counter()
    paid: Counter[str] = Counter()
    problems = []
    for name, snap in snaps.items():
        for invoice in snap.invoices:
            currency = invoice.currency.upper()
            invoiced[currency] += invoice.amount_due_minor
            paid[currency] += invoice.amount_paid_minor
            if invoice.status == InvoiceStatus.PAID:
                accounted[currency] += invoice.amount_paid_minor
                if invoice.amount_paid_minor != invoice.amount_due_minor:
                    problems.append(
                        f"[totals-balance] {name} {invoice.number}: paid "
                        f"{invoice.amount_paid_minor} of {invoice.amount_due_minor}"
                    )
            else:
                accounted[currency] += invoice.amount_due_minor
                if invoice.amount_paid_minor:
                    problems.append(
                        f"[totals-balance] {name} {invoice.number}: {invoice.status.value} "
                        f"with {invoice.amount_paid_minor} paid"
                    )
    taken: defaultdict[str, int] = defaultdict(int)
    for charge in filter(_succeeded, charges):
        taken[str(charge["currency"]).upper()] += int(charge["amount"])
    for currency in sorted(set(invoiced) | set(taken)):
        if invoiced[currency] != accounted[currency]:
            problems.append(
                f"[totals-balance] {currency}: invoiced {invoiced[currency]} != paid + open + "
                f"uncollectible + void {accounted[currency]}"
            )
        if taken[currency] != paid[currency]:
            problems.append(
                f"[totals-balance] {currency}: the provider took {taken[currency]}, the "
                f"records say {paid[currency]} paid"
            )
    return problems


def _fmt(gap: timedelta) -> str:
    minutes = int(gap.total_seconds() // 60)
    return f"{minutes // 60}h{minutes % 60:02d}m"
