# The ``stack`` fixture is imported from the activities' main test module; each test's
# ``stack`` parameter is that fixture, not a redefinition.
# ruff: noqa: F811
"""Credit notes on open invoices against the charge activity (real database, localstripe):
the pending attempt and a credit note serialize on the customer's lock; a later attempt sets
the intent's amount before it confirms it; an invoice a credit note paid is never charged and
its intent is canceled."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker
from temporalio.testing import ActivityEnvironment

from activities.billing import BillingActivities
from billing.contracts import (
    CancelInvoicePaymentInput,
    ChargeInvoiceInput,
    ChargeInvoiceResult,
    idempotency_key_for,
)
from billing.credit_notes import CreditNoteRequest
from billing.errors import ChangeRefused
from billing.invoices import InvoiceStatus
from billing.payments import ChargeOutcomeKind, TransientPaymentError
from billing.records import AttemptStatus
from billing.testing import cards
from db.engine import unit_of_work
from db.repositories import balances as balances_repo
from db.repositories import credit_notes as credit_notes_repo
from db.repositories import events as events_repo
from db.repositories import invoices as invoices_repo
from tests.activities.test_billing_activities import (
    AMOUNT_MINOR,
    PAYMENT_INTENTS,
    Stack,
    charge,
    open_invoice,
    seed_subscription,
    stack,  # noqa: F401  (a fixture, used by its name)
    stored_attempts,
    stored_invoice,
    stored_payments,
)
from tests.activities.test_one_intent_per_invoice import intent_charges, new_default_card, wire
from tests.conftest import BOTH_BACKENDS


def credit(stack: Stack, invoice_id: str, amount: int) -> credit_notes_repo.IssuedCreditNote:
    with unit_of_work(stack.session_factory) as session:
        return credit_notes_repo.issue_credit_note(
            session,
            invoice_id,
            CreditNoteRequest(amount_minor=amount),
            at=stack.clock.now(),
            allow_open_invoices=True,
        )


def charge_with(
    activities: BillingActivities, invoice_id: str, attempt_number: int
) -> ChargeInvoiceResult:
    return ActivityEnvironment().run(
        activities.charge_invoice,
        ChargeInvoiceInput(invoice_id=invoice_id, attempt_number=attempt_number),
    )


class CreditNoteWhileTheChargePrepares:
    """The activities' session factory. When the charge opens its first transaction (the one
    that reads the invoice and inserts the pending attempt), a credit note in another thread
    has just taken the customer's lock: it commits 0.3 s later, while the charge waits for
    that lock."""

    def __init__(self, inner: sessionmaker[Session], invoice_id: str, amount: int) -> None:
        self.inner = inner
        self.invoice_id = invoice_id
        self.amount = amount
        self.opened = 0
        self.thread: threading.Thread | None = None
        self.errors: list[BaseException] = []

    def __call__(self) -> Session:
        self.opened += 1
        if self.opened == 1:
            locked = threading.Event()
            self.thread = threading.Thread(target=self._credit, args=(locked,))
            self.thread.start()
            assert locked.wait(10), "the credit note never took the lock"
        return self.inner()

    def _credit(self, locked: threading.Event) -> None:
        try:
            with unit_of_work(self.inner) as session:
                invoice = invoices_repo.get_invoice(session, self.invoice_id)
                assert invoice is not None
                balances_repo.lock_customer(session, invoice.customer_id)
                locked.set()
                threading.Event().wait(0.3)
                credit_notes_repo.issue_credit_note(
                    session,
                    self.invoice_id,
                    CreditNoteRequest(amount_minor=self.amount),
                    at=invoice.created_at,
                    allow_open_invoices=True,
                )
        except BaseException as error:  # reported by the test
            locked.set()
            self.errors.append(error)


@BOTH_BACKENDS
def test_a_credit_note_that_lands_while_the_charge_prepares_is_charged_lowered(
    stack: Stack,
) -> None:
    seeded = seed_subscription(stack, card=cards.SUCCEEDS)
    invoice = open_invoice(stack, seeded)
    factory = CreditNoteWhileTheChargePrepares(stack.session_factory, invoice.invoice_id, 1000)
    activities = BillingActivities(factory, stack.gateway, stack.clock)  # type: ignore[arg-type]
    stack.http.clear()

    paid = charge_with(activities, invoice.invoice_id, 1)

    assert factory.thread is not None
    factory.thread.join(10)
    assert factory.errors == []
    # The charge waited for the lock the credit note held before it read the invoice: it
    # charged 1500, the amount due after the note, never the 2500 before it.
    assert paid.outcome == ChargeOutcomeKind.PAID and paid.amount_due_minor == 1500
    [attempt] = stored_attempts(stack, invoice.invoice_id)
    assert (attempt.amount_minor, attempt.status) == (1500, AttemptStatus.SUCCEEDED)
    assert wire(stack) == [("POST", PAYMENT_INTENTS)]
    assert paid.payment_intent_id is not None
    assert [c.amount for c in intent_charges(stack, seeded, paid.payment_intent_id)] == [1500]
    [payment] = stored_payments(stack, invoice.invoice_id)
    assert payment.amount_minor == 1500
    settled = stored_invoice(stack, invoice.invoice_id)
    assert (settled.status, settled.amount_due_minor, settled.amount_paid_minor) == (
        InvoiceStatus.PAID,
        1500,
        1500,
    )


@BOTH_BACKENDS
def test_a_credit_note_is_refused_while_the_attempt_is_in_flight(stack: Stack) -> None:
    seeded = seed_subscription(stack, card=cards.DECLINES_AFTER_ATTACH)
    invoice = open_invoice(stack, seeded)
    refused: list[BaseException] = []

    def credit_mid_charge(key: str, redriven: bool) -> None:
        # The provider has answered; our record of the attempt is still pending.
        try:
            credit(stack, invoice.invoice_id, 1000)
        except ChangeRefused as error:
            refused.append(error)

    activities = BillingActivities(
        stack.session_factory, stack.gateway, stack.clock, after_charge_hook=credit_mid_charge
    )
    declined = charge_with(activities, invoice.invoice_id, 1)

    assert declined.outcome == ChargeOutcomeKind.SOFT_DECLINE
    assert [str(e) for e in refused] == [
        f"invoice {invoice.number} has charge attempt 1 in flight (outcome unknown or waiting "
        "for authentication); issue the credit note once it is answered"
    ]
    assert stored_invoice(stack, invoice.invoice_id).amount_due_minor == AMOUNT_MINOR
    # Answered: now it is accepted.
    credit(stack, invoice.invoice_id, 1000)
    assert stored_invoice(stack, invoice.invoice_id).amount_due_minor == 1500


@BOTH_BACKENDS
def test_a_later_attempt_sets_the_intents_amount_before_confirming_it(stack: Stack) -> None:
    seeded = seed_subscription(stack, card=cards.DECLINES_AFTER_ATTACH)
    invoice = open_invoice(stack, seeded)
    first = charge(stack, invoice.invoice_id, 1)
    assert first.outcome == ChargeOutcomeKind.SOFT_DECLINE and first.payment_intent_id
    intent = first.payment_intent_id
    credit(stack, invoice.invoice_id, 1000)

    # Still declining: the retry takes the lower amount (one update, then the confirm).
    stack.http.clear()
    second = charge(stack, invoice.invoice_id, 2)
    assert second.outcome == ChargeOutcomeKind.SOFT_DECLINE
    assert wire(stack) == [
        ("POST", f"{PAYMENT_INTENTS}/{intent}"),
        ("POST", f"{PAYMENT_INTENTS}/{intent}/confirm"),
    ]
    key_2 = idempotency_key_for(invoice.invoice_id, 2)
    [update] = stack.http.bodies_with_key(f"{PAYMENT_INTENTS}/{intent}", f"{key_2}-amount")
    assert update == {"amount": ["1500"]}

    # The next attempt on the same amount sends the confirm alone.
    new_default_card(stack, seeded, cards.SUCCEEDS)
    stack.http.clear()
    third = charge(stack, invoice.invoice_id, 3, reason="payment_method_updated")
    assert third.outcome == ChargeOutcomeKind.PAID
    assert wire(stack) == [("POST", f"{PAYMENT_INTENTS}/{intent}/confirm")]

    assert [(c.amount, c.status) for c in intent_charges(stack, seeded, intent)] == [
        (AMOUNT_MINOR, "failed"),
        (1500, "failed"),
        (1500, "succeeded"),
    ]
    assert [a.amount_minor for a in stored_attempts(stack, invoice.invoice_id)] == [
        AMOUNT_MINOR,
        1500,
        1500,
    ]
    [payment] = stored_payments(stack, invoice.invoice_id)
    assert payment.amount_minor == 1500
    assert stored_invoice(stack, invoice.invoice_id).amount_paid_minor == 1500


@BOTH_BACKENDS
def test_a_re_driven_attempt_sends_its_first_requests_again_and_is_paid_once(
    stack: Stack,
) -> None:
    seeded = seed_subscription(stack, card=cards.DECLINES_AFTER_ATTACH)
    invoice = open_invoice(stack, seeded)
    first = charge(stack, invoice.invoice_id, 1)
    intent = first.payment_intent_id
    assert intent is not None
    credit(stack, invoice.invoice_id, 1000)
    new_default_card(stack, seeded, cards.SUCCEEDS)
    confirm = f"{PAYMENT_INTENTS}/{intent}/confirm"
    update = f"{PAYMENT_INTENTS}/{intent}"
    key_2 = idempotency_key_for(invoice.invoice_id, 2)

    # The confirm reaches Stripe and takes 1500; its answer is lost (a worker killed).
    stack.http.clear()
    stack.http.drop_responses(confirm, retryable=False)
    with pytest.raises(TransientPaymentError):
        charge(stack, invoice.invoice_id, 2, reason="payment_method_updated")
    [pending] = [a for a in stored_attempts(stack, invoice.invoice_id) if a.attempt_number == 2]
    assert (pending.status, pending.amount_minor) == (AttemptStatus.PENDING, 1500)

    # The re-drive repeats the update under the same key with the same body. Stripe would
    # answer it (and the confirm) from the key; localstripe ignores keys and refuses to change
    # a paid intent, so the intent is read: paid, and nothing more is sent.
    result = charge(stack, invoice.invoice_id, 2, reason="payment_method_updated")
    assert (result.outcome, result.attempt_number) == (ChargeOutcomeKind.PAID, 2)
    updates = stack.http.bodies_with_key(update, f"{key_2}-amount")
    assert updates == [{"amount": ["1500"]}] * 2
    assert [r.idempotency_key for r in stack.http.requests_to(confirm)] == [key_2]
    succeeded = [c for c in intent_charges(stack, seeded, intent) if c.status == "succeeded"]
    assert [c.amount for c in succeeded] == [1500]
    [payment] = stored_payments(stack, invoice.invoice_id)
    assert payment.amount_minor == 1500


def test_a_re_drive_of_a_declined_confirm_repeats_update_and_confirm_exactly(
    stack: Stack,
) -> None:
    seeded = seed_subscription(stack, card=cards.DECLINES_AFTER_ATTACH)
    invoice = open_invoice(stack, seeded)
    intent = charge(stack, invoice.invoice_id, 1).payment_intent_id
    assert intent is not None
    credit(stack, invoice.invoice_id, 700)
    confirm = f"{PAYMENT_INTENTS}/{intent}/confirm"
    key_2 = idempotency_key_for(invoice.invoice_id, 2)
    stack.http.drop_responses(confirm, retryable=False)
    with pytest.raises(TransientPaymentError):
        charge(stack, invoice.invoice_id, 2)
    stack.http.clear()

    result = charge(stack, invoice.invoice_id, 2)

    assert result.outcome == ChargeOutcomeKind.SOFT_DECLINE
    assert wire(stack) == [("POST", f"{PAYMENT_INTENTS}/{intent}"), ("POST", confirm)]
    first_update, second_update = stack.http.bodies_with_key(
        f"{PAYMENT_INTENTS}/{intent}", f"{key_2}-amount"
    )
    assert first_update == second_update == {"amount": ["1800"]}
    first_confirm, second_confirm = stack.http.bodies_with_key(confirm, key_2)
    assert first_confirm == second_confirm


@BOTH_BACKENDS
def test_an_invoice_a_credit_note_paid_is_never_charged_and_its_intent_is_canceled(
    stack: Stack,
) -> None:
    seeded = seed_subscription(stack, card=cards.DECLINES_AFTER_ATTACH)
    invoice = open_invoice(stack, seeded)
    intent = charge(stack, invoice.invoice_id, 1).payment_intent_id
    assert intent is not None
    issued = credit(stack, invoice.invoice_id, AMOUNT_MINOR)
    assert issued.invoice is not None and issued.invoice.status == InvoiceStatus.PAID

    # The workflow never heard (its signal was lost): its next attempt sends nothing.
    stack.http.clear()
    result = charge(stack, invoice.invoice_id, 2)
    assert (result.outcome, result.paid_by_credit, result.already_paid) == (
        ChargeOutcomeKind.PAID,
        True,
        True,
    )
    assert wire(stack) == []
    assert len(stored_attempts(stack, invoice.invoice_id)) == 1

    # Ending the collection cancels the intent: nobody can pay the old amount now.
    ended = ActivityEnvironment().run(
        stack.activities.cancel_invoice_payment,
        CancelInvoicePaymentInput(
            invoice_id=invoice.invoice_id, reason="paid_by_credit_note", only_if_paid=True
        ),
    )
    assert (ended.paid, ended.paid_by_credit, ended.canceled) == (True, True, True)
    assert stack.stripe.v1.payment_intents.retrieve(intent).status == "canceled"
    assert stored_payments(stack, invoice.invoice_id) == []
    with unit_of_work(stack.session_factory) as session:
        events = events_repo.list_events(session, limit=100)
    assert [e.type for e in events if e.object_id == invoice.invoice_id].count("invoice.paid") == 1


def test_ending_the_collection_of_an_invoice_still_owed_changes_nothing(stack: Stack) -> None:
    seeded = seed_subscription(stack, card=cards.DECLINES_AFTER_ATTACH)
    invoice = open_invoice(stack, seeded)
    intent = charge(stack, invoice.invoice_id, 1).payment_intent_id
    assert intent is not None
    credit(stack, invoice.invoice_id, 100)
    stack.http.clear()

    ended: Any = ActivityEnvironment().run(
        stack.activities.cancel_invoice_payment,
        CancelInvoicePaymentInput(
            invoice_id=invoice.invoice_id, reason="paid_by_credit_note", only_if_paid=True
        ),
    )

    assert (ended.paid, ended.canceled) == (False, False)
    assert wire(stack) == []
    assert stack.stripe.v1.payment_intents.retrieve(intent).status != "canceled"
    assert stored_invoice(stack, invoice.invoice_id).status == InvoiceStatus.OPEN
