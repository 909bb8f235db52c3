# The `stack` fixture is imported from the charge tests, and so is redefined by every use.
# ruff: noqa: F811
"""PaymentIntents of invoices no charge of ours may confirm any more (void, written off, or
paid without a charge) are canceled: a subscription workflow cancels its invoice's intent as
it closes it, and the daily charge reconciliation cancels, and reports once, any it finds still
open at Stripe (localstripe here): an invoice a credit note paid whose workflow has ended and
never heard, one carried as below the minimum charge, one voided by code from before the
workflow canceled intents. An open invoice's intent is left alone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import stripe

from activities.ledger import LedgerActivities
from billing.charge_reconciliation import ChargeFindingKind
from billing.invoices import InvoiceStatus
from billing.settlement import ReconcileChargesInput
from billing.testing import cards
from db.engine import unit_of_work
from db.repositories import invoices as invoices_repo
from db.repositories import ledger as ledger_repo
from tests.activities.test_billing_activities import (  # noqa: F401  (the stack fixture)
    Stack,
    charge,
    open_invoice,
    seed_subscription,
    stack,
)
from tests.activities.test_one_intent_per_invoice import wire
from tests.activities.test_open_invoice_credit import credit
from tests.conftest import BOTH_BACKENDS

PRICE = 1000


@pytest.fixture(autouse=True)
def fresh_account(stack: Stack) -> None:
    stack.localstripe.flush()
    # Stripe stamps its objects with the real time; the reconciliation looks back from now.
    stack.clock.at = datetime.now(UTC)


def declined_intent(stack: Stack, seeded: object, period_index: int) -> tuple[str, str]:
    """An open invoice whose first attempt was declined: its intent waits for a new card."""
    invoice = open_invoice(stack, seeded, period_index=period_index, amount_minor=PRICE)  # type: ignore[arg-type]
    intent = charge(stack, invoice.invoice_id, 1).payment_intent_id
    assert intent is not None
    assert stack.stripe.v1.payment_intents.retrieve(intent).status == "requires_payment_method"
    return invoice.invoice_id, intent


@BOTH_BACKENDS
def test_the_daily_reconciliation_cancels_open_intents_of_closed_invoices_once(
    stack: Stack,
) -> None:
    seeded = seed_subscription(stack, card=cards.DECLINES_AFTER_ATTACH, amount_minor=PRICE)
    # 1. Paid in full by a credit note; its workflow has ended and never heard (no signal,
    #    no SettleByCredit): the intent is still open.
    credited, credited_intent = declined_intent(stack, seeded, 0)
    credit(stack, credited, PRICE)
    # 2. A credit note leaves 49 cents: carried to the balance, the invoice paid.
    small, small_intent = declined_intent(stack, seeded, 1)
    credit(stack, small, PRICE - 49)
    # 3. Voided by workflow code from before intents were canceled at close.
    voided, voided_intent = declined_intent(stack, seeded, 2)
    with unit_of_work(stack.session_factory) as session:
        invoices_repo.transition_invoice(
            session, voided, to=InvoiceStatus.VOID, at=stack.clock.now(), reason="old code"
        )
    # 4. Still open, in dunning: its workflow confirms it again later. Left alone.
    still_open, open_intent = declined_intent(stack, seeded, 3)
    for invoice_id in (credited, small, voided):
        assert stored_status(stack, invoice_id) in (InvoiceStatus.PAID, InvoiceStatus.VOID)

    acts = LedgerActivities(stack.session_factory, stack.gateway, stack.clock)
    stack.clock.at = datetime.now(UTC) + timedelta(hours=2)
    first = acts.reconcile_charges(ReconcileChargesInput(days=1, run_id="day-1"))

    closed_intents = {credited_intent, small_intent, voided_intent}
    for intent in closed_intents:
        assert stack.stripe.v1.payment_intents.retrieve(intent).status == "canceled"
    assert stack.stripe.v1.payment_intents.retrieve(open_intent).status == (
        "requires_payment_method"
    )
    assert first.new_findings.get(ChargeFindingKind.OPEN_INTENT_CANCELED.value) == 3
    with unit_of_work(stack.session_factory) as session:
        found = ledger_repo.list_findings(session)
    reported = {
        (f.payment_intent_id, f.invoice_id, f.severity)
        for f in found
        if f.kind == ChargeFindingKind.OPEN_INTENT_CANCELED.value
    }
    assert reported == {
        (credited_intent, credited, "warning"),
        (small_intent, small, "warning"),
        (voided_intent, voided, "warning"),
    }
    # Nobody can pay them now (a customer's late 3-D Secure, a stale retry): Stripe refuses.
    for intent in closed_intents:
        with pytest.raises(stripe.StripeError):
            stack.stripe.v1.payment_intents.confirm(intent)

    # The next day: read again, nothing canceled or reported twice.
    stack.http.clear()
    second = acts.reconcile_charges(ReconcileChargesInput(days=1, run_id="day-2"))
    assert ChargeFindingKind.OPEN_INTENT_CANCELED.value not in second.new_findings
    assert [m for m, p in wire(stack) if "/cancel" in p] == []
    assert stored_status(stack, still_open) == InvoiceStatus.OPEN


def stored_status(stack: Stack, invoice_id: str) -> InvoiceStatus:
    with unit_of_work(stack.session_factory) as session:
        invoice = invoices_repo.get_invoice(session, invoice_id)
    assert invoice is not None
    return invoice.status


@BOTH_BACKENDS
def test_an_intent_its_workflow_canceled_is_not_reported(stack: Stack) -> None:
    seeded = seed_subscription(stack, card=cards.DECLINES_AFTER_ATTACH, amount_minor=PRICE)
    credited, intent = declined_intent(stack, seeded, 0)
    credit(stack, credited, PRICE)
    stack.gateway.cancel_payment_intent(payment_intent_id=intent)  # as SettleByCredit does
    acts = LedgerActivities(stack.session_factory, stack.gateway, stack.clock)
    stack.clock.at = datetime.now(UTC) + timedelta(hours=2)
    result = acts.reconcile_charges(ReconcileChargesInput(days=1, run_id="day-1"))
    assert ChargeFindingKind.OPEN_INTENT_CANCELED.value not in result.new_findings
