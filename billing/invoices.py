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
from enum import StrEnum

from billing.errors import ChangeRefused


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
