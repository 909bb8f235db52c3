"""What a simulation produced, as finance and support read it: each subscription's invoices
(number, period, amount, status, payment attempts), its status changes and the notices sent
to the customer, plus what the scenario did and the totals per currency.

Stable by construction, so a timeline can be compared with an expected file:
- no random ids: invoices are numbered ``INV-0001``, ``INV-0002``, ... in order of period start
  (then of the scenario's subscription order);
- instants are UTC with ``Z``; whatever the clock stamped (attempts, status changes, notices,
  an end caused by an action) is truncated to its minute, because it carries the few
  milliseconds the activities took;
- amounts are integer minor units with their ISO 4217 currency.

Pure: no Temporal, database or Stripe imports.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from billing.simulate.instants import format_instant

#: Version of the timeline document (``--json``); bumped when a field changes meaning or goes.
#: New fields may be added without a bump.
SCHEMA_VERSION = 1


def _instant(value: datetime | None) -> str | None:
    return None if value is None else format_instant(value)


@dataclass(frozen=True)
class Attempt:
    """One charge attempt of an invoice."""

    number: int
    #: When it ran (UTC, to the minute).
    at: datetime
    #: Why it ran: scheduled, retry (dunning schedule) or payment_method_updated.
    reason: str
    #: succeeded, failed, requires_action (the customer must authenticate) or pending.
    outcome: str
    decline_code: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "at": _instant(self.at),
            "reason": self.reason,
            "outcome": self.outcome,
            "decline_code": self.decline_code,
        }


@dataclass(frozen=True)
class Line:
    """One line of an invoice (signed minor units; a credit is negative)."""

    kind: str
    description: str
    amount_minor: int
    period_start: datetime
    period_end: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "description": self.description,
            "amount_minor": self.amount_minor,
            "period_start": _instant(self.period_start),
            "period_end": _instant(self.period_end),
        }


@dataclass(frozen=True)
class BalanceMovement:
    """A movement of the customer's credit balance (positive: credit granted)."""

    at: datetime
    kind: str
    amount_minor: int
    currency: str
    #: The invoice it came from or went to, by its timeline number.
    invoice: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": _instant(self.at),
            "kind": self.kind,
            "amount_minor": self.amount_minor,
            "currency": self.currency,
            "invoice": self.invoice,
        }


@dataclass(frozen=True)
class Invoice:
    number: str
    period_start: datetime
    period_end: datetime
    amount_due_minor: int
    amount_paid_minor: int
    currency: str
    #: open, paid, void or uncollectible, at the horizon.
    status: str
    #: Why it was closed without payment (e.g. dunning_exhausted, subscription_canceled).
    closed_reason: str | None = None
    attempts: tuple[Attempt, ...] = ()
    lines: tuple[Line, ...] = ()
    #: Credit balance used to pay it (minor units).
    credit_applied_minor: int = 0

    @property
    def prorated(self) -> bool:
        return len(self.lines) > 1 or any(line.kind != "subscription" for line in self.lines)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "number": self.number,
            "period_start": _instant(self.period_start),
            "period_end": _instant(self.period_end),
            "amount_due_minor": self.amount_due_minor,
            "amount_paid_minor": self.amount_paid_minor,
            "currency": self.currency,
            "status": self.status,
            "closed_reason": self.closed_reason,
            "attempts": [a.to_dict() for a in self.attempts],
        }
        # Only where there is something to show (a plan change, credit used), so invoices of
        # one plain subscription line read as before.
        if self.prorated:
            out["lines"] = [line.to_dict() for line in self.lines]
        if self.credit_applied_minor:
            out["credit_applied_minor"] = self.credit_applied_minor
        return out


@dataclass(frozen=True)
class StatusChange:
    at: datetime
    status: str
    #: Order of occurrence across the whole timeline, to merge it into one chronological
    #: view (instants to the minute cannot order events within a minute). Not in the JSON.
    sequence: int = field(default=0, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"at": _instant(self.at), "status": self.status}


@dataclass(frozen=True)
class Notice:
    """A notice the subscription put in the outbox for the customer."""

    at: datetime
    kind: str
    #: The invoice it is about, by its timeline number.
    invoice: str | None = None
    #: See StatusChange.sequence.
    sequence: int = field(default=0, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"at": _instant(self.at), "kind": self.kind, "invoice": self.invoice}


