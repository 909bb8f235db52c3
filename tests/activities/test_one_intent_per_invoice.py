# The ``stack`` fixture is imported from the activities' main test module; each test's
# ``stack`` parameter is that fixture, not a redefinition.
# ruff: noqa: F811
"""One PaymentIntent per invoice (Stripe Billing's model), through the billing activities on a
real database and localstripe (patched in its own process to confirm and cancel as Stripe
documents, ``billing.testing.localstripe_conformance``).

Finding 2 of issue 11: each attempt used to create a new PaymentIntent and none was ever
canceled, so an attempt that needed authentication stayed payable. A customer who
authenticated it and also set a new card was charged twice; one who authenticated after the
invoice was closed paid an invoice we had given up on.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from temporalio.testing import ActivityEnvironment

from billing.contracts import (
    CancelInvoicePaymentInput,
    CancelInvoicePaymentResult,
    CloseInvoiceInput,
    ConfirmAuthenticatedPaymentInput,
    RecordInvoicePaymentInput,
    idempotency_key_for,
)
from billing.invoices import InvoiceStatus
from billing.payments import ChargeOutcomeKind, TransientPaymentError
from billing.records import AttemptStatus
from billing.testing import cards
from db.engine import unit_of_work
from db.repositories import customers as customers_repo
from tests.activities.test_billing_activities import (
    AMOUNT_MINOR,
    LOCALSTRIPE_API_KEY,
    PAYMENT_INTENTS,
    Seeded,
    Stack,
    charge,
    open_invoice,
    provider_intents,
    seed_subscription,
    settle,
    stack,  # noqa: F401  (a fixture, used by its name)
    stored_attempts,
    stored_invoice,
    stored_payments,
)
from tests.conftest import BOTH_BACKENDS


def new_default_card(stack: Stack, seeded: Seeded, number: str) -> str:
    """The customer sets a new card: attached at the provider and made the default there and
    in our records (what the attach activity does)."""
    assert seeded.stripe_customer_id is not None
    pm = stack.gateway.attach_payment_method(
        provider_customer_id=seeded.stripe_customer_id,
        payment_method_id=cards.create_card_payment_method(stack.stripe, number),
    ).payment_method_id
    with unit_of_work(stack.session_factory) as session:
        customers_repo.set_default_payment_method(session, seeded.customer_id, pm)
    return pm


def intent_charges(stack: Stack, seeded: Seeded, payment_intent_id: str) -> list[Any]:
    """Every charge localstripe made for the intent, oldest first."""
    page = stack.stripe.v1.charges.list(
        params={"customer": seeded.stripe_customer_id or "", "limit": 100}
    )
    charges = [c for c in page.data if c.payment_intent == payment_intent_id]
    return sorted(charges, key=lambda c: c.created)


def authenticate(stack: Stack, payment_intent_id: str) -> httpx.Response:
    """The customer completes the 3-D Secure of the intent's ``next_action`` (localstripe's
    stand-in for Stripe.js), with the client secret they were given."""
    intent = stack.stripe.v1.payment_intents.retrieve(payment_intent_id)
    return httpx.post(
        f"{stack.localstripe.url}/v1/payment_intents/{payment_intent_id}/_authenticate",
        data={"client_secret": intent.client_secret or "", "success": "true"},
        headers={"Authorization": f"Bearer {LOCALSTRIPE_API_KEY}"},
        timeout=10,
    )


def cancel_payment(stack: Stack, invoice_id: str) -> CancelInvoicePaymentResult:
    return ActivityEnvironment().run(
        stack.activities.cancel_invoice_payment,
        CancelInvoicePaymentInput(invoice_id=invoice_id, reason="subscription_canceled"),
    )


def succeeded_charges(stack: Stack, seeded: Seeded, payment_intent_id: str) -> list[Any]:
    return [c for c in intent_charges(stack, seeded, payment_intent_id) if c.status == "succeeded"]


# -- every attempt confirms the invoice's one intent --------------------------------------------


@BOTH_BACKENDS
def test_a_failed_attempt_and_its_retry_confirm_the_same_payment_intent(stack: Stack) -> None:
    seeded = seed_subscription(stack, card=cards.DECLINES_AFTER_ATTACH)
    invoice = open_invoice(stack, seeded)

    first = charge(stack, invoice.invoice_id, 1)
    assert first.outcome == ChargeOutcomeKind.SOFT_DECLINE
    new_card = new_default_card(stack, seeded, cards.SUCCEEDS)
    second = charge(stack, invoice.invoice_id, 2, reason="payment_method_updated")
    assert second.outcome == ChargeOutcomeKind.PAID
    settle(stack, invoice.invoice_id, second)

    [intent] = provider_intents(stack, invoice.invoice_id)
    assert first.payment_intent_id == second.payment_intent_id == intent.id
    assert intent.status == "succeeded"
    assert [c.status for c in intent_charges(stack, seeded, intent.id)] == ["failed", "succeeded"]
    assert stored_invoice(stack, invoice.invoice_id).stripe_payment_intent_id == intent.id
    assert [a.stripe_payment_intent_id for a in stored_attempts(stack, invoice.invoice_id)] == [
        intent.id,
        intent.id,
    ]
    # On the wire: the first attempt creates the intent under key -attempt-1, the second
    # confirms it under -attempt-2 with the new card, off-session.
    key_1 = idempotency_key_for(invoice.invoice_id, 1)
    key_2 = idempotency_key_for(invoice.invoice_id, 2)
    assert key_1.endswith("-attempt-1") and key_2.endswith("-attempt-2")
    assert [r.idempotency_key for r in stack.http.requests_to(PAYMENT_INTENTS)] == [key_1]
    confirm_path = f"{PAYMENT_INTENTS}/{intent.id}/confirm"
    assert [r.idempotency_key for r in stack.http.requests_to(confirm_path)] == [key_2]
    [confirm_body] = stack.http.bodies_with_key(confirm_path, key_2)
    assert confirm_body == {
        "payment_method": [new_card],
        "off_session": ["true"],
        "expand[0]": ["latest_charge.balance_transaction"],
    }
    assert len(stored_payments(stack, invoice.invoice_id)) == 1


def wire(stack: Stack) -> list[tuple[str, str]]:
    """What localstripe received since the recorder was last cleared: (method, path)."""
    return [(r.method, r.path) for r in stack.http.recorded]


@BOTH_BACKENDS
def test_every_attempt_of_a_paid_cycle_is_one_stripe_request(stack: Stack) -> None:
    """The first attempt (declined), its retry on a new card (paid and settled) and a repeat of
    the paid attempt: one create-and-confirm, one confirm, nothing. No read of the customer's
    card (ours is on record), no read of the charge or its balance transaction (expanded in the
    answer), and the invoice settled with the fee and net the balance transaction holds."""
    seeded = seed_subscription(stack, card=cards.DECLINES_AFTER_ATTACH)
    invoice = open_invoice(stack, seeded)
    stack.http.clear()

    first = charge(stack, invoice.invoice_id, 1)
    assert first.outcome == ChargeOutcomeKind.SOFT_DECLINE
    assert wire(stack) == [("POST", PAYMENT_INTENTS)]

    new_card = new_default_card(stack, seeded, cards.SUCCEEDS)
    stack.http.clear()
    second = charge(stack, invoice.invoice_id, 2, reason="payment_method_updated")
    assert second.outcome == ChargeOutcomeKind.PAID and second.payment_id is not None
    assert wire(stack) == [("POST", f"{PAYMENT_INTENTS}/{first.payment_intent_id}/confirm")]
    [body] = stack.http.bodies_with_key(
        f"{PAYMENT_INTENTS}/{first.payment_intent_id}/confirm",
        idempotency_key_for(invoice.invoice_id, 2),
    )
    assert body["payment_method"] == [new_card]

    stack.http.clear()
    again = charge(stack, invoice.invoice_id, 2, reason="payment_method_updated")
    assert (again.outcome, again.payment_id) == (ChargeOutcomeKind.PAID, second.payment_id)
    assert wire(stack) == []

    [payment] = stored_payments(stack, invoice.invoice_id)
    assert payment.balance_transaction_id is not None
    txn = stack.stripe.v1.balance_transactions.retrieve(payment.balance_transaction_id)
    assert (payment.amount_minor, payment.fee_minor, payment.net_minor) == (
        AMOUNT_MINOR,
        txn.fee,
        txn.net,
    )
    assert txn.source == payment.stripe_charge_id
    assert stored_invoice(stack, invoice.invoice_id).status == InvoiceStatus.PAID


def test_a_paid_first_attempt_is_one_stripe_request(stack: Stack) -> None:
    seeded = seed_subscription(stack, card=cards.SUCCEEDS)
    invoice = open_invoice(stack, seeded)
    stack.http.clear()

    paid = charge(stack, invoice.invoice_id, 1)

    assert paid.outcome == ChargeOutcomeKind.PAID and paid.payment_id is not None
    assert wire(stack) == [("POST", PAYMENT_INTENTS)]
    [payment] = stored_payments(stack, invoice.invoice_id)
    assert payment.stripe_payment_intent_id == paid.payment_intent_id
    assert payment.balance_transaction_id is not None


def test_the_card_charged_is_the_one_on_record(stack: Stack) -> None:
    """The charge takes the customer's default card from our records (kept current by the
    card changes we make and the webhooks for the others), not from a read at Stripe: a card
    made the default at Stripe behind our back is not charged until its news is recorded."""
    seeded = seed_subscription(stack, card=cards.SUCCEEDS)
    assert seeded.stripe_customer_id is not None
    behind_our_back = cards.create_card_payment_method(stack.stripe, cards.SUCCEEDS)
    stack.stripe.v1.payment_methods.attach(
        behind_our_back, params={"customer": seeded.stripe_customer_id}
    )
    stack.stripe.v1.customers.update(
        seeded.stripe_customer_id,
        params={"invoice_settings": {"default_payment_method": behind_our_back}},
    )
    invoice = open_invoice(stack, seeded)
    stack.http.clear()

    charge(stack, invoice.invoice_id, 1)

    [body] = stack.http.bodies_with_key(PAYMENT_INTENTS, idempotency_key_for(invoice.invoice_id, 1))
    assert body["payment_method"] == [seeded.payment_method_id]
    [attempt] = stored_attempts(stack, invoice.invoice_id)
    assert attempt.payment_method_id == seeded.payment_method_id


def test_a_re_driven_confirm_sends_the_same_request_under_the_same_key(stack: Stack) -> None:
    """The confirm's answer is lost: the retried activity sends exactly the same confirm."""
    seeded = seed_subscription(stack, card=cards.DECLINES_AFTER_ATTACH)
    invoice = open_invoice(stack, seeded)
    first = charge(stack, invoice.invoice_id, 1)
    assert first.payment_intent_id is not None
    new_default_card(stack, seeded, cards.SUCCEEDS)
    confirm_path = f"{PAYMENT_INTENTS}/{first.payment_intent_id}/confirm"
    stack.http.drop_responses(confirm_path, retryable=False)

    with pytest.raises(TransientPaymentError):
        charge(stack, invoice.invoice_id, 2)
    [_, pending] = stored_attempts(stack, invoice.invoice_id)
    assert pending.status == AttemptStatus.PENDING
    assert pending.stripe_payment_intent_id == first.payment_intent_id
    # Meanwhile the customer changes the default card once more: the re-drive still sends
    # the recorded card, since the provider refuses a reused key with other parameters.
    new_default_card(stack, seeded, cards.SUCCEEDS)
    again = charge(stack, invoice.invoice_id, 2)

    assert again.outcome == ChargeOutcomeKind.PAID
    key_2 = idempotency_key_for(invoice.invoice_id, 2)
    bodies = stack.http.bodies_with_key(confirm_path, key_2)
    assert len(bodies) == 2 and bodies[0] == bodies[1]
    assert len(succeeded_charges(stack, seeded, first.payment_intent_id)) == 1


