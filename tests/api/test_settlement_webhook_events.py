"""Events for the business from Stripe's settlement webhooks: localstripe (with the settlement
double) signs and delivers ``charge.refunded``, ``refund.*`` and ``charge.dispute.*`` over HTTP
to the webhook router on a real server, which records the refund or dispute and its events in
one transaction. The same deliveries are then replayed by hand, twenty at once, late under a
new event id and stale: no state is reached twice, so no event is written twice."""

from __future__ import annotations

import asyncio
from typing import Any

from billing.credit_notes import RefundStatus
from billing.disputes import DisputeStatus
from billing.records import EventRecord
from billing.testing.settlement_double import move_refund
from db.engine import unit_of_work
from db.repositories import events as events_repo
from db.repositories import invoices as invoices_repo
from tests.api.test_settlement_webhooks import dispute_of, paid_payment, refunds_of, replayed
from tests.api.webhook_fixtures import (
    WebhookStack,
    localstripe_fixture,  # noqa: F401  (a fixture, registered under its short name)
    sign,
    wait_until,
    webhook_harness_fixture,  # noqa: F401  (a fixture, registered under its short name)
    webhook_stack_fixture,  # noqa: F401  (a fixture, registered under its short name)
)
from tests.conftest import BOTH_BACKENDS


def stream(stack: WebhookStack, invoice_id: str) -> list[EventRecord]:
    with unit_of_work(stack.harness.session_factory) as session:
        invoice = invoices_repo.get_invoice(session, invoice_id)
        assert invoice is not None
        found = events_repo.list_events(
            session, limit=1000, subscription_id=invoice.subscription_id
        )
    return sorted(found, key=lambda e: e.sequence)


def settlement_types(stack: WebhookStack, invoice_id: str, prefix: str) -> list[str]:
    return [e.type for e in stream(stack, invoice_id) if e.type.startswith(prefix)]


async def replay(stack: WebhookStack, bodies: list[bytes]) -> None:
    answers = await asyncio.gather(*(stack.post(body, sign(body)) for body in bodies))
    assert {a.status_code for a in answers} == {200}, [a.text for a in answers]


@BOTH_BACKENDS
async def test_a_dashboard_refund_is_reported_once_per_state_however_often_stripe_says_so(
    webhook_stack: WebhookStack,
) -> None:
    stack = webhook_stack
    harness = stack.harness
    invoice_id, charge_id = await paid_payment(harness)

    made = harness.stripe.v1.refunds.create(params={"charge": charge_id, "amount": 300})
    await wait_until(lambda: refunds_of(harness, invoice_id), timeout=15, what="refund recorded")
    refunded = await wait_until(
        lambda: stack.deliveries("charge.refunded"), what="charge.refunded delivered"
    )
    created = await wait_until(
        lambda: stack.deliveries("refund.created"), what="refund.created delivered"
    )
    # Stripe's retries: each delivery 20 times at once, and late under a new event id.
    await replay(stack, [refunded[0].body] * 10 + [created[0].body] * 10)
    await replay(stack, [replayed(refunded[0].event, "evt_late_charge_refunded")])
    assert settlement_types(stack, invoice_id, "refund.") == ["refund.created", "refund.succeeded"]

    # The card was closed: Stripe fails the refund, and says so twice.
    move_refund(stack.localstripe.url, made.id, "failed", "expired_or_canceled_card")
    await wait_until(
        lambda: refunds_of(harness, invoice_id)[0].status == RefundStatus.FAILED,
        timeout=15,
        what="the refund failed",
    )
    updated = await wait_until(
        lambda: stack.deliveries("charge.refund.updated"), what="charge.refund.updated"
    )
    await replay(stack, [updated[0].body] * 20)
    # The stale creation, late: nothing moves back, nothing is written.
    await replay(stack, [replayed(created[0].event, "evt_late_refund_created")])

    events = stream(stack, invoice_id)
    ours = [e for e in events if e.type.startswith("refund.")]
    assert [(e.type, e.object["status"]) for e in ours] == [
        ("refund.created", "succeeded"),
        ("refund.succeeded", "succeeded"),
        ("refund.failed", "failed"),
    ]
    assert {e.object["stripe_refund_id"] for e in ours} == {made.id}
    assert {(e.object["source"], e.object["credit_note_id"]) for e in ours} == {("provider", None)}
    assert ours[-1].object["failure_reason"] == "expired_or_canceled_card"
    paid = next(e for e in events if e.type == "invoice.paid")
    assert paid.sequence < ours[0].sequence
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))


@BOTH_BACKENDS
async def test_a_dispute_is_reported_created_then_closed_once_whatever_stripe_repeats(
    webhook_stack: WebhookStack,
) -> None:
    stack = webhook_stack
    harness = stack.harness
    invoice_id, charge_id = await paid_payment(harness)
    opened = stack.stripe_post(
        f"/_config/settlement/charges/{charge_id}/dispute", {"reason": "fraudulent"}
    )
    await wait_until(lambda: dispute_of(harness, invoice_id), timeout=15, what="dispute recorded")
    [created] = await wait_until(
        lambda: stack.deliveries("charge.dispute.created"), what="charge.dispute.created"
    )
    await wait_until(
        lambda: stack.deliveries("charge.dispute.funds_withdrawn"), what="funds_withdrawn"
    )
    await replay(stack, [created.body] * 20)
    assert settlement_types(stack, invoice_id, "dispute.") == ["dispute.created"]

    stack.stripe_post(f"/_config/settlement/disputes/{opened['id']}/close", {"status": "lost"})
    await wait_until(
        lambda: dispute_of(harness, invoice_id)[0].status == DisputeStatus.LOST,
        timeout=15,
        what="the dispute closed",
    )
    [closed] = await wait_until(
        lambda: stack.deliveries("charge.dispute.closed"), what="charge.dispute.closed"
    )
    # The closing 20 times at once, then the creation late under a new id (stale: open).
    await replay(stack, [closed.body] * 20)
    await replay(stack, [replayed(created.event, "evt_late_dispute_created")])

    events = stream(stack, invoice_id)
    ours = [e for e in events if e.type.startswith("dispute.")]
    assert [(e.type, e.object["status"]) for e in ours] == [
        ("dispute.created", "needs_response"),
        ("dispute.closed", "lost"),
    ]
    shown: dict[str, Any] = ours[-1].object
    assert (shown["stripe_dispute_id"], shown["stripe_charge_id"]) == (opened["id"], charge_id)
    assert (shown["invoice_id"], shown["amount_minor"], shown["reason"]) == (
        invoice_id,
        900,
        "fraudulent",
    )
    paid = next(e for e in events if e.type == "invoice.paid")
    assert paid.sequence < ours[0].sequence
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