@dataclass(frozen=True)
class SubscriptionTimeline:
    name: str
    plan_code: str
    amount_minor: int
    currency: str
    interval: str
    interval_count: int
    anchor: datetime
    trial_end: datetime | None
    #: The status at the horizon.
    status: str
    ended_at: datetime | None = None
    invoices: tuple[Invoice, ...] = ()
    status_changes: tuple[StatusChange, ...] = ()
    notices: tuple[Notice, ...] = ()

    def invoice(self, number: str) -> Invoice:
        for invoice in self.invoices:
            if invoice.number == number:
                return invoice
        known = ", ".join(i.number for i in self.invoices) or "none"
        raise KeyError(f"no invoice {number!r} in subscription {self.name!r}; it has: {known}")

    def statuses(self) -> list[str]:
        """The statuses it went through, in order."""
        return [c.status for c in self.status_changes]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "plan": {
                "code": self.plan_code,
                "amount_minor": self.amount_minor,
                "currency": self.currency,
                "interval": self.interval,
                "interval_count": self.interval_count,
            },
            "anchor": _instant(self.anchor),
            "trial_end": _instant(self.trial_end),
            "status": self.status,
            "ended_at": _instant(self.ended_at),
            "invoices": [i.to_dict() for i in self.invoices],
            "status_changes": [c.to_dict() for c in self.status_changes],
            "notices": [n.to_dict() for n in self.notices],
        }


@dataclass(frozen=True)
class ActionRecord:
    """What the simulator did at an instant, and whether the subscription accepted it."""

    at: datetime
    action: str
    #: The subscription it was applied to; None for the customer's card at the bank.
    subscription: str | None
    #: applied, or refused (the subscription said no; ``detail`` says why).
    outcome: str
    detail: str = ""
    #: See StatusChange.sequence.
    sequence: int = field(default=0, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": _instant(self.at),
            "action": self.action,
            "subscription": self.subscription,
            "outcome": self.outcome,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class Totals:
    """Sums over every invoice of one currency, in minor units."""

    currency: str
    invoiced_minor: int = 0
    paid_minor: int = 0
    open_minor: int = 0
    uncollectible_minor: int = 0
    void_minor: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "currency": self.currency,
            "invoiced_minor": self.invoiced_minor,
            "paid_minor": self.paid_minor,
            "open_minor": self.open_minor,
            "uncollectible_minor": self.uncollectible_minor,
            "void_minor": self.void_minor,
        }


@dataclass(frozen=True)
class Timeline:
    name: str
    start: datetime
    horizon: datetime
    timezone: str
    subscriptions: tuple[SubscriptionTimeline, ...]
    actions: tuple[ActionRecord, ...] = ()
    totals: tuple[Totals, ...] = field(default=())
    #: Movements of the customer's credit balance (present in the JSON when there are any).
    balance: tuple[BalanceMovement, ...] = ()

    def subscription(self, name: str | None = None) -> SubscriptionTimeline:
        """The subscription called ``name``; without a name, the only one."""
        if name is None:
            if len(self.subscriptions) != 1:
                names = ", ".join(s.name for s in self.subscriptions)
                raise KeyError(f"the timeline has several subscriptions ({names}); name one")
            return self.subscriptions[0]
        for subscription in self.subscriptions:
            if subscription.name == name:
                return subscription
        names = ", ".join(s.name for s in self.subscriptions)
        raise KeyError(f"no subscription {name!r}; the timeline has: {names}")

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` document."""
        return {
            "schema_version": SCHEMA_VERSION,
            "scenario": {
                "name": self.name,
                "start": _instant(self.start),
                "horizon": _instant(self.horizon),
                "timezone": self.timezone,
            },
            "subscriptions": [s.to_dict() for s in self.subscriptions],
            "actions": [a.to_dict() for a in self.actions],
            "totals": [t.to_dict() for t in self.totals],
            **({"balance": [b.to_dict() for b in self.balance]} if self.balance else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"


def totals_of(invoices: list[Invoice]) -> tuple[Totals, ...]:
    """Per-currency sums, currencies in alphabetical order."""
    sums: dict[str, dict[str, int]] = {}
    for invoice in invoices:
        row = sums.setdefault(
            invoice.currency,
            {"invoiced": 0, "paid": 0, "open": 0, "uncollectible": 0, "void": 0},
        )
        row["invoiced"] += invoice.amount_due_minor
        row["paid"] += invoice.amount_paid_minor
        if invoice.status in ("open", "uncollectible", "void"):
            row[invoice.status] += invoice.amount_due_minor - invoice.amount_paid_minor
    return tuple(
        Totals(
            currency=currency,
            invoiced_minor=row["invoiced"],
            paid_minor=row["paid"],
            open_minor=row["open"],
            uncollectible_minor=row["uncollectible"],
            void_minor=row["void"],
        )
        for currency, row in sorted(sums.items())
    )