# -- finding 2: the old authentication can no longer be paid ------------------------------------


@BOTH_BACKENDS
def test_authenticating_the_old_attempt_after_a_new_card_paid_charges_nothing_more(
    stack: Stack,
) -> None:
    seeded = seed_subscription(stack, card=cards.REQUIRES_AUTHENTICATION)
    invoice = open_invoice(stack, seeded)
    first = charge(stack, invoice.invoice_id, 1)
    assert first.outcome == ChargeOutcomeKind.AUTHENTICATION_REQUIRED
    assert first.payment_intent_id is not None
    # The customer is emailed the authentication link, but sets a new card instead.
    new_default_card(stack, seeded, cards.SUCCEEDS)
    second = charge(stack, invoice.invoice_id, 2, reason="payment_method_updated")
    assert second.outcome == ChargeOutcomeKind.PAID
    settle(stack, invoice.invoice_id, second)

    # ... and then follows the old link after all.
    late = authenticate(stack, first.payment_intent_id)

    assert late.status_code == 400, late.text  # nothing left to authenticate
    assert second.payment_intent_id == first.payment_intent_id
    assert len(provider_intents(stack, invoice.invoice_id)) == 1
    assert len(succeeded_charges(stack, seeded, first.payment_intent_id)) == 1
    assert len(stored_payments(stack, invoice.invoice_id)) == 1
    assert stored_invoice(stack, invoice.invoice_id).status == InvoiceStatus.PAID


