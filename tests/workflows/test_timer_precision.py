"""The billing timer against the clocks around it, with the real workflow on the time-skipping
server: a worker whose clock runs ahead of Temporal's never bills before the billing instant
(its timer counts from the local activity's clock, fires early, and the workflow sleeps the
rest by Temporal's clock)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from temporalio.api.enums.v1 import EventType

from billing.contracts import workflow_id_for
from billing.testing.cards import SUCCEEDS
from billing.testing.harness import BillingHarness

AHEAD = timedelta(seconds=5)


async def billing_timers(harness: BillingHarness, subscription_id: str) -> list[datetime]:
    """When each timer of the run fired, by Temporal's clock."""
    handle = harness.client.get_workflow_handle(workflow_id_for(subscription_id))
    return [
        event.event_time.ToDatetime(tzinfo=UTC)
        async for event in handle.fetch_history_events()
        if event.event_type == EventType.EVENT_TYPE_TIMER_FIRED
    ]


async def test_a_worker_clock_ahead_of_temporal_never_bills_before_the_anchor(
    harness: BillingHarness,
) -> None:
    activity_clock = harness.clock.now
    harness.clock.now = lambda: activity_clock() + AHEAD  # type: ignore[method-assign]
    anchor = (await harness.now()).replace(microsecond=0) + timedelta(days=3)
    sub = await harness.signup("basic-monthly", card=SUCCEEDS, billing_anchor_at=anchor)
    await harness.advance_to(anchor + timedelta(hours=1))

    snap = harness.snapshot(sub.subscription_id)
    [invoice] = snap.invoices
    assert invoice.period_start == anchor
    # Issued at the workflow's clock when it billed: not before the anchor.
    assert invoice.created_at >= anchor, (invoice.created_at, anchor)
    fired = await billing_timers(harness, sub.subscription_id)
    # The first timer counted from the clock 5 s ahead and fired before the anchor; the
    # workflow then slept the rest and billed at the anchor itself.
    assert len(fired) == 2, fired
    assert anchor - AHEAD - timedelta(seconds=1) <= fired[0] < anchor, fired
    assert anchor <= fired[1] < anchor + timedelta(seconds=1), fired
