"""Dunning on the time-skipping server: retries at the policy's offsets, recovery by a card
update, exhaustion and its final action, hard declines and authentication."""

from __future__ import annotations

from datetime import datetime, timedelta

from dateutil.relativedelta import relativedelta

from billing.calendar import IntervalUnit
from billing.contracts import (
    NoticeKind,
    SubscriptionMessage,
    UpdatePaymentMethodInput,
    UpdatePaymentMethodResult,
)
from billing.dunning import DEFAULT_RETRY_OFFSETS_DAYS, DunningPolicy, FinalAction
from billing.invoices import InvoiceStatus
from billing.plans import Plan
from billing.subscription import SubscriptionStatus
from billing.testing.cards import DECLINES_AFTER_ATTACH, REQUIRES_AUTHENTICATION, SUCCEEDS
from billing.testing.harness import BillingHarness
from tests.conftest import BOTH_BACKENDS

DAY = timedelta(days=1)


def attempt_offsets(attempts: list, first_failure_at: datetime) -> list[timedelta]:
    """When each attempt ran, relative to the first failure, to the minute (activities start a
    few milliseconds after their timer fires)."""
    return [
        timedelta(minutes=round((a.created_at - first_failure_at) / timedelta(minutes=1)))
        for a in attempts
    ]


async def first_anchor(harness: BillingHarness) -> datetime:
    """A billing anchor one day ahead, on the hour."""
    now = await harness.now()
    return now.replace(minute=0, second=0, microsecond=0) + DAY


@BOTH_BACKENDS
async def test_card_update_on_day_4_recovers_dunning_without_moving_the_billing_date(
    harness: BillingHarness,
) -> None:
    anchor = await first_anchor(harness)
    sub = await harness.signup("basic-monthly", card=SUCCEEDS, billing_anchor_at=anchor)
    await harness.advance_to(anchor + relativedelta(months=2) - timedelta(hours=1))
    assert len(harness.snapshot(sub.subscription_id).invoices) == 2

    # Month 3: the bank starts declining the card.
    await harness.to_thread_switch_card(sub.customer_id, DECLINES_AFTER_ATTACH)
    third_billing = anchor + relativedelta(months=2)
    await harness.advance_to(third_billing + timedelta(hours=1))
    state = await harness.state(sub.subscription_id)
    assert state.status == SubscriptionStatus.PAST_DUE
    assert state.open_invoice is not None and state.open_invoice.attempts == 1
    first_failure = state.open_invoice.first_failure_at
    assert first_failure is not None
    assert third_billing <= first_failure < third_billing + timedelta(seconds=30)
    assert state.open_invoice.next_retry_at == first_failure + DAY

    # Retries on day 1 and day 3 also fail.
    await harness.advance_to(first_failure + 4 * DAY)
    state = await harness.state(sub.subscription_id)
    assert state.open_invoice is not None and state.open_invoice.attempts == 3

    # Day 4: the customer enters a working card; the open invoice is retried at once.
    result: UpdatePaymentMethodResult = await harness.update(
        sub.subscription_id,
        SubscriptionMessage.UPDATE_PAYMENT_METHOD,
        UpdatePaymentMethodInput(payment_method_id=await harness.to_thread_card(SUCCEEDS)),
        UpdatePaymentMethodResult,
    )
    assert result.retry_scheduled
    state = await harness.wait_for(sub.subscription_id, lambda v: v.open_invoice is None)
    assert state.status == SubscriptionStatus.ACTIVE
    assert state.next_billing_at == anchor + relativedelta(months=3)  # not moved

    snap = harness.snapshot(sub.subscription_id)
    third = snap.invoices[2]
    assert third.status == InvoiceStatus.PAID and third.amount_paid_minor == 900
    attempts = snap.attempts[third.id]
    assert [a.attempt_number for a in attempts] == [1, 2, 3, 4]
    assert [a.status for a in attempts] == ["failed", "failed", "failed", "succeeded"]
    assert attempt_offsets(attempts, first_failure) == [timedelta(0), 1 * DAY, 3 * DAY, 4 * DAY]
    assert attempts[3].reason == "payment_method_updated"
    assert len({a.idempotency_key for a in attempts}) == 4
    assert len(snap.payments[third.id]) == 1
    kinds = [n.kind for n in snap.notifications if n.invoice_id == third.id]
    assert kinds.count(NoticeKind.PAYMENT_FAILED) == 3
    assert kinds.count(NoticeKind.PAYMENT_SUCCEEDED_AFTER_FAILURE) == 1

    # Billing carries on on the original anchor.
    await harness.advance_to(anchor + relativedelta(months=3) + timedelta(hours=1))
    snap = harness.snapshot(sub.subscription_id)
    assert [i.period_start for i in snap.invoices][-1] == anchor + relativedelta(months=3)
    assert snap.invoices[-1].status == InvoiceStatus.PAID