@BOTH_BACKENDS
def test_a_new_card_after_the_customer_authenticated_charges_nothing_more(stack: Stack) -> None:
    """The other order: Stripe sends payment_intent.succeeded and customer.updated in either
    order, so the new-card retry can run after the authentication succeeded."""
    seeded = seed_subscription(stack, card=cards.REQUIRES_AUTHENTICATION)
    invoice = open_invoice(stack, seeded)
    first = charge(stack, invoice.invoice_id, 1)
    assert first.payment_intent_id is not None
    assert authenticate(stack, first.payment_intent_id).status_code == 200
    new_default_card(stack, seeded, cards.SUCCEEDS)

    second = charge(stack, invoice.invoice_id, 2, reason="payment_method_updated")

    # The confirm is refused (the intent already succeeded) and its state is the answer.
    assert second.outcome == ChargeOutcomeKind.PAID
    assert second.payment_intent_id == first.payment_intent_id
    settle(stack, invoice.invoice_id, second)
    assert len(succeeded_charges(stack, seeded, first.payment_intent_id)) == 1
    assert len(provider_intents(stack, invoice.invoice_id)) == 1
    [payment] = stored_payments(stack, invoice.invoice_id)
    assert payment.stripe_payment_intent_id == first.payment_intent_id
    # The workflow's confirm of the authentication (the webhook's signal) agrees, once.
    confirmed = stack.activities.confirm_authenticated_payment(
        ConfirmAuthenticatedPaymentInput(invoice.invoice_id, first.payment_intent_id)
    )
    assert confirmed.succeeded and confirmed.attempt_number == 2


