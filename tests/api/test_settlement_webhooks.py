"""Refunds and disputes learnt from Stripe's webhooks: localstripe (with the settlement double)
signs and delivers the events over HTTP to the webhook router on a real server, which reads the
object back from Stripe and records it in a real database. Deliveries are also replayed by
hand: twice, under new event ids, and out of order."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, update

from activities.settlement import SettlementActivities
from billing.credit_notes import CreditNoteRequest, RefundSource, RefundStatus
from billing.disputes import DisputeStatus
from billing.errors import InvalidInput
from billing.invoices import InvoiceStatus
from billing.records import RefundRecord, WebhookOutcome
from billing.settlement import ExecuteRefundInput
from billing.subscription import SubscriptionStatus
from billing.testing.cards import SUCCEEDS
from billing.testing.harness import BillingHarness
from billing.testing.settlement_double import move_refund
from db import models
from db.engine import unit_of_work
from db.repositories import credit_notes as credit_notes_repo
from db.repositories import disputes as disputes_repo
from db.repositories import invoices as invoices_repo
from db.repositories import ledger as ledger_repo
from db.repositories import payments as payments_repo
from tests.api.webhook_fixtures import (
    WebhookStack,
    localstripe_fixture,  # noqa: F401  (a fixture, registered under its short name)
    sign,
    wait_until,
    webhook_harness_fixture,  # noqa: F401  (a fixture, registered under its short name)
    webhook_stack_fixture,  # noqa: F401  (a fixture, registered under its short name)
)
from tests.conftest import BOTH_BACKENDS


async def paid_payment(harness: BillingHarness) -> tuple[str, str]:
    """(invoice id, charge id) of a signup's first invoice, paid."""
    result = await harness.signup("basic-monthly", card=SUCCEEDS)

    def paid() -> Any:
        snap = harness.snapshot(result.subscription_id)
        for invoice in snap.invoices:
            payments = snap.payments[invoice.id]
            if invoice.status == InvoiceStatus.PAID and payments:
                return invoice.id, payments[0].stripe_charge_id
        return None

    found: tuple[str, str] = await wait_until(paid, timeout=30, what="the first invoice paid")
    return found


def refunds_of(harness: BillingHarness, invoice_id: str) -> list[RefundRecord]:
    with unit_of_work(harness.session_factory) as session:
        payment = payments_repo.get_payment_for_invoice(session, invoice_id)
        assert payment is not None
        return credit_notes_repo.list_refunds(session, payment_id=payment.id)


def replayed(body: dict[str, Any], event_id: str) -> bytes:
    return json.dumps({**body, "id": event_id, "created": int(time.time())}).encode()


@BOTH_BACKENDS
async def test_a_dashboard_refund_arrives_only_by_webhook_out_of_order_and_twice(
    webhook_stack: WebhookStack,
) -> None:
    stack = webhook_stack
    harness = stack.harness
    invoice_id, charge_id = await paid_payment(harness)

    # Someone refunds 300 in Stripe's dashboard: we learn it only from the webhooks.
    made = harness.stripe.v1.refunds.create(params={"charge": charge_id, "amount": 300})
    [refund] = await wait_until(
        lambda: refunds_of(harness, invoice_id), timeout=15, what="the refund recorded"
    )
    assert (refund.source, refund.stripe_refund_id, refund.amount_minor, refund.status) == (
        RefundSource.PROVIDER,
        made.id,
        300,
        RefundStatus.SUCCEEDED,
    )
    created = await wait_until(
        lambda: stack.deliveries("refund.created"), what="refund.created delivered"
    )
    await wait_until(lambda: stack.deliveries("charge.refunded"), what="charge.refunded delivered")

    # Later the refund fails (the card was closed): charge.refund.updated says so.
    move_refund(stack.localstripe.url, made.id, "failed", "expired_or_canceled_card")
    await wait_until(
        lambda: refunds_of(harness, invoice_id)[0].status == RefundStatus.FAILED,
        timeout=15,
        what="the refund failed",
    )

    # The old refund.created, delivered again late under a new event id, and twice as it was.
    stale = created[0].event
    for body in (replayed(stale, "evt_late_copy_1"), created[0].body, created[0].body):
        answer = await stack.post(body, sign(body))
        assert answer.status_code == 200, answer.text

    [still] = refunds_of(harness, invoice_id)
    assert (still.id, still.status, still.failure_reason) == (
        refund.id,
        RefundStatus.FAILED,
        "expired_or_canceled_card",
    )
    assert stack.event("evt_late_copy_1").outcome == WebhookOutcome.RECORDED  # type: ignore[union-attr]
    # A failed refund holds no money: all 900 may be refunded again.
    with unit_of_work(harness.session_factory) as session:
        payment = payments_repo.get_payment_for_invoice(session, invoice_id)
        assert payment is not None
        assert credit_notes_repo.refunded_minor(session, payment.id) == 0


