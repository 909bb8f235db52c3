"""A renewal invoice written by a workflow task that was then discarded, on the real workflow.

``create_invoice`` runs as a local activity inside the workflow task that decides the period's
invoice; if that task is discarded (worker killed, server restarted) its row stays, and the
task that replaces it may decide otherwise. Each test writes that row itself, exactly as the
lost task's local activity did (the real activity, at the renewal's terms), then lets the
workflow decide otherwise, and checks what the customer is billed:

- a plan change applied first: the period is billed at the new price, not the amount first
  written (before: the lost row was adopted, and the customer charged the old price);
- a pause or an interval change applied first: the period is never billed, and the lost row
  is voided instead of staying open for good, a receivable nobody owes.

Real workflow, activities, localstripe and database (both backends), time-skipping server."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from dateutil.relativedelta import relativedelta

from activities.billing import BillingActivities
from billing.contracts import (
    ChangePlanInput,
    ChangePlanResult,
    CreateInvoiceInput,
    CreateInvoiceResult,
    PauseInput,
    PauseResult,
    SubscriptionMessage,
)
from billing.invoices import InvoiceStatus
from billing.plans import DEMO_PLANS
from billing.testing.cards import SUCCEEDS
from billing.testing.harness import BillingHarness
from db.repositories import events as events_repo
from tests.conftest import BOTH_BACKENDS

DAY = timedelta(days=1)
PLANS = {p.code: p for p in DEMO_PLANS}
BASIC, PRO, ANNUAL = PLANS["basic-monthly"], PLANS["pro-monthly"], PLANS["pro-annual"]


async def signed_up(harness: BillingHarness) -> tuple[str, str, datetime]:
    now = await harness.now()
    anchor = now.replace(minute=0, second=0, microsecond=0) + DAY
    sub = await harness.signup("basic-monthly", card=SUCCEEDS, billing_anchor_at=anchor)
    await harness.advance_to(anchor + timedelta(hours=1))
    await harness.wait_for(sub.subscription_id, lambda v: v.open_invoice is None)
    return sub.subscription_id, sub.customer_id, anchor


def lost_tasks_write(
    harness: BillingHarness, sub_id: str, customer_id: str, renewal_at: datetime
) -> CreateInvoiceResult:
    """What the discarded task's ``create_invoice`` wrote: the renewal at the basic plan."""
    activities = BillingActivities(
        harness.session_factory, harness.deps.gateway, harness.deps.clock
    )
    return activities.create_invoice(
        CreateInvoiceInput(
            subscription_id=sub_id,
            customer_id=customer_id,
            plan_code=BASIC.code,
            period_index=1,
            period_start=renewal_at,
            period_end=renewal_at + relativedelta(months=1),
            amount_minor=BASIC.amount_minor,
            currency=BASIC.currency,
            description=BASIC.name,
            issued_at=renewal_at,
            quantity=1,
            unit_amount_minor=BASIC.amount_minor,
        )
    )


def succeeded_charges(harness: BillingHarness, sub_id: str) -> list[int]:
    return sorted(
        c["amount"] for c in harness.provider_charges(sub_id) if c["status"] == "succeeded"
    )


def voided_events(harness: BillingHarness, sub_id: str) -> list[str]:
    with harness.session_factory() as session:
        found = events_repo.list_events(session, limit=500, type="invoice.voided")
    return [e.object_id for e in found if e.subscription_id == sub_id]


@BOTH_BACKENDS
async def test_a_change_applied_before_the_lost_renewal_bills_the_period_at_the_new_price(
    harness: BillingHarness,
) -> None:
    sub_id, customer_id, anchor = await signed_up(harness)
    renewal_at = anchor + relativedelta(months=1)
    lost = lost_tasks_write(harness, sub_id, customer_id, renewal_at)
    assert lost.amount_due_minor == BASIC.amount_minor

    await harness.advance_to(anchor + 20 * DAY)
    result: ChangePlanResult = await harness.handle(sub_id).execute_update(
        SubscriptionMessage.CHANGE_PLAN,
        ChangePlanInput(plan=PRO, effective="period_end"),
        result_type=ChangePlanResult,
    )
    assert result.pending
    await harness.advance_to(renewal_at + timedelta(hours=1))
    await harness.wait_for(sub_id, lambda v: v.invoices_issued >= 2 and v.open_invoice is None)

    snap = harness.snapshot(sub_id)
    period = [i for i in snap.invoices if i.period_start == renewal_at]
    by_id = {i.id: i for i in period}
    assert by_id[lost.invoice_id].status == InvoiceStatus.VOID
    assert by_id[lost.invoice_id].status_reason == "superseded"
    billed = [i for i in period if i.id != lost.invoice_id]
    assert [(i.status, i.amount_due_minor) for i in billed] == [(InvoiceStatus.PAID, 2900)]
    # The customer paid the first period at basic and the renewal at pro, each once.
    assert succeeded_charges(harness, sub_id) == sorted([BASIC.amount_minor, PRO.amount_minor])
    assert voided_events(harness, sub_id) == [lost.invoice_id]


@BOTH_BACKENDS
@pytest.mark.parametrize("decision", ["pause", "annual_now"])
async def test_a_lost_renewal_the_workflow_never_bills_is_voided(
    harness: BillingHarness, decision: str
) -> None:
    sub_id, customer_id, anchor = await signed_up(harness)
    renewal_at = anchor + relativedelta(months=1)
    lost = lost_tasks_write(harness, sub_id, customer_id, renewal_at)

    await harness.advance_to(anchor + 20 * DAY)
    if decision == "pause":
        await harness.update(sub_id, SubscriptionMessage.PAUSE, PauseInput(), PauseResult)
    else:
        # Re-anchored now: the renewal at the old anchor never comes.
        await harness.handle(sub_id).execute_update(
            SubscriptionMessage.CHANGE_PLAN,
            ChangePlanInput(plan=ANNUAL),
            result_type=ChangePlanResult,
        )
        await harness.wait_for(sub_id, lambda v: v.open_invoice is None)
    await harness.advance_to(renewal_at + 5 * DAY)

    snap = harness.snapshot(sub_id)
    swept = next(i for i in snap.invoices if i.id == lost.invoice_id)
    assert (swept.status, swept.status_reason) == (InvoiceStatus.VOID, "superseded")
    assert [i for i in snap.invoices if i.status == InvoiceStatus.OPEN] == []
    assert not snap.attempts.get(lost.invoice_id)
    assert voided_events(harness, sub_id) == [lost.invoice_id]
