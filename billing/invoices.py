"""Invoice lifecycle and numbering (Stripe's model).

draft -> open -> paid | void | uncollectible; uncollectible -> paid | void; void -> paid.

A closed invoice can still become paid: money the provider took for it (the customer
authenticated a payment just before the invoice was closed, a charge whose answer was lost)
is recorded, never ignored. Stripe Billing lets a payment settle an uncollectible invoice;
a void one cannot be paid there, but money taken must still be booked, so here a void invoice
moves to paid too, and its ``status_reason`` says what happened.
Numbers are ``PREFIX-NNNN``: a per-customer prefix and a per-customer sequence, so a customer
sees invoice 0001, 0002, ... with no gaps caused by other customers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Protocol

from billing.balance import credit_to_apply, debit_to_apply
from billing.errors import ChangeRefused
from billing.minimum_charge import is_too_small_to_charge


class InvoiceLineKind(StrEnum):
    """What a line bills. Amounts are signed minor units: a proration credit is negative."""

    #: The plan's price for the invoice's period (unit amount x quantity).
    SUBSCRIPTION = "subscription"
    #: A proration: unused time of the old price (negative) or remaining time of the new one.
    PRORATION = "proration"
    #: Pre-payment credit notes of a voided invoice whose lines this one bills again (a plan
    #: change during dunning): negative, see ``credit_notes_carried_over``.
    CREDIT_NOTE = "credit_note"


@dataclass(frozen=True, slots=True, kw_only=True)
class InvoiceLine:
    """A line to put on an invoice being issued (minor units, signed; instants UTC)."""

    kind: InvoiceLineKind
    description: str
    amount_minor: int
    period_start: datetime
    period_end: datetime
    plan_code: str | None = None
    quantity: int = 1
    unit_amount_minor: int | None = None
    #: The plan change that produced a proration line.
    change_id: str | None = None


class _BilledLine(Protocol):
    """What a stored line (``InvoiceLineRecord``) and a draft (``InvoiceLine``) share."""

    @property
    def kind(self) -> str: ...
    @property
    def description(self) -> str: ...
    @property
    def amount_minor(self) -> int: ...
    @property
    def plan_code(self) -> str | None: ...
    @property
    def quantity(self) -> int: ...
    @property
    def unit_amount_minor(self) -> int | None: ...
    @property
    def change_id(self) -> str | None: ...


def _terms(line: _BilledLine) -> tuple[object, ...]:
    return (
        str(line.kind),
        line.description,
        line.amount_minor,
        line.plan_code,
        line.quantity,
        line.unit_amount_minor,
        line.change_id,
    )


def bills_the_same(stored: Sequence[_BilledLine], drafts: Sequence[_BilledLine]) -> bool:
    """Whether an invoice already issued with ``stored`` lines is the invoice these ``drafts``
    describe: the same lines in the same order, for the same amounts, plans, seats and changes.
    A renewal written by a workflow task that was then discarded, when the task that replaced
    it decided other terms (a plan change or seats applied first), does not: it is voided as
    superseded rather than billed at the amount first written (``create_invoice``).

    Instants are not compared: a re-run computed under other zone rules (a worker with newer
    tzdata) may ask for another period end, and the period is the one the invoice stores
    (README, "Replay safety")."""
    return len(stored) == len(drafts) and all(
        _terms(a) == _terms(b) for a, b in zip(stored, drafts, strict=True)
    )


def invoice_totals(line_amounts_minor: list[int], balance_minor: int) -> tuple[int, int, int]:
    """``(subtotal, credit_applied, amount_due)`` in minor units for lines totalling their sum,
    paid first from a credit balance of ``balance_minor``. A negative subtotal owes nothing
    (its credit goes to the balance, see ``billing.balance``). A negative balance (a debit,
    ``debit_to_apply``) is added by ``invoice_totals_with_debit``."""
    subtotal = sum(line_amounts_minor)
    applied = credit_to_apply(balance_minor, subtotal)
    return subtotal, applied, max(subtotal - applied, 0)


@dataclass(frozen=True, slots=True)
class InvoiceTotals:
    """An invoice's totals at finalization (minor units)."""

    subtotal_minor: int
    #: Credit of the customer's balance used (never negative).
    credit_applied_minor: int
    #: A debit of the customer's balance (an earlier amount too small to charge) added.
    debit_applied_minor: int
    amount_due_minor: int
    #: The amount due is more than 0 but below the provider's minimum charge: not charged, it
    #: is carried to the balance as a debit and the invoice is paid (``billing.minimum_charge``).
    too_small_to_charge: bool