@BOTH_BACKENDS
async def test_a_refund_made_while_the_worker_died_is_recorded_once_by_the_webhook_then_the_retry(
    webhook_stack: WebhookStack,
) -> None:
    stack = webhook_stack
    harness = stack.harness
    invoice_id, charge_id = await paid_payment(harness)
    with unit_of_work(harness.session_factory) as session:
        issued = credit_notes_repo.issue_credit_note(
            session, invoice_id, CreditNoteRequest(refund_amount_minor=400), at=harness.clock.now()
        )
    [pending] = issued.refunds

    class Killed(BaseException):
        pass

    def killed(key: str) -> None:
        raise Killed(key)

    dying = SettlementActivities(
        harness.session_factory, harness.stripe_gateway, harness.clock, after_refund_hook=killed
    )
    with pytest.raises(Killed):
        dying.execute_refund(ExecuteRefundInput(pending.id))

    # Stripe refunded; its refund.created (with our key in metadata) reaches the webhook.
    def recorded() -> RefundRecord | None:
        [refund] = refunds_of(harness, invoice_id)
        return refund if refund.stripe_refund_id is not None else None

    refund = await wait_until(recorded, timeout=15, what="the webhook recorded our refund")
    assert (refund.id, refund.source, refund.status) == (
        pending.id,
        RefundSource.CREDIT_NOTE,
        RefundStatus.SUCCEEDED,
    )

    # The worker's retry finds it final: nothing is sent again.
    sent_before = len(
        [r for r in harness.http_client.requests_to("/v1/refunds") if r.method == "POST"]
    )
    result = SettlementActivities(
        harness.session_factory, harness.stripe_gateway, harness.clock
    ).execute_refund(ExecuteRefundInput(pending.id))
    assert result.status == RefundStatus.SUCCEEDED
    assert [r for r in harness.http_client.requests_to("/v1/refunds") if r.method == "POST"][
        sent_before:
    ] == []
    assert len(list(harness.stripe.v1.refunds.list(params={"charge": charge_id}).data)) == 1
    assert len(refunds_of(harness, invoice_id)) == 1


