# The ``stack`` fixture is imported from the activities' main test module; each test's
# ``stack`` parameter is that fixture, not a redefinition.
# ruff: noqa: F811
"""Stripe's minimum charge amount (billing.minimum_charge) and receipts of invoices paid by
credit, against the real activities, a real database and localstripe.

An invoice that a credit note or the credit balance leaves owing more than 0 but less than
Stripe's minimum (USD 0.50) is not charged: it is paid, the amount is carried to the customer's
balance as a debit (Stripe's ``invoice_too_small``), and the next invoice bills it. An invoice
paid entirely by credit gets its receipt like any paid invoice, exactly once."""

from __future__ import annotations

from temporalio.testing import ActivityEnvironment

from billing.balance import BalanceEntryKind
from billing.contracts import CancelInvoicePaymentInput
from billing.invoices import InvoiceStatus
from billing.minimum_charge import is_too_small_to_charge, minimum_charge_minor
from billing.notices import NoticeKind
from billing.payments import ChargeOutcomeKind
from billing.testing import cards
from db.engine import unit_of_work
from db.repositories import balances as balances_repo
from db.repositories import invoices as invoices_repo
from db.repositories import notifications as notifications_repo
from tests.activities.test_billing_activities import (
    NOW,
    Stack,
    charge,
    invoice_input,
    open_invoice,
    seed_subscription,
    stack,  # noqa: F401  (a fixture, used by its name)
    stored_attempts,
    stored_invoice,
)
from tests.activities.test_one_intent_per_invoice import wire
from tests.activities.test_open_invoice_credit import credit
from tests.conftest import BOTH_BACKENDS

PRICE = 1000  # USD 10.00


def test_the_minimum_charge_is_stripes_documented_table_in_minor_units() -> None:
    # https://docs.stripe.com/currencies#minimum-and-maximum-charge-amounts
    assert minimum_charge_minor("USD") == 50
    assert minimum_charge_minor("usd") == 50
    assert minimum_charge_minor("GBP") == 30
    assert minimum_charge_minor("JPY") == 50  # a zero-decimal currency
    assert minimum_charge_minor("HKD") == 400
    assert minimum_charge_minor("MXN") == 1000
    assert minimum_charge_minor("ISK") is None  # not in Stripe's table
    assert [is_too_small_to_charge(n, "USD") for n in (0, 1, 49, 50, 51)] == [
        False,
        True,
        True,
        False,
        False,
    ]


def receipts(stack: Stack, invoice_id: str) -> int:
    with unit_of_work(stack.session_factory) as session:
        found = notifications_repo.list_notifications(
            session, invoice_id=invoice_id, kind=NoticeKind.RECEIPT.value
        )
    return len(found)


def balance(stack: Stack, customer_id: str) -> int:
    with unit_of_work(stack.session_factory) as session:
        return balances_repo.credit_balance(session, customer_id, "USD")


def entries(stack: Stack, customer_id: str) -> list[tuple[str, int]]:
    with unit_of_work(stack.session_factory) as session:
        listed = balances_repo.list_entries(session, customer_id)
    return [(e.kind.value, e.amount_minor) for e in listed]


@BOTH_BACKENDS
def test_a_credit_note_leaving_less_than_the_minimum_is_carried_not_charged(
    stack: Stack,
) -> None:
    seeded = seed_subscription(stack, card=cards.SUCCEEDS, amount_minor=PRICE)
    invoice = open_invoice(stack, seeded, amount_minor=PRICE)

    # 49 cents left: below USD 0.50. Paid, not charged; the 49 are the customer's debit.
    issued = credit(stack, invoice.invoice_id, PRICE - 49)
    assert issued.invoice is not None
    paid = stored_invoice(stack, invoice.invoice_id)
    assert (paid.status, paid.amount_due_minor, paid.amount_paid_minor) == (
        InvoiceStatus.PAID,
        49,
        0,
    )
    assert "minimum charge" in (paid.status_reason or "")
    assert balance(stack, seeded.customer_id) == -49
    assert entries(stack, seeded.customer_id) == [(BalanceEntryKind.INVOICE_TOO_SMALL.value, -49)]
    assert receipts(stack, invoice.invoice_id) == 1

    # The workflow's attempt finds it paid and sends Stripe nothing.
    stack.http.clear()
    result = charge(stack, invoice.invoice_id, 1)
    assert (result.outcome, result.paid_by_credit) == (ChargeOutcomeKind.PAID, True)
    assert wire(stack) == []
    assert stored_attempts(stack, invoice.invoice_id) == []

    # The next invoice bills the debit with its period: nothing is lost.
    renewal = stack.activities.create_invoice(
        invoice_input(seeded, period_index=1, amount_minor=PRICE)
    )
    assert (renewal.status, renewal.amount_due_minor) == (InvoiceStatus.OPEN, PRICE + 49)
    assert balance(stack, seeded.customer_id) == 0
    # Voiding it owes the debit again (as a voided invoice gives credit back).
    with unit_of_work(stack.session_factory) as session:
        invoices_repo.transition_invoice(
            session, renewal.invoice_id, to=InvoiceStatus.VOID, at=NOW, reason="test"
        )
    assert balance(stack, seeded.customer_id) == -49


