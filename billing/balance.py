"""The customer's credit balance: minor units per currency, moved only by entries.

An entry's ``amount_minor`` is signed: positive grants the customer credit (a proration
credit for unused time, a credit note's credit), negative uses it (applied to an invoice).
The balance is the sum of the entries. An application of credit takes at most what the
balance holds, decided under the customer's row lock. The one way it goes below 0 is Stripe's:
an invoice owing less than the minimum charge carries that amount as a debit
(``invoice_too_small``), which the next invoice adds to what it owes (``debit_to_apply``).

Stripe keeps the same balance (``customer.balance``, negative meaning credit there); here the
sign reads the way finance says it: a positive balance is money we owe the customer in kind.
"""

from __future__ import annotations

from enum import StrEnum


class BalanceEntryKind(StrEnum):
    #: Unused time of the old price on a plan or quantity change (positive).
    PRORATION_CREDIT = "proration_credit"
    #: A negative invoice subtotal (e.g. a downgrade invoiced now) carried to the balance.
    INVOICE_CREDIT = "invoice_credit"
    #: The credit part of a credit note on a paid invoice (positive).
    CREDIT_NOTE = "credit_note"
    #: Credit used to pay (part of) an invoice at its finalization (negative).
    APPLIED_TO_INVOICE = "applied_to_invoice"
    #: Credit given back when an invoice it was applied to is voided (positive).
    RESTORED_FROM_INVOICE = "restored_from_invoice"
    #: A correction by an operator (either sign).
    ADJUSTMENT = "adjustment"
    #: An invoice's amount due below the provider's minimum charge, not charged but carried to
    #: the balance as a debit (negative) for the next invoice; Stripe's ``invoice_too_small``
    #: customer balance transaction.
    INVOICE_TOO_SMALL = "invoice_too_small"


def credit_to_apply(balance_minor: int, subtotal_minor: int) -> int:
    """How much of a balance pays an invoice whose lines total ``subtotal_minor``: all of the
    subtotal if the balance covers it, else the whole balance; nothing for a balance of 0 or
    an invoice that owes nothing. Minor units, never negative."""
    if balance_minor <= 0 or subtotal_minor <= 0:
        return 0
    return min(balance_minor, subtotal_minor)


def debit_to_apply(balance_minor: int) -> int:
    """What a debit balance (below 0: an amount too small to charge, carried) adds to the next
    invoice that bills something; 0 for a balance of 0 or more. Minor units, never negative."""
    return -balance_minor if balance_minor < 0 else 0
