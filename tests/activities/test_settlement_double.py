# The `stack` fixture is imported from the charge tests, and so is redefined by every use.
# ruff: noqa: F811
"""The settlement double (``billing.testing.localstripe_settlement``) answers with Stripe's
documented objects, and the adapter reads them: refunds
(https://docs.stripe.com/api/refunds/object), disputes
(https://docs.stripe.com/api/disputes/object), balance transactions
(https://docs.stripe.com/api/balance_transactions/object) and payouts
(https://docs.stripe.com/api/payouts/object)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import stripe

from billing.credit_notes import RefundReason, RefundStatus
from billing.disputes import DisputeStatus
from billing.ledger import PayoutStatus
from billing.payments import PaymentProviderError
from billing.testing import cards
from billing.testing.localstripe_settlement import DISPUTE_FEE_MINOR, stripe_fee
from tests.activities.test_billing_activities import (  # noqa: F401  (the stack fixture)
    AMOUNT_MINOR,
    Stack,
    charge,
    open_invoice,
    seed_subscription,
    stack,
)

REFUND_FIELDS = {
    "id",
    "object",
    "amount",
    "balance_transaction",
    "charge",
    "created",
    "currency",
    "metadata",
    "payment_intent",
    "reason",
    "status",
    "failure_reason",
}
DISPUTE_FIELDS = {
    "id",
    "object",
    "amount",
    "balance_transactions",
    "charge",
    "created",
    "currency",
    "evidence_details",
    "is_charge_refundable",
    "metadata",
    "payment_intent",
    "reason",
    "status",
}
TXN_FIELDS = {
    "id",
    "object",
    "amount",
    "available_on",
    "created",
    "currency",
    "description",
    "exchange_rate",
    "fee",
    "fee_details",
    "net",
    "reporting_category",
    "source",
    "status",
    "type",
}
PAYOUT_FIELDS = {
    "id",
    "object",
    "amount",
    "arrival_date",
    "automatic",
    "balance_transaction",
    "created",
    "currency",
    "destination",
    "failure_code",
    "failure_message",
    "method",
    "status",
    "type",
}


@pytest.fixture(autouse=True)
def fresh_account(stack: Stack) -> None:
    """These tests read the whole account (every charge, every available transaction): start
    from an empty localstripe, whatever earlier tests of the session left there."""
    stack.localstripe.flush()


def paid_charge(stack: Stack) -> str:
    seeded = seed_subscription(stack)
    invoice = open_invoice(stack, seeded)
    result = charge(stack, invoice.invoice_id, 1)
    assert result.charge_id is not None
    return result.charge_id


def double(stack: Stack, path: str, form: dict[str, str] | None = None) -> Any:
    answer = httpx.post(f"{stack.localstripe.url}{path}", data=form or {}, timeout=10)
    answer.raise_for_status()
    return answer.json()


@pytest.mark.parametrize(
    ("amount", "fee"), [(2500, 103), (900, 56), (1, 30), (10_000, 320), (99_999, 2930)]
)
def test_the_fee_is_stripes_standard_card_fee_rounded_half_up(amount: int, fee: int) -> None:
    assert stripe_fee(amount) == fee


def test_a_charges_balance_transaction_carries_the_fee(stack: Stack) -> None:
    charge_id = paid_charge(stack)
    raw = stack.stripe.v1.charges.retrieve(charge_id, params={"expand": ["balance_transaction"]})
    txn = raw.balance_transaction.to_dict()
    assert set(txn) >= TXN_FIELDS
    assert (txn["type"], txn["reporting_category"], txn["source"]) == (
        "charge",
        "charge",
        charge_id,
    )
    assert (txn["amount"], txn["fee"], txn["net"]) == (
        AMOUNT_MINOR,
        stripe_fee(AMOUNT_MINOR),
        AMOUNT_MINOR - stripe_fee(AMOUNT_MINOR),
    )
    assert txn["fee_details"][0]["type"] == "stripe_fee"
    read = stack.gateway.retrieve_balance_transaction(transaction_id=txn["id"])
    assert (read.fee_minor, read.net_minor, read.currency) == (txn["fee"], txn["net"], "USD")


def test_a_refund_is_stripes_object_and_the_adapter_reads_it(stack: Stack) -> None:
    charge_id = paid_charge(stack)
    made = stack.gateway.create_refund(
        charge_id=charge_id,
        amount_minor=700,
        currency="USD",
        reason=RefundReason.DUPLICATE,
        idempotency_key="cn_x-refund-1",
        metadata={"credit_note_id": "cn_x"},
    )
    raw = stack.stripe.v1.refunds.retrieve(made.refund_id).to_dict()
    assert set(raw) >= REFUND_FIELDS
    assert (raw["object"], raw["amount"], raw["reason"], raw["status"]) == (
        "refund",
        700,
        "duplicate",
        "succeeded",
    )
    assert raw["metadata"] == {"credit_note_id": "cn_x", "idempotency_key": "cn_x-refund-1"}
    assert (made.status, made.idempotency_key, made.charge_id) == (
        RefundStatus.SUCCEEDED,
        "cn_x-refund-1",
        charge_id,
    )
    txn = stack.gateway.retrieve_balance_transaction(transaction_id=raw["balance_transaction"])
    assert (txn.type, txn.amount_minor, txn.fee_minor, txn.source_id) == (
        "refund",
        -700,
        0,
        made.refund_id,
    )
    # Stripe's refusals, with its codes: over what is left, a reason it does not know.
    with pytest.raises(stripe.InvalidRequestError) as over:
        stack.stripe.v1.refunds.create(params={"charge": charge_id, "amount": AMOUNT_MINOR - 699})
    assert over.value.code == "amount_too_large"
    with pytest.raises(stripe.InvalidRequestError) as reason:
        stack.stripe.v1.refunds.create(params={"charge": charge_id, "reason": "because"})
    assert reason.value.code == "parameter_invalid_string"


def test_a_dispute_and_its_transactions_are_stripes_objects(stack: Stack) -> None:
    charge_id = paid_charge(stack)
    opened = double(
        stack, f"/_config/settlement/charges/{charge_id}/dispute", {"reason": "fraudulent"}
    )
    raw = stack.stripe.v1.disputes.retrieve(opened["id"]).to_dict()
    assert set(raw) >= DISPUTE_FIELDS
    assert (raw["object"], raw["status"], raw["amount"], raw["charge"]) == (
        "dispute",
        "needs_response",
        AMOUNT_MINOR,
        charge_id,
    )
    [withdrawal] = raw["balance_transactions"]
    assert (withdrawal["type"], withdrawal["reporting_category"], withdrawal["fee"]) == (
        "adjustment",
        "dispute",
        DISPUTE_FEE_MINOR,
    )
    assert withdrawal["net"] == -AMOUNT_MINOR - DISPUTE_FEE_MINOR
    read = stack.gateway.retrieve_dispute(dispute_id=opened["id"])
    assert (read.status, read.balance_transaction_ids) == (
        DisputeStatus.NEEDS_RESPONSE,
        (withdrawal["id"],),
    )
    # A disputed charge cannot be refunded as well.
    with pytest.raises(stripe.InvalidRequestError) as refused:
        stack.stripe.v1.refunds.create(params={"charge": charge_id, "amount": 1})
    assert refused.value.code == "charge_disputed"
    double(stack, f"/_config/settlement/disputes/{opened['id']}/close", {"status": "won"})
    won = stack.gateway.retrieve_dispute(dispute_id=opened["id"])
    assert won.status == DisputeStatus.WON and len(won.balance_transaction_ids) == 2
    reinstated = stack.gateway.retrieve_balance_transaction(
        transaction_id=won.balance_transaction_ids[1]
    )
    assert (reinstated.reporting_category, reinstated.net_minor) == (
        "dispute_reversal",
        AMOUNT_MINOR + DISPUTE_FEE_MINOR,
    )


def test_an_automatic_payout_batches_the_available_balance_and_the_filter_lists_it(
    stack: Stack,
) -> None:
    first, second = paid_charge(stack), paid_charge(stack)
    [made] = double(stack, "/_config/settlement/payouts/run")["data"]
    raw = stack.stripe.v1.payouts.retrieve(made["id"]).to_dict()
    assert set(raw) >= PAYOUT_FIELDS
    assert (raw["automatic"], raw["status"], raw["currency"]) == (True, "paid", "usd")
    assert raw["amount"] == 2 * (AMOUNT_MINOR - stripe_fee(AMOUNT_MINOR))
    listed = stack.gateway.list_balance_transactions(payout_id=made["id"])
    assert sorted((t.type, t.source_id) for t in listed) == sorted(
        [("charge", first), ("charge", second), ("payout", made["id"])]
    )
    payout = stack.gateway.retrieve_payout(payout_id=made["id"])
    assert (payout.status, payout.automatic, payout.balance_transaction_id) == (
        PayoutStatus.PAID,
        True,
        raw["balance_transaction"],
    )
    # Paid out once: the next run has nothing to batch.
    assert double(stack, "/_config/settlement/payouts/run")["data"] == []


def test_a_declined_intent_takes_a_lower_amount_for_its_next_confirm(stack: Stack) -> None:
    seeded = seed_subscription(stack, card=cards.DECLINES_AFTER_ATTACH)
    invoice = open_invoice(stack, seeded)
    declined = charge(stack, invoice.invoice_id, 1)
    assert declined.payment_intent_id is not None
    assert (
        stack.gateway.update_payment_intent_amount(
            payment_intent_id=declined.payment_intent_id, amount_minor=1800, currency="USD"
        )
        == 1800
    )
    assert stack.stripe.v1.payment_intents.retrieve(declined.payment_intent_id).amount == 1800
    with pytest.raises(PaymentProviderError):
        stack.gateway.update_payment_intent_amount(
            payment_intent_id=declined.payment_intent_id, amount_minor=0, currency="USD"
        )


def test_a_paid_intents_amount_is_not_changed(stack: Stack) -> None:
    seeded = seed_subscription(stack)
    invoice = open_invoice(stack, seeded)
    paid = charge(stack, invoice.invoice_id, 1)
    assert paid.payment_intent_id is not None
    with pytest.raises(PaymentProviderError, match="payment_intent_unexpected_state"):
        stack.gateway.update_payment_intent_amount(
            payment_intent_id=paid.payment_intent_id, amount_minor=100, currency="USD"
        )
    assert stack.stripe.v1.payment_intents.retrieve(paid.payment_intent_id).amount == AMOUNT_MINOR
