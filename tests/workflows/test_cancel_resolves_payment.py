"""Issue 11, finding 4: an immediate cancel never voids an invoice whose charge outcome is
unknown. The provider is asked first; money it took is recorded and the invoice is paid.
Real workflow on the time-skipping server, localstripe, both databases."""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import stripe

from billing.contracts import CancelInput, CancelResult, SubscriptionMessage
from billing.invoices import InvoiceStatus
from billing.records import AttemptStatus
from billing.subscription import SubscriptionStatus
from billing.testing.cards import SUCCEEDS
from billing.testing.harness import BillingHarness
from tests.conftest import BOTH_BACKENDS
from tests.workflows.test_charge_crash import intents_for_invoice

PAYMENT_INTENTS = "/v1/payment_intents"


def lose_the_first_answer_then_the_network(harness: BillingHarness) -> list[str]:
    """The first PaymentIntent creation reaches Stripe and takes the money, and its answer is
    lost; every later creation fails before it leaves (Stripe unreachable), so the charge
    activity gives up with the attempt's outcome unknown. A network the real parts cannot
    produce on demand, so the recording HTTP client is wrapped here."""
    client = harness.http_client
    original = client.request
    seen: list[str] = []

    def request(method: str, url: str, headers: Any, post_data: Any = None, **kw: Any) -> Any:
        if method.upper() == "POST" and urlsplit(url).path == PAYMENT_INTENTS:
            seen.append(url)
            if len(seen) == 1:
                original(method, url, headers, post_data, **kw)
                raise stripe.APIConnectionError(  # type: ignore[no-untyped-call]
                    "simulated: the charge was made, its answer lost", should_retry=False
                )
            raise stripe.APIConnectionError(  # type: ignore[no-untyped-call]
                "simulated: Stripe unreachable", should_retry=False
            )
        return original(method, url, headers, post_data, **kw)

    client.request = request  # type: ignore[method-assign]
    return seen


@BOTH_BACKENDS
async def test_an_immediate_cancel_records_a_charge_of_unknown_outcome_instead_of_voiding(
    harness: BillingHarness,
) -> None:
    # Billed at signup, before any time is skipped: the attempt's recorded time and the
    # intent's creation time at localstripe (its own wall clock) then agree, as they do with
    # Stripe, and the lookup by the attempt's key searches from the right moment.
    anchor = await harness.now()
    sends = lose_the_first_answer_then_the_network(harness)
    sub = await harness.signup("basic-monthly", card=SUCCEEDS, billing_anchor_at=anchor)

    # The charge activity retries for its 12 hours, then the workflow waits an hour before it
    # re-drives the same attempt: the cancel arrives in that hour.
    await harness.advance_to(anchor + timedelta(hours=12, minutes=20))
    state = await harness.state(sub.subscription_id)
    assert state.open_invoice is not None and len(sends) > 1
    result: CancelResult = await harness.update(
        sub.subscription_id,
        SubscriptionMessage.CANCEL,
        CancelInput(at_period_end=False, reason="customer left"),
        CancelResult,
    )

    assert result.status == SubscriptionStatus.CANCELED
    assert result.voided_invoice_id is None
    snap = harness.snapshot(sub.subscription_id)
    [invoice] = snap.invoices
    # The money Stripe took is recorded, not voided away.
    assert (invoice.status, invoice.amount_paid_minor) == (InvoiceStatus.PAID, 900)
    [attempt] = snap.attempts[invoice.id]
    assert attempt.status == AttemptStatus.SUCCEEDED
    [payment] = snap.payments[invoice.id]
    [intent] = [i for i in intents_for_invoice(harness, invoice.id) if i.status == "succeeded"]
    assert payment.stripe_payment_intent_id == intent.id
    assert snap.subscription.status == SubscriptionStatus.CANCELED
