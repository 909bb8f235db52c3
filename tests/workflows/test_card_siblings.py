"""Issue 11, finding 6: a card is the customer's, not one subscription's. A new card given
through the API for one subscription reaches the customer's other live subscriptions: one
whose invoice is blocked by a hard decline retries at once and is paid, instead of waiting
(no retry is scheduled for a hard decline) until its final action writes the invoice off.

Real workflow and activities on the time-skipping server, localstripe, a real database. The
hard decline is the one stand-in: localstripe never answers a charge with ``stolen_card``
(it refuses such cards at attach), so its ``card_declined`` is reported as Stripe reports a
stolen card (``StolenCardGateway`` in tests/workflows/conftest.py, as in the dunning tests).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from billing.contracts import (
    CancelInput,
    CancelResult,
    NoticeKind,
    SubscriptionMessage,
    UpdatePaymentMethodInput,
    UpdatePaymentMethodResult,
)
from billing.invoices import InvoiceStatus
from billing.notices import NoticeKind as MailKind
from billing.subscription import SubscriptionStatus
from billing.testing.cards import DECLINES_AFTER_ATTACH, SUCCEEDS
from billing.testing.harness import BillingHarness
from tests.conftest import BOTH_BACKENDS

DAY = timedelta(days=1)
#: Real seconds a sibling may take to retry after the card update (an activity or two).
#: The old behaviour never retries without time passing, so this only bounds the failure.
SIBLING_RETRY_TIMEOUT_S = 30.0


async def first_anchor(harness: BillingHarness) -> datetime:
    now = await harness.now()
    return now.replace(minute=0, second=0, microsecond=0) + DAY


@BOTH_BACKENDS
async def test_a_card_update_on_one_subscription_pays_the_hard_declined_sibling_at_once(
    stolen_card_harness: BillingHarness,
) -> None:
    harness = stolen_card_harness
    anchor = await first_anchor(harness)
    customer = f"ext-siblings-{uuid.uuid4().hex[:8]}"
    # One customer, one card (reported stolen at the first charge), three subscriptions: the
    # second and third take the customer's card on record. The third is canceled at once.
    first = await harness.signup(
        "basic-monthly", card=DECLINES_AFTER_ATTACH, billing_anchor_at=anchor, external_id=customer
    )
    sibling = await harness.signup("basic-monthly", billing_anchor_at=anchor, external_id=customer)
    ended = await harness.signup("basic-monthly", billing_anchor_at=anchor, external_id=customer)
    assert first.customer_id == sibling.customer_id == ended.customer_id
    await harness.update(
        ended.subscription_id,
        SubscriptionMessage.CANCEL,
        CancelInput(at_period_end=False, reason="customer asked"),
        CancelResult,
    )

    await harness.advance_to(anchor + 3 * DAY)
    for sub in (first, sibling):
        state = await harness.state(sub.subscription_id)
        assert state.status == SubscriptionStatus.PAST_DUE
        assert state.open_invoice is not None and state.open_invoice.attempts == 1
        assert state.open_invoice.blocked == "hard_decline"
        assert state.open_invoice.next_retry_at is None  # only a new card unblocks it

    updated_at = await harness.now()
    good_card = await harness.to_thread_card(SUCCEEDS)
    result: UpdatePaymentMethodResult = await harness.update(
        first.subscription_id,
        SubscriptionMessage.UPDATE_PAYMENT_METHOD,
        UpdatePaymentMethodInput(payment_method_id=good_card),
        UpdatePaymentMethodResult,
    )
    assert result.payment_method_id == good_card and result.retry_scheduled

    # No time passes on the workflows' clock: only the card news can make the sibling retry.
    await harness.wait_for(
        first.subscription_id, lambda v: v.open_invoice is None, timeout=SIBLING_RETRY_TIMEOUT_S
    )
    state = await harness.wait_for(
        sibling.subscription_id, lambda v: v.open_invoice is None, timeout=SIBLING_RETRY_TIMEOUT_S
    )
    assert state.status == SubscriptionStatus.ACTIVE
    assert await harness.now() - updated_at < timedelta(hours=1)

    for sub in (first, sibling):
        snap = harness.snapshot(sub.subscription_id)
        [invoice] = snap.invoices
        assert invoice.status == InvoiceStatus.PAID and invoice.amount_paid_minor == 900
        attempts = snap.attempts[invoice.id]
        assert [(a.status, a.reason) for a in attempts] == [
            ("failed", "scheduled"),
            ("succeeded", "payment_method_updated"),
        ], sub.subscription_id
        assert attempts[1].payment_method_id == good_card
        assert attempts[1].created_at - updated_at < timedelta(hours=1)
        assert len(snap.payments[invoice.id]) == 1
        # The receipt is written with the payment; the recovery notice after it.
        assert [n.kind for n in snap.notifications] == [
            NoticeKind.PAYMENT_FAILED,
            MailKind.RECEIPT,
            NoticeKind.PAYMENT_SUCCEEDED_AFTER_FAILURE,
        ]
    # The card was attached once, for the subscription it was given to: the sibling was told,
    # and its news wrote nothing to Stripe.
    attaches = [r for r in harness.http_client.recorded if r.path.endswith("/attach")]
    assert [r.path for r in attaches].count(f"/v1/payment_methods/{good_card}/attach") == 1
    # The canceled subscription stays ended, untouched.
    ended_state = await harness.state(ended.subscription_id)
    assert ended_state.status == SubscriptionStatus.CANCELED
    assert harness.snapshot(ended.subscription_id).invoices == []


@BOTH_BACKENDS
async def test_a_new_card_given_at_signup_pays_the_customers_hard_declined_subscription(
    stolen_card_harness: BillingHarness,
) -> None:
    """A signup for an existing customer with a new card makes it the customer's default at
    Stripe: it is a card change for every subscription of the customer. The one blocked by a
    hard decline retries at once, with it, and is paid. (Stripe's news of the signup's own
    write is known news to the webhook, so the signup tells them itself.)"""
    harness = stolen_card_harness
    anchor = await first_anchor(harness)
    customer = f"ext-signup-card-{uuid.uuid4().hex[:8]}"
    blocked = await harness.signup(
        "basic-monthly", card=DECLINES_AFTER_ATTACH, billing_anchor_at=anchor, external_id=customer
    )
    await harness.advance_to(anchor + 2 * DAY)
    state = await harness.state(blocked.subscription_id)
    assert state.open_invoice is not None and state.open_invoice.blocked == "hard_decline"

    signed_up_at = await harness.now()
    second = await harness.signup(
        "basic-monthly",
        card=SUCCEEDS,
        billing_anchor_at=anchor + 5 * DAY,
        external_id=customer,
    )
    assert second.customer_id == blocked.customer_id
    state = await harness.wait_for(
        blocked.subscription_id, lambda v: v.open_invoice is None, timeout=SIBLING_RETRY_TIMEOUT_S
    )
    assert state.status == SubscriptionStatus.ACTIVE
    snap = harness.snapshot(blocked.subscription_id)
    [invoice] = snap.invoices
    assert invoice.status == InvoiceStatus.PAID
    attempts = snap.attempts[invoice.id]
    assert [(a.status, a.reason) for a in attempts] == [
        ("failed", "scheduled"),
        ("succeeded", "payment_method_updated"),
    ]
    assert attempts[1].created_at - signed_up_at < timedelta(hours=1)
    # The new subscription is untouched: it bills on its own anchor.
    second_state = await harness.state(second.subscription_id)
    assert second_state.status == SubscriptionStatus.ACTIVE
    assert second_state.invoices_issued == 0