async def test_exhausted_dunning_cancels_and_writes_the_invoice_off(
    harness: BillingHarness,
) -> None:
    anchor = await first_anchor(harness)
    sub = await harness.signup(
        "basic-monthly", card=DECLINES_AFTER_ATTACH, billing_anchor_at=anchor
    )
    await harness.advance_to(anchor + 15 * DAY)

    snap = harness.snapshot(sub.subscription_id)
    assert len(snap.invoices) == 1
    invoice = snap.invoices[0]
    assert invoice.status == InvoiceStatus.UNCOLLECTIBLE
    assert invoice.amount_paid_minor == 0
    attempts = snap.attempts[invoice.id]
    # Stripe's recommendation: 8 tries within 2 weeks, at the policy's offsets.
    assert attempt_offsets(attempts, anchor) == [timedelta(0)] + [
        d * DAY for d in DEFAULT_RETRY_OFFSETS_DAYS
    ]
    assert {a.status for a in attempts} == {"failed"}
    assert snap.payments[invoice.id] == []
    assert snap.subscription.status == SubscriptionStatus.CANCELED
    assert snap.subscription.ended_at is not None
    assert abs(snap.subscription.ended_at - (anchor + 14 * DAY)) < timedelta(minutes=1)
    kinds = [n.kind for n in snap.notifications]
    assert kinds.count(NoticeKind.PAYMENT_FAILED) == 8
    assert kinds.count(NoticeKind.SUBSCRIPTION_CANCELED) == 1
    assert harness.provider_charges(sub.subscription_id) == [] or all(
        not c["paid"] for c in harness.provider_charges(sub.subscription_id)
    )
    assert (await harness.handle(sub.subscription_id).result())["status"] == "canceled"


async def test_exhausted_dunning_can_mark_unpaid_and_a_new_card_reactivates(
    harness: BillingHarness,
) -> None:
    harness.add_plan(
        Plan(
            "strict-monthly",
            "Strict",
            1500,
            "USD",
            IntervalUnit.MONTH,
            dunning=DunningPolicy([2, 4], FinalAction.MARK_UNPAID),
        )
    )
    anchor = await first_anchor(harness)
    sub = await harness.signup(
        "strict-monthly", card=DECLINES_AFTER_ATTACH, billing_anchor_at=anchor
    )
    await harness.advance_to(anchor + relativedelta(months=2) + DAY)

    snap = harness.snapshot(sub.subscription_id)
    assert snap.subscription.status == SubscriptionStatus.UNPAID
    assert [i.status for i in snap.invoices] == [InvoiceStatus.UNCOLLECTIBLE]  # no new invoices
    assert len(snap.attempts[snap.invoices[0].id]) == 3
    assert (await harness.state(sub.subscription_id)).next_billing_at is None

    await harness.update(
        sub.subscription_id,
        SubscriptionMessage.UPDATE_PAYMENT_METHOD,
        UpdatePaymentMethodInput(payment_method_id=await harness.to_thread_card(SUCCEEDS)),
        UpdatePaymentMethodResult,
    )
    state = await harness.state(sub.subscription_id)
    assert state.status == SubscriptionStatus.ACTIVE
    # Billing restarts on the anchor's next date; the written-off invoice stays written off.
    assert state.next_billing_at == anchor + relativedelta(months=3)
    await harness.advance_to(anchor + relativedelta(months=3) + timedelta(hours=1))
    snap = harness.snapshot(sub.subscription_id)
    assert [i.status for i in snap.invoices] == [InvoiceStatus.UNCOLLECTIBLE, InvoiceStatus.PAID]