async def test_a_webhook_request_that_dies_after_recording_is_redelivered_and_records_nothing_twice(
    webhook_stack: WebhookStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = webhook_stack
    harness = stack.harness
    invoice_id, charge_id = await paid_payment(harness)
    made = harness.stripe.v1.refunds.create(params={"charge": charge_id, "amount": 100})
    await wait_until(lambda: refunds_of(harness, invoice_id), timeout=15, what="recorded")
    [delivery] = await wait_until(
        lambda: stack.deliveries("charge.refunded"), what="charge.refunded delivered"
    )

    from billing.api import webhooks

    real_record = webhooks._record
    calls = {"n": 0}

    def dies_once(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("the database went away after the refunds were written")
        real_record(*args, **kwargs)

    monkeypatch.setattr(webhooks, "_record", dies_once)
    body = replayed(delivery.event, "evt_dies_midway")
    answer = await stack.post(body, sign(body))
    assert answer.status_code == 500
    # The request died holding its claim: a redelivery now is told to come back later ...
    assert (await stack.post(body, sign(body))).status_code == 409
    # ... and once the claim is stale (2 minutes without an outcome), it is taken over.
    with unit_of_work(harness.session_factory) as session:
        session.execute(
            update(models.WEBHOOK_EVENTS)
            .where(models.WEBHOOK_EVENTS.c.id == "evt_dies_midway")
            .values(claimed_at=datetime.now(UTC) - timedelta(minutes=3))
        )
    # Stripe redelivers: the event is processed again, and records nothing twice.
    answer = await stack.post(body, sign(body))
    assert answer.status_code == 200, answer.text
    [refund] = refunds_of(harness, invoice_id)
    assert (refund.stripe_refund_id, refund.amount_minor) == (made.id, 100)
    assert stack.event("evt_dies_midway").outcome == WebhookOutcome.RECORDED  # type: ignore[union-attr]


def dispute_of(harness: BillingHarness, invoice_id: str) -> list[Any]:
    with unit_of_work(harness.session_factory) as session:
        payment = payments_repo.get_payment_for_invoice(session, invoice_id)
        assert payment is not None
        return disputes_repo.list_disputes(session, payment_id=payment.id)


def ledger_of(harness: BillingHarness, *source_ids: str) -> list[Any]:
    with unit_of_work(harness.session_factory) as session:
        return ledger_repo.list_entries(session, source_ids=source_ids)


@BOTH_BACKENDS
@pytest.mark.parametrize("ending", ["won", "lost"])
async def test_a_dispute_arrives_by_webhook_out_of_order_and_twice_and_the_ledger_is_right_once(
    webhook_stack: WebhookStack, ending: str
) -> None:
    stack = webhook_stack
    harness = stack.harness
    invoice_id, charge_id = await paid_payment(harness)

    opened = stack.stripe_post(
        f"/_config/settlement/charges/{charge_id}/dispute", {"reason": "fraudulent"}
    )
    [dispute] = await wait_until(
        lambda: dispute_of(harness, invoice_id), timeout=15, what="the dispute recorded"
    )
    assert (dispute.stripe_dispute_id, dispute.status, dispute.amount_minor) == (
        opened["id"],
        DisputeStatus.NEEDS_RESPONSE,
        900,
    )
    [withdrawal] = await wait_until(
        lambda: ledger_of(harness, opened["id"]), timeout=15, what="the withdrawal mirrored"
    )
    assert (withdrawal.amount_minor, withdrawal.fee_minor, withdrawal.net_minor) == (
        -900,
        1500,
        -2400,
    )
    assert (withdrawal.reporting_category, withdrawal.dispute_id) == ("dispute", dispute.id)
    # Disputed money cannot be refunded as well.
    with unit_of_work(harness.session_factory) as session, pytest.raises(InvalidInput) as capped:
        credit_notes_repo.issue_credit_note(
            session, invoice_id, CreditNoteRequest(refund_amount_minor=1), at=harness.clock.now()
        )
    assert "disputed 900" in capped.value.message

    stack.stripe_post(f"/_config/settlement/disputes/{opened['id']}/close", {"status": ending})
    await wait_until(
        lambda: dispute_of(harness, invoice_id)[0].status == DisputeStatus(ending),
        timeout=15,
        what="the dispute closed",
    )
    expected_entries = 2 if ending == "won" else 1
    entries = await wait_until(
        lambda: (
            (found := ledger_of(harness, opened["id"])) and len(found) == expected_entries and found
        ),
        timeout=15,
        what="the ledger complete",
    )

    # The creation again, late under a new id and twice as it was: nothing moves.
    [created] = stack.deliveries("charge.dispute.created")
    for body in (replayed(created.event, f"evt_late_dispute_{ending}"), created.body, created.body):
        answer = await stack.post(body, sign(body))
        assert answer.status_code == 200, answer.text
    [still] = dispute_of(harness, invoice_id)
    assert still.status == DisputeStatus(ending)
    assert ledger_of(harness, opened["id"]) == entries

    with unit_of_work(harness.session_factory) as session:
        payment = payments_repo.get_payment_for_invoice(session, invoice_id)
        assert payment is not None and payment.net_minor is not None
        charge_entries = ledger_repo.list_entries(session, source_ids=[charge_id])
        held = credit_notes_repo.disputed_minor(session, payment.id)
    dispute_net = sum(e.net_minor for e in entries)
    if ending == "won":
        # Restored: the amount and the dispute fee came back.
        assert (dispute_net, held) == (0, 0)
        assert [e.reporting_category for e in entries] == ["dispute", "dispute_reversal"]
    else:
        # Reversed: the payment's money and the dispute fee are gone for good.
        assert (dispute_net, held) == (-2400, 900)
    assert charge_entries == []  # the charge's own transaction comes with its payout or sync


async def test_with_the_cancel_policy_a_chargeback_cancels_the_subscription_once(
    webhook_stack: WebhookStack,
) -> None:
    stack = webhook_stack
    harness = stack.harness
    settings = stack.app.state.settings
    stack.app.state.settings = settings.model_copy(update={"dispute_subscription_action": "cancel"})
    invoice_id, charge_id = await paid_payment(harness)
    with unit_of_work(harness.session_factory) as session:
        payment = payments_repo.get_payment_for_invoice(session, invoice_id)
        assert payment is not None
        invoice = invoices_repo.get_invoice(session, invoice_id)
        assert invoice is not None
    opened = stack.stripe_post(
        f"/_config/settlement/charges/{charge_id}/dispute", {"reason": "fraudulent"}
    )

    def canceled() -> bool:
        snap = harness.snapshot(invoice.subscription_id)
        return snap.subscription.status == SubscriptionStatus.CANCELED

    await wait_until(canceled, timeout=20, what="the subscription canceled")
    snap = harness.snapshot(invoice.subscription_id)
    assert snap.subscription.cancel_reason is not None
    assert opened["id"] in snap.subscription.cancel_reason
    # charge.dispute.funds_withdrawn (and any repeat) finds it canceled already: recorded.
    await wait_until(
        lambda: stack.deliveries("charge.dispute.funds_withdrawn"), what="funds_withdrawn"
    )
    await wait_until(
        lambda: (
            all(
                e.outcome == WebhookOutcome.RECORDED
                for e in stack.events("charge.dispute.funds_withdrawn")
            )
            and stack.events("charge.dispute.funds_withdrawn")
        ),
        what="funds_withdrawn recorded",
    )
    canceled_rows = [c for c in snap.status_changes if c.to_status == SubscriptionStatus.CANCELED]
    assert len(canceled_rows) == 1


@pytest.mark.parametrize(
    ("event_type", "obj", "outcome"),
    [
        ("refund.created", {"id": "re_\u0000x"}, WebhookOutcome.IGNORED),
        ("refund.updated", {"id": "re_" + "x" * 10_000}, WebhookOutcome.IGNORED),
        ("charge.refunded", {"id": "ch_🙂"}, WebhookOutcome.IGNORED),
        ("charge.dispute.created", {"id": 42}, WebhookOutcome.IGNORED),
        ("charge.refunded", {"id": "ch_notours123"}, WebhookOutcome.NO_SUBSCRIPTION),
        ("payout.paid", {"id": None}, WebhookOutcome.IGNORED),
    ],
)
async def test_settlement_events_naming_nothing_usable_change_nothing(
    webhook_stack: WebhookStack, event_type: str, obj: dict[str, Any], outcome: WebhookOutcome
) -> None:
    stack = webhook_stack
    event_id = f"evt_garbage_{uuid.uuid4().hex[:12]}"
    body = json.dumps(
        {"id": event_id, "type": event_type, "created": int(time.time()), "data": {"object": obj}}
    ).encode()
    before = row_counts_settlement(stack.harness)

    answer = await stack.post(body, sign(body))

    assert answer.status_code == 200, answer.text
    assert stack.event(event_id).outcome == outcome  # type: ignore[union-attr]
    assert row_counts_settlement(stack.harness) == before


def row_counts_settlement(harness: BillingHarness) -> dict[str, int]:
    with harness.session_factory() as session:
        return {
            table.__tablename__: session.scalar(select(func.count()).select_from(table)) or 0
            for table in (
                models.RefundRow,
                models.DisputeRow,
                models.LedgerEntryRow,
                models.PayoutRow,
            )
        }