def test_an_authentication_is_recorded_on_the_latest_attempt_waiting_for_it(stack: Stack) -> None:
    """Two attempts share the intent and both needed authentication: the success belongs to
    the latest, whose next_action the customer completed."""
    seeded = seed_subscription(stack, card=cards.REQUIRES_AUTHENTICATION)
    invoice = open_invoice(stack, seeded)
    first = charge(stack, invoice.invoice_id, 1)
    new_default_card(stack, seeded, cards.REQUIRES_AUTHENTICATION)
    second = charge(stack, invoice.invoice_id, 2, reason="payment_method_updated")
    assert first.outcome == second.outcome == ChargeOutcomeKind.AUTHENTICATION_REQUIRED
    assert second.payment_intent_id == first.payment_intent_id is not None
    assert authenticate(stack, first.payment_intent_id).status_code == 200

    for _ in range(2):  # a re-run answers the same
        confirmed = stack.activities.confirm_authenticated_payment(
            ConfirmAuthenticatedPaymentInput(invoice.invoice_id, first.payment_intent_id)
        )
        assert (confirmed.succeeded, confirmed.attempt_number) == (True, 2)
    assert [a.status for a in stored_attempts(stack, invoice.invoice_id)] == [
        AttemptStatus.REQUIRES_ACTION,
        AttemptStatus.SUCCEEDED,
    ]