async def test_hard_decline_is_not_retried_until_the_payment_method_changes(
    stolen_card_harness: BillingHarness,
) -> None:
    harness = stolen_card_harness
    anchor = await first_anchor(harness)
    sub = await harness.signup(
        "basic-monthly", card=DECLINES_AFTER_ATTACH, billing_anchor_at=anchor
    )
    await harness.advance_to(anchor + 10 * DAY)

    state = await harness.state(sub.subscription_id)
    assert state.open_invoice is not None
    assert state.open_invoice.attempts == 1  # no retries on a stolen card
    assert state.open_invoice.blocked == "hard_decline"
    assert state.open_invoice.last_decline_code == "stolen_card"
    assert state.open_invoice.next_retry_at is None
    assert state.status == SubscriptionStatus.PAST_DUE
    notices = [n for n in harness.snapshot(sub.subscription_id).notifications]
    assert [n.kind for n in notices] == [NoticeKind.PAYMENT_FAILED]
    assert notices[0].payload["hard_decline"] is True

    await harness.update(
        sub.subscription_id,
        SubscriptionMessage.UPDATE_PAYMENT_METHOD,
        UpdatePaymentMethodInput(payment_method_id=await harness.to_thread_card(SUCCEEDS)),
        UpdatePaymentMethodResult,
    )
    state = await harness.wait_for(sub.subscription_id, lambda v: v.open_invoice is None)
    assert state.status == SubscriptionStatus.ACTIVE
    snap = harness.snapshot(sub.subscription_id)
    assert [a.status for a in snap.attempts[snap.invoices[0].id]] == ["failed", "succeeded"]


async def test_hard_decline_nobody_fixes_reaches_the_final_action_at_the_window_end(
    stolen_card_harness: BillingHarness,
) -> None:
    harness = stolen_card_harness
    anchor = await first_anchor(harness)
    sub = await harness.signup(
        "basic-monthly", card=DECLINES_AFTER_ATTACH, billing_anchor_at=anchor
    )
    await harness.advance_to(anchor + 15 * DAY)
    snap = harness.snapshot(sub.subscription_id)
    assert len(snap.attempts[snap.invoices[0].id]) == 1
    assert snap.invoices[0].status == InvoiceStatus.UNCOLLECTIBLE
    assert snap.subscription.status == SubscriptionStatus.CANCELED
    assert snap.subscription.ended_at is not None
    assert abs(snap.subscription.ended_at - (anchor + 14 * DAY)) < timedelta(minutes=1)


async def test_authentication_required_sends_a_notice_and_waits_for_the_customer(
    harness: BillingHarness,
) -> None:
    anchor = await first_anchor(harness)
    sub = await harness.signup(
        "basic-monthly", card=REQUIRES_AUTHENTICATION, billing_anchor_at=anchor
    )
    await harness.advance_to(anchor + 5 * DAY)
    state = await harness.state(sub.subscription_id)
    assert state.open_invoice is not None
    assert state.open_invoice.blocked == "authentication_required"
    assert state.open_invoice.attempts == 1  # off-session retries cannot authenticate
    snap = harness.snapshot(sub.subscription_id)
    assert [n.kind for n in snap.notifications] == [NoticeKind.ACTION_REQUIRED]
    assert snap.notifications[0].payload["payment_intent_id"]
    assert snap.attempts[snap.invoices[0].id][0].status == "requires_action"
