"""A charge whose answer is lost, on the time-skipping server: the real workflow, Temporal's
retry of the charge activity, localstripe and a real database."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from billing.contracts import idempotency_key_for
from billing.invoices import InvoiceStatus
from billing.records import AttemptStatus
from billing.subscription import SubscriptionStatus
from billing.testing.cards import SUCCEEDS
from billing.testing.harness import BillingHarness
from tests.conftest import BOTH_BACKENDS

PAYMENT_INTENTS = "/v1/payment_intents"


def intents_for_invoice(harness: BillingHarness, invoice_id: str) -> list[Any]:
    """Every PaymentIntent localstripe holds for the invoice (its list takes no filters)."""
    intents: list[Any] = []
    params: dict[str, Any] = {"limit": 100}
    while True:
        page = harness.stripe.v1.payment_intents.list(params=params)  # type: ignore[arg-type]
        intents.extend(
            i
            for i in page.data
            if "invoice_id" in i.metadata and i.metadata["invoice_id"] == invoice_id
        )
        if not page.has_more or not page.data:
            return intents
        params["starting_after"] = page.data[-1].id


@BOTH_BACKENDS
async def test_a_charge_whose_answer_is_lost_is_retried_by_temporal_and_paid_once(
    harness: BillingHarness,
) -> None:
    now = await harness.now()
    anchor: datetime = now.replace(minute=0, second=0, microsecond=0) + timedelta(days=1)
    sub = await harness.signup("basic-monthly", card=SUCCEEDS, billing_anchor_at=anchor)
    # The first charge reaches Stripe and takes the money, then the connection drops before
    # the worker reads the answer. retryable=False: no SDK-level retry, so the activity fails
    # and Temporal's RetryPolicy is what re-runs it.
    harness.http_client.drop_responses(PAYMENT_INTENTS, retryable=False)

    await harness.advance_to(anchor + timedelta(hours=1))
    state = await harness.wait_for(sub.subscription_id, lambda v: v.open_invoice is None)

    assert state.status == SubscriptionStatus.ACTIVE
    snap = harness.snapshot(sub.subscription_id)
    [invoice] = snap.invoices
    assert (invoice.status, invoice.amount_paid_minor) == (InvoiceStatus.PAID, 900)
    key = idempotency_key_for(invoice.id, 1)
    [attempt] = snap.attempts[invoice.id]
    assert (attempt.attempt_number, attempt.status, attempt.idempotency_key) == (
        1,
        AttemptStatus.SUCCEEDED,
        key,
    )
    # Retried by the activity's RetryPolicy seconds later, not by the workflow's re-drive of a
    # charge that gave up (12 hours plus PROVIDER_OUTAGE_BACKOFF).
    assert attempt.completed_at is not None
    assert attempt.completed_at - attempt.created_at < timedelta(minutes=1)
    [payment] = snap.payments[invoice.id]
    assert payment.attempt_id == attempt.id
    assert payment.stripe_payment_intent_id == attempt.stripe_payment_intent_id
    assert snap.subscription.status == SubscriptionStatus.ACTIVE
    # Both creations went out under the attempt's one key: the lost one and Temporal's retry.
    sent = harness.http_client.requests_to(PAYMENT_INTENTS)
    assert [(r.idempotency_key, r.response_dropped) for r in sent] == [(key, True), (key, False)]
    # localstripe ignores Idempotency-Key, so it holds two PaymentIntents for the invoice. Real
    # Stripe answers the retry, seconds later and well inside the key's 24 hours, with the
    # first PaymentIntent: one charge. The payment we recorded is the one whose answer we read.
    intents = intents_for_invoice(harness, invoice.id)
    assert len(intents) == 2
    assert {i.metadata["idempotency_key"] for i in intents} == {key}
    assert payment.stripe_payment_intent_id in {i.id for i in intents}
