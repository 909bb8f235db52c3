"""Proration: what a plan or quantity change inside a billed period is worth, to the second.

The rules (Stripe's model):

* **Time.** The period ``[start, end)`` is measured in whole seconds, and so is the time left
  at the change (the change instant is taken to the second, floored). The unused share of the
  period is ``remaining_s / period_s``.
* **Two lines.** A change produces one credit line for the unused time of the old terms
  (negative) and one charge line for the same time at the new terms (positive). The terms are
  ``unit amount x quantity`` of the plan.
* **Rounding.** Each line is rounded once, here in ``round_half_even_minor``, half to even, to
  a whole minor unit of the currency (a yen for JPY, a cent for USD, a fils for KWD): amounts
  are integer minor units, so the minor unit is the rounding step whatever the exponent.
* **Credits never exceed what was paid.** The credit is capped at ``credit_cap_minor``: what
  was billed for the old terms in this period and not credited since (the renewal's
  subscription line, or the charge line of the previous change). Rounding is monotone, so the
  cap only binds when less was billed than the time-weighted price.
* **An interval change** (monthly to annual) starts a new period at the change, with a new
  anchor: the credit for the unused old time, and a charge for the whole new period
  ``[at, new_period_end)``.

Pure: no clock, no database; the workflow, the preview endpoint and the tests call the same
function with the same inputs and get the same lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from fractions import Fraction

from billing.errors import InvalidInput


@dataclass
class ProrationLine:
    """A proration line to bill (minor units, signed: a credit is negative; instants UTC).
    Travels in workflow payloads: plain fields only, new ones with defaults."""

    description: str
    amount_minor: int
    period_start: datetime
    period_end: datetime
    plan_code: str
    quantity: int
    #: Price of one seat for a whole period of the terms it bills.
    unit_amount_minor: int
    #: The change that produced it.
    change_id: str


@dataclass(frozen=True)
class Terms:
    """What a subscription is billed per period: ``unit_amount_minor x quantity``."""

    plan_code: str
    plan_name: str
    unit_amount_minor: int
    quantity: int
    currency: str

    @property
    def total_minor(self) -> int:
        return self.unit_amount_minor * self.quantity


@dataclass(frozen=True)
class Proration:
    """The lines of one change (zero-amount lines are left out) and their parts."""

    lines: list[ProrationLine]
    #: The credit for the unused old time (>= 0; the line is its negative).
    credit_minor: int
    #: The charge for the new terms (>= 0).
    charge_minor: int
    #: Seconds of the period left at the change, and the period's length in seconds.
    remaining_s: int
    period_s: int


def round_half_even_minor(amount: Fraction) -> int:
    """THE rounding of proration: to a whole minor unit, half to even (banker's rounding), so
    that halves do not drift one way over many changes. ``round`` on a Fraction is exact."""
    return round(amount)


def whole_seconds(start: datetime, end: datetime) -> int:
    """Whole seconds from ``start`` to ``end`` (each floored to its second first)."""
    return int((end.replace(microsecond=0) - start.replace(microsecond=0)).total_seconds())


def prorated_minor(total_minor: int, remaining_s: int, period_s: int) -> int:
    """``total_minor x remaining_s / period_s``, rounded once (half even)."""
    return round_half_even_minor(Fraction(total_minor * remaining_s, period_s))


def prorate(
    *,
    old: Terms,
    new: Terms,
    period_start: datetime,
    period_end: datetime,
    at: datetime,
    credit_cap_minor: int,
    change_id: str,
    new_period_end: datetime | None = None,
) -> Proration:
    """The lines of changing ``old`` to ``new`` at ``at`` inside the billed period
    ``[period_start, period_end)`` (UTC).

    ``credit_cap_minor``: what was billed for ``old`` in this period and not credited yet.
    ``new_period_end``: set for an interval change, which starts a new period ``[at,
    new_period_end)`` billed in full at the new terms.
    """
    if old.currency != new.currency:
        raise InvalidInput(
            f"a subscription's currency cannot change ({old.currency} to {new.currency}); "
            "cancel and sign up again in the new currency",
            field="plan",
        )
    if not period_start <= at < period_end:
        raise InvalidInput(
            f"the change at {at.isoformat()} is outside the billed period "
            f"[{period_start.isoformat()}, {period_end.isoformat()})"
        )
    if credit_cap_minor < 0:
        raise InvalidInput(f"credit cap must be >= 0; got {credit_cap_minor}")
    at_s = at.replace(microsecond=0)
    period_s = whole_seconds(period_start, period_end)
    remaining_s = min(whole_seconds(at_s, period_end), period_s)
    credit = min(prorated_minor(old.total_minor, remaining_s, period_s), credit_cap_minor)
    lines: list[ProrationLine] = []
    if credit > 0:
        lines.append(
            ProrationLine(
                description=f"Unused time on {_seats(old)}{old.plan_name}",
                amount_minor=-credit,
                period_start=at_s,
                period_end=period_end,
                plan_code=old.plan_code,
                quantity=old.quantity,
                unit_amount_minor=old.unit_amount_minor,
                change_id=change_id,
            )
        )
    if new_period_end is not None:
        charge = new.total_minor
        charge_end = new_period_end
        description = f"{_seats(new)}{new.plan_name}"
    else:
        charge = prorated_minor(new.total_minor, remaining_s, period_s)
        charge_end = period_end
        description = f"Remaining time on {_seats(new)}{new.plan_name}"
    if charge > 0:
        lines.append(
            ProrationLine(
                description=description,
                amount_minor=charge,
                period_start=at_s,
                period_end=charge_end,
                plan_code=new.plan_code,
                quantity=new.quantity,
                unit_amount_minor=new.unit_amount_minor,
                change_id=change_id,
            )
        )
    return Proration(
        lines=lines,
        credit_minor=credit,
        charge_minor=charge,
        remaining_s=remaining_s,
        period_s=period_s,
    )


def _seats(terms: Terms) -> str:
    return f"{terms.quantity} x " if terms.quantity != 1 else ""


__all__ = [
    "Proration",
    "ProrationLine",
    "Terms",
    "prorate",
    "prorated_minor",
    "round_half_even_minor",
    "whole_seconds",
]
