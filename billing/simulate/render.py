"""Timelines for people (Rich tables) and for programs (the ``--json`` document).

The tables show instants on the customer's wall clock (the zone is in the title), because
that is where billing dates live; the JSON keeps them in UTC.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from billing.calendar import resolve_timezone
from billing.money import Money
from billing.simulate.timeline import (
    ActionRecord,
    Attempt,
    Invoice,
    Notice,
    StatusChange,
    SubscriptionTimeline,
    Timeline,
)

_STATUS_STYLE = {
    "paid": "green",
    "open": "yellow",
    "uncollectible": "red",
    "void": "dim",
    "active": "green",
    "trialing": "cyan",
    "past_due": "yellow",
    "paused": "blue",
    "unpaid": "red",
    "canceled": "red",
    "succeeded": "green",
    "failed": "red",
    "requires_action": "yellow",
    "applied": "green",
    "refused": "red",
}


def render_json(timeline: Timeline) -> str:
    """The ``--json`` document (ends with a newline)."""
    return timeline.to_json()


def print_timeline(timeline: Timeline, console: Console) -> None:
    console.print(timeline_renderable(timeline))


def timeline_renderable(timeline: Timeline) -> Group:
    zone = resolve_timezone(timeline.timezone)
    parts: list[Table | Text] = [
        Text.assemble(
            (timeline.name, "bold"),
            f"  {_local(timeline.start, zone)} → {_local(timeline.horizon, zone)} "
            f"(times in {timeline.timezone})",
        )
    ]
    for subscription in timeline.subscriptions:
        parts.append(_invoices_table(subscription, zone))
    parts.append(_events_table(timeline, zone))
    if timeline.totals:
        parts.append(_totals_table(timeline))
    return Group(*parts)


def _invoices_table(sub: SubscriptionTimeline, zone: ZoneInfo) -> Table:
    every = sub.interval if sub.interval_count == 1 else f"{sub.interval_count} {sub.interval}s"
    price = Money(sub.amount_minor, sub.currency).format()
    trial = f", trial until {_local(sub.trial_end, zone)}" if sub.trial_end else ""
    table = Table(
        title=f"{sub.name}: {sub.plan_code}, {price} every {every}",
        caption=f"anchor {_local(sub.anchor, zone)}{trial}; status at the horizon: {sub.status}",
        title_justify="left",
        caption_justify="left",
    )
    table.add_column("invoice", no_wrap=True)
    table.add_column("period", no_wrap=True)
    table.add_column("amount", justify="right", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("attempts")
    for invoice in sub.invoices:
        table.add_row(
            invoice.number,
            f"{_local_date(invoice.period_start, zone)} → {_local_date(invoice.period_end, zone)}",
            _amount(invoice),
            _styled(invoice.status, invoice.closed_reason),
            Text("\n").join(_attempt(a, zone) for a in invoice.attempts) or Text("-"),
        )
    if not sub.invoices:
        table.add_row("-", "no invoice before the horizon", "", "", "")
    return table


def _amount(invoice: Invoice) -> str:
    due = Money(invoice.amount_due_minor, invoice.currency).format()
    if invoice.amount_paid_minor in (0, invoice.amount_due_minor):
        return due
    return f"{due} (paid {Money(invoice.amount_paid_minor, invoice.currency).format()})"


def _attempt(attempt: Attempt, zone: ZoneInfo) -> Text:
    text = Text(f"#{attempt.number} {_local(attempt.at, zone)} ")
    text.append(attempt.outcome, style=_STATUS_STYLE.get(attempt.outcome, ""))
    if attempt.decline_code:
        text.append(f" {attempt.decline_code}")
    if attempt.reason != "scheduled":
        text.append(f" ({attempt.reason.replace('_', ' ')})", style="dim")
    return text


@dataclass(frozen=True)
class _Event:
    at: datetime
    sequence: int
    subscription: str
    what: Text


def _events_table(timeline: Timeline, zone: ZoneInfo) -> Table:
    events: list[_Event] = []
    for sub in timeline.subscriptions:
        for change in sub.status_changes:
            events.append(_Event(change.at, change.sequence, sub.name, _status_event(change)))
        for notice in sub.notices:
            events.append(_Event(notice.at, notice.sequence, sub.name, _notice_event(notice)))
    for action in timeline.actions:
        events.append(
            _Event(action.at, action.sequence, action.subscription or "-", _action_event(action))
        )
    table = Table(title="what happened", title_justify="left")
    table.add_column("when", no_wrap=True)
    table.add_column("subscription", no_wrap=True)
    table.add_column("event")
    for event in sorted(events, key=lambda e: (e.at, e.sequence)):
        table.add_row(_local(event.at, zone), event.subscription, event.what)
    return table


def _status_event(change: StatusChange) -> Text:
    return Text.assemble("status → ", (change.status, _STATUS_STYLE.get(change.status, "")))


def _notice_event(notice: Notice) -> Text:
    about = f" ({notice.invoice})" if notice.invoice else ""
    return Text(f"notice {notice.kind}{about}", style="dim")


def _action_event(action: ActionRecord) -> Text:
    text = Text.assemble(("▶ ", "bold"), (action.action.replace("_", " "), "bold"), ": ")
    text.append(action.outcome, style=_STATUS_STYLE.get(action.outcome, ""))
    if action.detail:
        text.append(f" ({action.detail})")
    return text


def _totals_table(timeline: Timeline) -> Table:
    table = Table(title="totals", title_justify="left")
    for column in ("currency", "invoiced", "paid", "open", "uncollectible", "void"):
        table.add_column(column, justify="left" if column == "currency" else "right")
    for t in timeline.totals:
        amounts = (t.invoiced_minor, t.paid_minor, t.open_minor, t.uncollectible_minor)
        table.add_row(
            t.currency,
            *(Money(a, t.currency).format() for a in (*amounts, t.void_minor)),
        )
    return table


def _styled(status: str, reason: str | None) -> Text:
    text = Text(status, style=_STATUS_STYLE.get(status, ""))
    if reason:
        text.append(f"\n{reason.replace('_', ' ')}", style="dim")
    return text


def _local(instant: datetime | None, zone: ZoneInfo) -> str:
    return "-" if instant is None else instant.astimezone(zone).strftime("%Y-%m-%d %H:%M")


def _local_date(instant: datetime, zone: ZoneInfo) -> str:
    return instant.astimezone(zone).strftime("%Y-%m-%d")
