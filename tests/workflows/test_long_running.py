"""Years of billing: continue-as-new keeps every run's history bounded, past the test server's
10-year default run timeout."""

from __future__ import annotations

from datetime import timedelta

from dateutil.relativedelta import relativedelta
from temporalio.api.enums.v1 import EventType

from billing.invoices import InvoiceStatus
from billing.testing.cards import SUCCEEDS
from billing.testing.harness import BillingHarness

#: Events one run may hold. A run bills at most 12 periods (DEFAULT_PERIODS_PER_RUN) at about
#: 34 events each (timer, create, charge, settle, sync; see scripts/history_cost.py), plus a
#: dunning episode's ~140; 1,000 stays ten times under the server's 10,240-event warning.
MAX_EVENTS_PER_RUN = 1000


async def test_ten_years_of_monthly_billing_continues_as_new_with_bounded_history(
    harness: BillingHarness,
) -> None:
    now = await harness.now()
    anchor = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    sub = await harness.signup("basic-monthly", card=SUCCEEDS, billing_anchor_at=anchor)

    await harness.advance_to(anchor + relativedelta(years=10) - timedelta(days=1))

    snap = harness.snapshot(sub.subscription_id)
    assert len(snap.invoices) == 120
    assert [i.period_start for i in snap.invoices] == [
        anchor + relativedelta(months=k) for k in range(120)
    ]
    assert all(i.status == InvoiceStatus.PAID for i in snap.invoices)
    assert sum(i.amount_paid_minor for i in snap.invoices) == 120 * 900
    assert len({i.number for i in snap.invoices}) == 120
    assert sum(len(p) for p in snap.payments.values()) == 120

    state = await harness.state(sub.subscription_id)
    assert state.invoices_issued == 120
    assert state.next_billing_at == anchor + relativedelta(months=120)

    runs = await harness.run_histories(sub.subscription_id)
    assert 10 <= len(runs) <= 11  # a run per 12 billed periods
    sizes = [len(r.events) for r in runs]
    assert max(sizes) <= MAX_EVENTS_PER_RUN, sizes
    continued = [
        r
        for r in runs
        if r.events[-1].event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW
    ]
    assert len(continued) == len(runs) - 1  # every run but the live one continued as new
