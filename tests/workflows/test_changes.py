"""Changes a subscription takes while it runs: cancel (at period end, immediately, twice),
pause and resume. Real workflow and activities on the time-skipping server."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from dateutil.relativedelta import relativedelta
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowUpdateFailedError

from billing.contracts import (
    CancelInput,
    CancelResult,
    NoticeKind,
    PauseInput,
    PauseResult,
    ResumeInput,
    ResumeResult,
    SubscriptionMessage,
)
from billing.invoices import InvoiceStatus
from billing.notices import NoticeKind as MailKind
from billing.subscription import SubscriptionStatus
from billing.testing.cards import DECLINES_AFTER_ATTACH, SUCCEEDS
from billing.testing.harness import BillingHarness

DAY = timedelta(days=1)


async def first_anchor(harness: BillingHarness) -> datetime:
    now = await harness.now()
    return now.replace(minute=0, second=0, microsecond=0) + DAY


async def cancel(harness: BillingHarness, sub_id: str, *, at_period_end: bool) -> CancelResult:
    result: CancelResult = await harness.update(
        sub_id,
        SubscriptionMessage.CANCEL,
        CancelInput(at_period_end=at_period_end, reason="customer asked"),
        CancelResult,
    )
    return result


def refusal(error: pytest.ExceptionInfo[WorkflowUpdateFailedError]) -> str:
    return str(error.value.cause.message)  # type: ignore[union-attr]


async def test_cancel_at_period_end_bills_nothing_more_and_ends_at_the_period_end(
    harness: BillingHarness,
) -> None:
    anchor = await first_anchor(harness)
    sub = await harness.signup("basic-monthly", card=SUCCEEDS, billing_anchor_at=anchor)
    await harness.advance_to(anchor + 10 * DAY)

    result = await cancel(harness, sub.subscription_id, at_period_end=True)
    period_end = anchor + relativedelta(months=1)
    assert result.cancel_at_period_end and result.ends_at == period_end
    state = await harness.state(sub.subscription_id)
    assert state.status == SubscriptionStatus.ACTIVE  # until the period ends
    assert state.next_billing_at is None

    await harness.advance_to(anchor + relativedelta(months=3))
    snap = harness.snapshot(sub.subscription_id)
    assert len(snap.invoices) == 1 and snap.invoices[0].status == InvoiceStatus.PAID
    assert snap.subscription.status == SubscriptionStatus.CANCELED
    assert snap.subscription.ended_at == period_end
    assert snap.subscription.cancel_at_period_end
    # The paid period's receipt, then the cancellation.
    assert [n.kind for n in snap.notifications] == [
        MailKind.RECEIPT,
        NoticeKind.SUBSCRIPTION_CANCELED,
    ]
    assert (await harness.handle(sub.subscription_id).result())["status"] == "canceled"


async def test_cancel_immediately_during_dunning_voids_the_open_invoice(
    harness: BillingHarness,
) -> None:
    anchor = await first_anchor(harness)
    sub = await harness.signup(
        "basic-monthly", card=DECLINES_AFTER_ATTACH, billing_anchor_at=anchor
    )
    await harness.advance_to(anchor + 2 * DAY)
    state = await harness.state(sub.subscription_id)
    assert state.open_invoice is not None
    open_invoice_id = state.open_invoice.invoice_id

    result = await cancel(harness, sub.subscription_id, at_period_end=False)
    assert result.status == SubscriptionStatus.CANCELED
    assert result.voided_invoice_id == open_invoice_id

    await harness.advance(30 * DAY)  # no more retries, no more invoices
    snap = harness.snapshot(sub.subscription_id)
    assert [i.status for i in snap.invoices] == [InvoiceStatus.VOID]
    assert snap.invoices[0].voided_at is not None
    assert len(snap.attempts[open_invoice_id]) == 2  # first try + day-1 retry, none after
    assert snap.subscription.status == SubscriptionStatus.CANCELED
    assert snap.subscription.ended_at == result.ends_at


async def test_cancelling_twice_is_refused_with_a_reason(harness: BillingHarness) -> None:
    anchor = await first_anchor(harness)
    sub = await harness.signup("basic-monthly", card=SUCCEEDS, billing_anchor_at=anchor)
    await harness.advance_to(anchor + DAY)
    await cancel(harness, sub.subscription_id, at_period_end=True)

    with pytest.raises(WorkflowUpdateFailedError) as refused:
        await cancel(harness, sub.subscription_id, at_period_end=True)
    assert "already set to cancel at period end" in refusal(refused)

    # Cancelling now is still possible; after that, any cancel is refused.
    result = await cancel(harness, sub.subscription_id, at_period_end=False)
    assert result.status == SubscriptionStatus.CANCELED
    snap = harness.snapshot(sub.subscription_id)
    assert [i.status for i in snap.invoices] == [InvoiceStatus.PAID]  # paid stays paid


async def test_refused_change_is_rejected_before_it_is_accepted(harness: BillingHarness) -> None:
    sub = await harness.signup("basic-monthly", card=SUCCEEDS)
    # The first period is billed and paid; the workflow sleeps until the next one.
    await harness.wait_for(
        sub.subscription_id,
        lambda v: v.invoices_issued == 1 and v.open_invoice is None and v.status == "active",
    )
    with pytest.raises(WorkflowUpdateFailedError) as refused:
        await harness.update(
            sub.subscription_id, SubscriptionMessage.RESUME, ResumeInput(), ResumeResult
        )
    assert "not paused" in refusal(refused)
    # The validator rejected it: no update was accepted into history, so nothing ran.
    history = await harness.handle(sub.subscription_id).fetch_history()
    assert not [
        e
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED
    ]
    assert (await harness.state(sub.subscription_id)).status == SubscriptionStatus.ACTIVE


async def test_pause_skips_billing_and_resume_keeps_the_anchor(harness: BillingHarness) -> None:
    anchor = await first_anchor(harness)
    sub = await harness.signup("basic-monthly", card=SUCCEEDS, billing_anchor_at=anchor)
    await harness.advance_to(anchor + 5 * DAY)

    paused: PauseResult = await harness.update(
        sub.subscription_id, SubscriptionMessage.PAUSE, PauseInput(), PauseResult
    )
    assert paused.status == SubscriptionStatus.PAUSED
    with pytest.raises(WorkflowUpdateFailedError) as refused:
        await harness.update(
            sub.subscription_id, SubscriptionMessage.PAUSE, PauseInput(), PauseResult
        )
    assert "already paused" in refusal(refused)

    # Two and a half months paused: no invoices.
    resume_at = anchor + relativedelta(months=2, days=20)
    await harness.advance_to(resume_at)
    assert len(harness.snapshot(sub.subscription_id).invoices) == 1
    assert harness.snapshot(sub.subscription_id).subscription.status == SubscriptionStatus.PAUSED

    resumed: ResumeResult = await harness.update(
        sub.subscription_id, SubscriptionMessage.RESUME, ResumeInput(), ResumeResult
    )
    assert resumed.status == SubscriptionStatus.ACTIVE
    # Billing restarts on the anchor's next date, not on the resume date.
    assert resumed.next_billing_at == anchor + relativedelta(months=3)

    await harness.advance_to(anchor + relativedelta(months=4) + DAY)
    snap = harness.snapshot(sub.subscription_id)
    assert [i.period_start for i in snap.invoices] == [
        anchor,
        anchor + relativedelta(months=3),
        anchor + relativedelta(months=4),
    ]
    assert all(i.status == InvoiceStatus.PAID for i in snap.invoices)
    assert snap.subscription.paused_at is None


async def test_pause_is_refused_while_an_invoice_is_past_due(harness: BillingHarness) -> None:
    anchor = await first_anchor(harness)
    sub = await harness.signup(
        "basic-monthly", card=DECLINES_AFTER_ATTACH, billing_anchor_at=anchor
    )
    await harness.advance_to(anchor + DAY / 2)
    with pytest.raises(WorkflowUpdateFailedError) as refused:
        await harness.update(
            sub.subscription_id, SubscriptionMessage.PAUSE, PauseInput(), PauseResult
        )
    assert "unpaid invoice" in refusal(refused)
    assert (await harness.state(sub.subscription_id)).status == SubscriptionStatus.PAST_DUE