# -- cancel_invoice_payment ---------------------------------------------------------------------


@BOTH_BACKENDS
def test_canceling_an_intent_that_waits_for_authentication_leaves_nothing_to_pay(
    stack: Stack,
) -> None:
    seeded = seed_subscription(stack, card=cards.REQUIRES_AUTHENTICATION)
    invoice = open_invoice(stack, seeded)
    first = charge(stack, invoice.invoice_id, 1)
    assert first.payment_intent_id is not None

    results = [cancel_payment(stack, invoice.invoice_id) for _ in range(2)]

    assert results[0] == results[1]
    assert results[0] == CancelInvoicePaymentResult(
        paid=False, payment_intent_id=first.payment_intent_id, canceled=True
    )
    intent = stack.stripe.v1.payment_intents.retrieve(first.payment_intent_id)
    assert (intent.status, intent.cancellation_reason) == ("canceled", "abandoned")
    # The customer follows the old link: refused, nothing charged.
    assert authenticate(stack, first.payment_intent_id).status_code == 400
    assert intent_charges(stack, seeded, first.payment_intent_id) == []
    closed = stack.activities.close_invoice(
        CloseInvoiceInput(invoice.invoice_id, InvoiceStatus.VOID, reason="subscription_canceled")
    )
    assert closed.status == InvoiceStatus.VOID


@BOTH_BACKENDS
@pytest.mark.parametrize("lost", ["create", "confirm"])
def test_an_intent_that_succeeded_behind_our_back_is_recorded_paid_not_canceled(
    stack: Stack, lost: str
) -> None:
    """A pending attempt whose answer was lost (the charge activity gave up), then the
    invoice is to be closed: the provider says it was paid, so it is recorded, not voided."""
    seeded = seed_subscription(
        stack, card=cards.SUCCEEDS if lost == "create" else cards.DECLINES_AFTER_ATTACH
    )
    invoice = open_invoice(stack, seeded)
    attempt_number = 1
    if lost == "create":
        stack.http.drop_responses(PAYMENT_INTENTS, retryable=False)
    else:
        first = charge(stack, invoice.invoice_id, 1)
        new_default_card(stack, seeded, cards.SUCCEEDS)
        stack.http.drop_responses(
            f"{PAYMENT_INTENTS}/{first.payment_intent_id}/confirm", retryable=False
        )
        attempt_number = 2
    with pytest.raises(TransientPaymentError):
        charge(stack, invoice.invoice_id, attempt_number)
    assert stored_attempts(stack, invoice.invoice_id)[-1].status == AttemptStatus.PENDING

    results = [cancel_payment(stack, invoice.invoice_id) for _ in range(2)]

    [intent] = provider_intents(stack, invoice.invoice_id)
    assert results[0] == results[1]
    assert results[0].paid and not results[0].canceled
    assert (results[0].payment_intent_id, results[0].attempt_number) == (intent.id, attempt_number)
    [payment] = stored_payments(stack, invoice.invoice_id)
    assert payment.id == results[0].payment_id
    assert (payment.stripe_payment_intent_id, payment.amount_minor) == (intent.id, AMOUNT_MINOR)
    assert payment.fee_minor is not None and payment.net_minor is not None
    stored = stored_invoice(stack, invoice.invoice_id)
    assert (stored.status, stored.stripe_payment_intent_id) == (InvoiceStatus.PAID, intent.id)
    assert stored_attempts(stack, invoice.invoice_id)[-1].status == AttemptStatus.SUCCEEDED
    assert intent.status == "succeeded"
    # The caller then tries to close it: refused, the money is kept on the books.
    closed = stack.activities.close_invoice(
        CloseInvoiceInput(invoice.invoice_id, InvoiceStatus.VOID, reason="subscription_canceled")
    )
    assert closed.was_paid and closed.status == InvoiceStatus.PAID


