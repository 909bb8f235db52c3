"""Plan and quantity changes: the pure rules the subscription workflow, its validator and the
preview endpoint share.

``check_change`` says whether a change may be accepted at all (the Update's validator: a
refusal writes nothing). ``decide_change`` says what applying it at an instant does: when it
takes effect, which proration lines it bills (``billing.proration``), whether they are
invoiced now or carried to the renewal, whether the period's unpaid renewal is adjusted
(voided and billed again on the change's invoice, so no credit is given for money never
received), and the new anchor of an interval change.

Defaults, when the caller leaves them out (as Stripe's common setup): an upgrade (the new
terms cost more per unit of time) applies now and is invoiced at once (``always_invoice``);
a downgrade applies at the period's end, when nothing needs prorating.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from fractions import Fraction

from billing.calendar import _APPROX_DAYS, IntervalUnit, period
from billing.errors import ChangeRefused, InvalidInput
from billing.plans import MAX_QUANTITY, Plan, validate_total
from billing.proration import ProrationLine, Terms, prorate
from billing.subscription import (
    ChangeEffective,
    ProrationBehavior,
    SubscriptionState,
    SubscriptionStatus,
)


@dataclass(frozen=True)
class ChangeRequest:
    """A change with its defaults filled in."""

    plan: Plan
    quantity: int
    effective: ChangeEffective
    proration: ProrationBehavior
    change_id: str


@dataclass(frozen=True)
class ChangeDecision:
    """What applying a change at ``effective_at`` (UTC) does."""

    request: ChangeRequest
    effective_at: datetime
    #: True: stored as pending until the next renewal; nothing else happens now.
    scheduled: bool
    #: The proration lines of the change (minor units, signed).
    lines: list[ProrationLine] = field(default_factory=list)
    #: Issue an invoice for the lines now (and collect it).
    invoice_now: bool = False
    #: Carry the lines to the next renewal invoice.
    carry_lines: bool = False
    #: Void the period's unpaid renewal and bill its lines again on the change's invoice.
    adjust_open_invoice: bool = False
    #: An interval change now: the new anchor and the end of the period it starts.
    new_anchor_at: datetime | None = None
    new_period_end: datetime | None = None
    #: ``terms_billed_minor`` after the change (what a later credit may give back).
    terms_billed_minor: int | None = None


def terms_of(plan: Plan, quantity: int) -> Terms:
    return Terms(plan.code, plan.name, plan.amount_minor, quantity, plan.currency)


def _rate_per_day(plan: Plan, quantity: int) -> Fraction:
    """Price per (average) day: how an upgrade is told from a downgrade across intervals."""
    days = Fraction(_APPROX_DAYS[IntervalUnit(plan.interval)]) * plan.interval_count
    return Fraction(plan.amount_minor * quantity) / days


def is_upgrade(old: Plan, old_quantity: int, new: Plan, new_quantity: int) -> bool:
    """The new terms cost at least as much per unit of time (equal counts as an upgrade: it
    applies at once, and prorates to nothing)."""
    return _rate_per_day(new, new_quantity) >= _rate_per_day(old, old_quantity)


def interval_changes(old: Plan, new: Plan) -> bool:
    return (old.interval, old.interval_count) != (new.interval, new.interval_count)


def check_change(
    state: SubscriptionState,
    *,
    plan: Plan | None,
    quantity: int | None,
    effective: str | None,
    proration: str | None,
    change_id: str,
) -> ChangeRequest:
    """The change with its defaults, or ChangeRefused/InvalidInput with the reason. Reads only
    the state: the workflow's validator runs it, so a refusal never enters history."""
    s = state
    new_plan = plan if plan is not None else s.plan
    new_quantity = s.quantity if quantity is None else quantity
    if isinstance(new_quantity, bool) or not isinstance(new_quantity, int):
        raise InvalidInput(f"quantity must be a whole number; got {quantity!r}", field="quantity")
    if not 1 <= new_quantity <= MAX_QUANTITY:
        raise InvalidInput(
            f"quantity must be between 1 and {MAX_QUANTITY}; got {new_quantity}", field="quantity"
        )
    try:
        chosen_effective = None if effective is None else ChangeEffective(effective)
    except ValueError:
        raise InvalidInput(
            f"effective must be one of: {', '.join(e.value for e in ChangeEffective)}; "
            f"got {effective!r}",
            field="effective",
        ) from None
    try:
        chosen_proration = None if proration is None else ProrationBehavior(proration)
    except ValueError:
        raise InvalidInput(
            f"proration must be one of: {', '.join(p.value for p in ProrationBehavior)}; "
            f"got {proration!r}",
            field="proration",
        ) from None
    validate_total(new_plan, new_quantity)
    sid = s.subscription_id
    if s.status == SubscriptionStatus.CANCELED:
        raise ChangeRefused(f"subscription {sid} is canceled; its plan can no longer change")
    if s.status in (
        SubscriptionStatus.PAUSED,
        SubscriptionStatus.UNPAID,
        SubscriptionStatus.NEEDS_ATTENTION,
        SubscriptionStatus.PENDING,
    ):
        advice = {
            SubscriptionStatus.PAUSED: "resume it first",
            SubscriptionStatus.UNPAID: "give a working card first",
            SubscriptionStatus.NEEDS_ATTENTION: "resume billing once its cause is fixed",
            SubscriptionStatus.PENDING: "wait until it has started",
        }[s.status]
        raise ChangeRefused(
            f"subscription {sid} is {s.status.value}; its plan cannot change now: {advice}"
        )
    if s.cancel_at_period_end:
        raise ChangeRefused(
            f"subscription {sid} is set to cancel at period end; its plan cannot change"
        )
    if s.pending_change is not None:
        when = s.next_billing_at.isoformat() if s.next_billing_at else "the period end"
        raise ChangeRefused(
            f"subscription {sid} already has a change pending for the period end "
            f"({s.pending_change.plan.code} x {s.pending_change.quantity} from {when}); "
            "cancel it first"
        )
    if new_plan.currency != s.plan.currency:
        raise ChangeRefused(
            f"plan {new_plan.code!r} bills in {new_plan.currency} but subscription {sid} bills "
            f"in {s.plan.currency}; a subscription's currency cannot change (cancel and sign up "
            "again in the new currency)"
        )
    if new_plan == s.plan and new_quantity == s.quantity:
        raise ChangeRefused(
            f"subscription {sid} is already on {new_plan.code} x {new_quantity}; nothing to change"
        )
    upgrade = is_upgrade(s.plan, s.quantity, new_plan, new_quantity)
    resolved_effective = chosen_effective or (
        ChangeEffective.NOW if upgrade else ChangeEffective.PERIOD_END
    )
    resolved_proration = chosen_proration or ProrationBehavior.ALWAYS_INVOICE
    inv = s.open_invoice
    if resolved_effective == ChangeEffective.NOW and inv is not None:
        if inv.change_id is not None:
            raise ChangeRefused(
                f"invoice {inv.number} of an earlier change to subscription {sid} is unpaid; "
                "update the card so it is paid, or make this change at period end"
            )
        if inv.paid_attempt_number is not None:
            raise ChangeRefused(
                f"invoice {inv.number} of subscription {sid} was charged and is being settled; "
                "try again in a moment"
            )
    return ChangeRequest(
        plan=new_plan,
        quantity=new_quantity,
        effective=resolved_effective,
        proration=resolved_proration,
        change_id=change_id,
    )


