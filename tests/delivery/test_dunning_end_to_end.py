"""A dunning scenario end to end: the real subscription workflow declines a card, the customer
gets the failure mail (real SMTP server) and the business gets ``invoice.payment_failed``
(real HTTP receiver, signature checked); the card is updated and both learn of the recovery."""

from __future__ import annotations

import hashlib

from billing.business_events import verify_signature
from billing.contracts import (
    SubscriptionMessage,
    UpdatePaymentMethodInput,
    UpdatePaymentMethodResult,
)
from billing.ids import new_id
from billing.records import EventEndpointRecord
from billing.subscription import SubscriptionStatus
from billing.testing.cards import DECLINES_AFTER_ATTACH, SUCCEEDS
from billing.testing.event_receiver import event_receiver
from billing.testing.harness import BillingHarness
from billing.testing.mail_sink import RecordingHandler, smtp_server
from db.engine import unit_of_work
from db.repositories import events as events_repo
from tests.delivery.support import T0, delivery_activities, delivery_stack, wait_until


async def test_failure_and_recovery_reach_the_customer_and_the_business(
    harness: BillingHarness,
) -> None:
    handler = RecordingHandler()
    with smtp_server(handler) as port, event_receiver() as receiver:
        with unit_of_work(harness.session_factory) as session:
            events_repo.insert_endpoint(
                session,
                EventEndpointRecord(
                    id=new_id("we"),
                    url=receiver.url,
                    url_digest=hashlib.sha256(receiver.url.encode()).hexdigest(),
                    event_types=["invoice.payment_failed", "invoice.paid", "subscription.updated"],
                    secret="bwhsec_e2e",
                    created_at=T0,
                    updated_at=T0,
                ),
            )
        activities = delivery_activities(harness.session_factory, port)
        async with delivery_stack(harness.client, activities):
            sub = await harness.signup("basic-monthly", card=DECLINES_AFTER_ATTACH)
            await harness.wait_for(sub.subscription_id, lambda v: v.status == "past_due")

            def kinds() -> list[str]:
                return [str(m.message()["X-Billing-Notice"]).split()[0] for m in handler.received]

            def types() -> list[str]:
                return [e["type"] for e in receiver.accepted()]

            await wait_until(lambda: "payment_failed" in kinds(), what="the failure mail")
            await wait_until(lambda: "invoice.payment_failed" in types(), what="the event")
            failure = handler.received[0].message()
            assert failure["To"] == "Test Customer <customer@example.com>"
            assert "$9.00" in str(failure["Subject"])

            result: UpdatePaymentMethodResult = await harness.update(
                sub.subscription_id,
                SubscriptionMessage.UPDATE_PAYMENT_METHOD,
                UpdatePaymentMethodInput(payment_method_id=await harness.to_thread_card(SUCCEEDS)),
                UpdatePaymentMethodResult,
            )
            assert result.retry_scheduled
            await harness.wait_for(
                sub.subscription_id, lambda v: v.status == SubscriptionStatus.ACTIVE
            )
            await wait_until(
                lambda: {"payment_recovered", "receipt"} <= set(kinds()), what="recovery mails"
            )
            await wait_until(lambda: "invoice.paid" in types(), what="invoice.paid")
            # (Not just any subscription.updated: past_due's came before the recovery.)
            await wait_until(
                lambda: (
                    ("subscription.updated", "active")
                    in [(e["type"], e["data"]["object"]["status"]) for e in receiver.accepted()]
                ),
                what="active again",
            )
    assert sorted(kinds()) == ["payment_failed", "payment_recovered", "receipt"]
    accepted = receiver.accepted()
    # In the order they happened: the failure, past due, paid, active again.
    assert [(e["type"], e["data"]["object"]["status"]) for e in accepted] == [
        ("invoice.payment_failed", "open"),
        ("subscription.updated", "past_due"),
        ("invoice.paid", "paid"),
        ("subscription.updated", "active"),
    ]
    sequences = [e["sequence"] for e in accepted]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)
    paid = next(e for e in accepted if e["type"] == "invoice.paid")
    assert paid["data"]["object"]["status"] == "paid"
    for request in receiver.requests:
        verify_signature(request.body, request.headers["Billing-Signature"], "bwhsec_e2e")
        assert b"4242" not in request.body and b"pm_" not in request.body