@BOTH_BACKENDS
def test_a_credit_note_leaving_exactly_the_minimum_is_charged(stack: Stack) -> None:
    seeded = seed_subscription(stack, card=cards.SUCCEEDS, amount_minor=PRICE)
    invoice = open_invoice(stack, seeded, amount_minor=PRICE)
    credit(stack, invoice.invoice_id, PRICE - 50)
    assert stored_invoice(stack, invoice.invoice_id).status == InvoiceStatus.OPEN
    result = charge(stack, invoice.invoice_id, 1)
    assert result.outcome == ChargeOutcomeKind.PAID and not result.paid_by_credit
    assert result.payment_intent_id is not None
    assert stack.stripe.v1.payment_intents.retrieve(result.payment_intent_id).amount == 50
    assert balance(stack, seeded.customer_id) == 0
    assert receipts(stack, invoice.invoice_id) == 1


@BOTH_BACKENDS
def test_a_credit_balance_leaving_less_than_the_minimum_pays_the_invoice_at_issue(
    stack: Stack,
) -> None:
    seeded = seed_subscription(stack, card=cards.SUCCEEDS, amount_minor=PRICE)
    with unit_of_work(stack.session_factory) as session:
        balances_repo.record_entry(
            session,
            customer_id=seeded.customer_id,
            currency="USD",
            amount_minor=PRICE - 20,
            kind=BalanceEntryKind.ADJUSTMENT,
            source_key="test:credit",
            description="goodwill",
            at=NOW,
        )
    stack.http.clear()
    issued = stack.activities.create_invoice(invoice_input(seeded, amount_minor=PRICE))
    assert (issued.status, issued.amount_due_minor) == (InvoiceStatus.PAID, 20)
    stored = stored_invoice(stack, issued.invoice_id)
    assert (stored.credit_applied_minor, stored.amount_paid_minor) == (PRICE - 20, 0)
    assert balance(stack, seeded.customer_id) == -20
    assert receipts(stack, issued.invoice_id) == 1
    assert wire(stack) == []
    # A retried issue of the same period changes nothing (one debit, one receipt).
    again = stack.activities.create_invoice(invoice_input(seeded, amount_minor=PRICE))
    assert (again.invoice_id, again.created) == (issued.invoice_id, False)
    assert balance(stack, seeded.customer_id) == -20
    assert receipts(stack, issued.invoice_id) == 1
    # The next period bills 20 more.
    renewal = stack.activities.create_invoice(
        invoice_input(seeded, period_index=1, amount_minor=PRICE)
    )
    assert renewal.amount_due_minor == PRICE + 20


@BOTH_BACKENDS
def test_an_invoice_paid_entirely_by_credit_gets_one_receipt(stack: Stack) -> None:
    seeded = seed_subscription(stack, card=cards.DECLINES_AFTER_ATTACH, amount_minor=PRICE)
    invoice = open_invoice(stack, seeded, amount_minor=PRICE)
    charge(stack, invoice.invoice_id, 1)  # declined: dunning
    assert receipts(stack, invoice.invoice_id) == 0
    credit(stack, invoice.invoice_id, PRICE)
    assert stored_invoice(stack, invoice.invoice_id).status == InvoiceStatus.PAID
    assert receipts(stack, invoice.invoice_id) == 1
    # The workflow ends the collection (twice: at least once) and the receipt stays one.
    for _ in range(2):
        ActivityEnvironment().run(
            stack.activities.cancel_invoice_payment,
            CancelInvoicePaymentInput(
                invoice_id=invoice.invoice_id, reason="paid_by_credit_note", only_if_paid=True
            ),
        )
    assert receipts(stack, invoice.invoice_id) == 1

    # Paid by the balance at issue: a receipt too. A free period (nothing billed): none.
    with unit_of_work(stack.session_factory) as session:
        balances_repo.record_entry(
            session,
            customer_id=seeded.customer_id,
            currency="USD",
            amount_minor=PRICE,
            kind=BalanceEntryKind.ADJUSTMENT,
            source_key="test:credit",
            description="goodwill",
            at=NOW,
        )
    by_balance = stack.activities.create_invoice(
        invoice_input(seeded, period_index=1, amount_minor=PRICE)
    )
    assert (by_balance.status, by_balance.amount_due_minor) == (InvoiceStatus.PAID, 0)
    assert receipts(stack, by_balance.invoice_id) == 1
    free = stack.activities.create_invoice(invoice_input(seeded, period_index=2, amount_minor=0))
    assert free.status == InvoiceStatus.PAID
    assert receipts(stack, free.invoice_id) == 0