def invoice_totals_with_debit(
    line_amounts_minor: list[int], balance_minor: int, currency: str
) -> InvoiceTotals:
    """``invoice_totals``, plus Stripe's rules for a debit balance and for an amount below the
    minimum charge: a debit is added to an invoice that bills something (subtotal above 0); an
    amount due below Stripe's minimum in ``currency`` is too small to charge."""
    subtotal, applied, due = invoice_totals(line_amounts_minor, balance_minor)
    debit = debit_to_apply(balance_minor) if subtotal > 0 else 0
    due += debit
    return InvoiceTotals(
        subtotal_minor=subtotal,
        credit_applied_minor=applied,
        debit_applied_minor=debit,
        amount_due_minor=due,
        too_small_to_charge=is_too_small_to_charge(due, currency),
    )


def credit_notes_carried_over(credited_minor: int, rebilled_subtotal_minor: int) -> int:
    """How much of the pre-payment credit notes on an unpaid invoice (``credited_minor``: the
    amount due they took off it) goes onto the invoice that replaces it, when a plan change
    voids it and bills its lines again with the change's lines (``rebilled_subtotal_minor``:
    their sum). All of it, so the customer is never charged for what was credited; but never
    more than that subtotal, so an invoice nobody paid never turns into balance credit (the
    period's money was never received: a credit note on it only lowers what is owed).
    Minor units, both >= 0 in, result >= 0."""
    if credited_minor < 0:
        raise ValueError(f"credited_minor must be >= 0; got {credited_minor}")
    return min(credited_minor, max(0, rebilled_subtotal_minor))


class InvoiceStatus(StrEnum):
    DRAFT = "draft"
    OPEN = "open"
    PAID = "paid"
    VOID = "void"
    UNCOLLECTIBLE = "uncollectible"


_TRANSITIONS: dict[InvoiceStatus, frozenset[InvoiceStatus]] = {
    InvoiceStatus.DRAFT: frozenset({InvoiceStatus.OPEN, InvoiceStatus.VOID}),
    InvoiceStatus.OPEN: frozenset(
        {InvoiceStatus.PAID, InvoiceStatus.VOID, InvoiceStatus.UNCOLLECTIBLE}
    ),
    InvoiceStatus.UNCOLLECTIBLE: frozenset({InvoiceStatus.PAID, InvoiceStatus.VOID}),
    InvoiceStatus.PAID: frozenset(),
    # Only by recording a payment the provider took (see the module docstring).
    InvoiceStatus.VOID: frozenset({InvoiceStatus.PAID}),
}


def can_transition(current: InvoiceStatus, target: InvoiceStatus) -> bool:
    return target == current or target in _TRANSITIONS[current]


def check_transition(invoice_id: str, current: InvoiceStatus, target: InvoiceStatus) -> None:
    """Raise ChangeRefused for a transition the lifecycle forbids (e.g. voiding a paid invoice)."""
    if not can_transition(current, target):
        raise ChangeRefused(
            f"invoice {invoice_id} is {current.value} and cannot become {target.value}"
        )


_PREFIX_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no I/O/0/1: read aloud without confusion


def invoice_prefix_for(customer_id: str) -> str:
    """A stable 8-character prefix derived from the customer id."""
    digest = hashlib.sha256(customer_id.encode()).digest()
    return "".join(_PREFIX_ALPHABET[b % len(_PREFIX_ALPHABET)] for b in digest[:8])


def format_invoice_number(prefix: str, sequence: int) -> str:
    """``ABCD2345-0007``: prefix plus the customer's 1-based invoice sequence."""
    if sequence < 1:
        raise ValueError(f"invoice sequence starts at 1; got {sequence}")
    return f"{prefix}-{sequence:04d}"