def decide_change(
    state: SubscriptionState, request: ChangeRequest, now: datetime
) -> ChangeDecision:
    """What applying ``request`` at ``now`` (UTC) does; the state is not modified."""
    s = state
    if request.effective == ChangeEffective.PERIOD_END:
        at = s.next_billing_at or s.current_period_end or now
        return ChangeDecision(request=request, effective_at=max(at, now), scheduled=True)
    old_terms = terms_of(s.plan, s.quantity)
    new_terms = terms_of(request.plan, request.quantity)
    start, end = s.current_period_start, s.current_period_end
    in_period = start is not None and end is not None and start <= now < end
    if not in_period:
        # Nothing billed now (a trial, or the period ended and its renewal is due): the new
        # terms are billed from the next renewal, whole.
        return ChangeDecision(request=request, effective_at=now, scheduled=False)
    assert start is not None and end is not None
    # Runs from before plan changes never recorded it: their period billed the plan's price.
    billed = s.terms_billed_minor
    if billed is None:
        billed = old_terms.total_minor
    inv = s.open_invoice
    adjust = inv is not None and inv.change_id is None and inv.period_start == start
    proration = request.proration
    if adjust and proration != ProrationBehavior.NONE:
        # Money for this period was never received: nothing is credited; the renewal is
        # voided and billed again with the change's lines on one invoice, collected now.
        proration = ProrationBehavior.ALWAYS_INVOICE
    new_anchor = new_end = None
    if interval_changes(s.plan, request.plan):
        # A new period starts now, with the change as its anchor, billed in full (Stripe).
        new_anchor = now.replace(microsecond=0)
        new_end = period(
            new_anchor, s.timezone, request.plan.interval, request.plan.interval_count, 0
        ).end
    if proration == ProrationBehavior.NONE and new_end is None:
        return ChangeDecision(
            request=request, effective_at=now, scheduled=False, terms_billed_minor=0
        )
    result = prorate(
        old=old_terms,
        new=new_terms,
        period_start=start,
        period_end=end,
        at=now,
        credit_cap_minor=0 if proration == ProrationBehavior.NONE else billed,
        change_id=request.change_id,
        new_period_end=new_end,
    )
    invoice_now = proration == ProrationBehavior.ALWAYS_INVOICE or new_end is not None
    return ChangeDecision(
        request=request,
        effective_at=now,
        scheduled=False,
        lines=result.lines,
        invoice_now=invoice_now and (bool(result.lines) or adjust),
        carry_lines=not invoice_now and bool(result.lines),
        adjust_open_invoice=adjust and invoice_now,
        new_anchor_at=new_anchor,
        new_period_end=new_end,
        terms_billed_minor=result.charge_minor,
    )


def change_request_digest(
    subscription_id: str,
    *,
    plan_code: str | None,
    quantity: int | None,
    effective: str | None,
    proration: str | None,
) -> str:
    """What one plan change request asks, as a digest: an Idempotency-Key's repeat must ask
    the same (fields as sent, before defaults: leaving one out is another request)."""
    asked = {
        "subscription": subscription_id,
        "plan": plan_code,
        "quantity": quantity,
        "effective": effective,
        "proration": proration,
    }
    return hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()


__all__ = [
    "ChangeDecision",
    "ChangeRequest",
    "change_request_digest",
    "check_change",
    "decide_change",
    "interval_changes",
    "is_upgrade",
    "terms_of",
]