def test_cancel_killed_between_recording_the_attempt_and_the_payment_settles_on_re_run(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Temporal runs it again after a crash between its two writes: one payment results."""
    seeded = seed_subscription(stack, card=cards.REQUIRES_AUTHENTICATION)
    invoice = open_invoice(stack, seeded)
    first = charge(stack, invoice.invoice_id, 1)
    assert first.payment_intent_id is not None
    assert authenticate(stack, first.payment_intent_id).status_code == 200
    real_details = stack.gateway.settlement_details

    def crash(**kwargs: Any) -> Any:
        raise TransientPaymentError("worker killed before the settlement was written")

    monkeypatch.setattr(stack.gateway, "settlement_details", crash)
    with pytest.raises(TransientPaymentError):
        cancel_payment(stack, invoice.invoice_id)
    assert stored_attempts(stack, invoice.invoice_id)[0].status == AttemptStatus.SUCCEEDED
    assert stored_payments(stack, invoice.invoice_id) == []
    monkeypatch.setattr(stack.gateway, "settlement_details", real_details)

    result = cancel_payment(stack, invoice.invoice_id)

    assert result.paid and result.attempt_number == 1
    assert len(stored_payments(stack, invoice.invoice_id)) == 1
    assert stored_invoice(stack, invoice.invoice_id).status == InvoiceStatus.PAID


# -- record_invoice_payment: a success for an invoice closed unpaid -----------------------------


@BOTH_BACKENDS
@pytest.mark.parametrize("closed_as", [InvoiceStatus.UNCOLLECTIBLE, InvoiceStatus.VOID])
def test_a_success_for_an_invoice_closed_unpaid_is_recorded_and_the_invoice_paid(
    stack: Stack, closed_as: InvoiceStatus
) -> None:
    seeded = seed_subscription(stack, card=cards.REQUIRES_AUTHENTICATION)
    invoice = open_invoice(stack, seeded)
    first = charge(stack, invoice.invoice_id, 1)
    assert first.payment_intent_id is not None
    # Closed without canceling the intent (an invoice closed before this model existed).
    stack.activities.close_invoice(
        CloseInvoiceInput(invoice.invoice_id, closed_as, reason="dunning_exhausted")
    )
    assert authenticate(stack, first.payment_intent_id).status_code == 200

    results = [
        stack.activities.record_invoice_payment(
            RecordInvoicePaymentInput(invoice.invoice_id, first.payment_intent_id)
        )
        for _ in range(2)
    ]

    assert results[0] == results[1] and results[0].recorded
    [payment] = stored_payments(stack, invoice.invoice_id)
    assert payment.stripe_payment_intent_id == first.payment_intent_id
    stored = stored_invoice(stack, invoice.invoice_id)
    assert (stored.status, stored.amount_paid_minor) == (InvoiceStatus.PAID, AMOUNT_MINOR)
    assert stored.status_reason is not None
    assert stored.status_reason.startswith(f"paid after it was {closed_as.value}: ")
    assert first.payment_intent_id in stored.status_reason
    assert "dunning_exhausted" in stored.status_reason


def test_a_success_that_is_not_the_invoices_is_not_recorded(stack: Stack) -> None:
    seeded = seed_subscription(stack, card=cards.REQUIRES_AUTHENTICATION)
    invoice = open_invoice(stack, seeded)
    other = open_invoice(stack, seeded, period_index=1)
    charge(stack, invoice.invoice_id, 1)
    foreign = charge(stack, other.invoice_id, 1)
    assert foreign.payment_intent_id is not None
    assert authenticate(stack, foreign.payment_intent_id).status_code == 200

    result = stack.activities.record_invoice_payment(
        RecordInvoicePaymentInput(invoice.invoice_id, foreign.payment_intent_id)
    )

    assert not result.recorded
    assert "is not one of invoice" in result.reason
    assert stored_payments(stack, invoice.invoice_id) == []
    assert stored_invoice(stack, invoice.invoice_id).status == InvoiceStatus.OPEN
