"""Plan and quantity changes on the running workflow: the real workflow and activities on the
time-skipping server, localstripe and a real database (both backends where it matters)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from dateutil.relativedelta import relativedelta
from temporalio.client import WorkflowUpdateFailedError

from activities.billing import BillingActivities
from billing import reporting, reports
from billing.contracts import (
    CancelPendingChangeInput,
    CancelPendingChangeResult,
    ChangePlanInput,
    ChangePlanResult,
    ChangePreview,
    CreateChangeInvoiceInput,
    PreviewChangeInput,
    SubscriptionMessage,
    UpdatePaymentMethodInput,
    UpdatePaymentMethodResult,
    idempotency_key_for,
)
from billing.invoices import InvoiceLineKind, InvoiceStatus
from billing.plans import DEMO_PLANS, Plan
from billing.proration import Terms, prorate
from billing.reports import Month
from billing.subscription import SubscriptionStatus
from billing.testing.cards import DECLINES_AFTER_ATTACH, SUCCEEDS
from billing.testing.harness import BillingHarness
from db.engine import unit_of_work
from db.repositories import balances as balances_repo
from db.repositories import invoices as invoices_repo
from db.repositories import subscriptions as subscriptions_repo
from tests.conftest import BOTH_BACKENDS

DAY = timedelta(days=1)
PLANS = {p.code: p for p in DEMO_PLANS}
BASIC, PRO, ANNUAL = PLANS["basic-monthly"], PLANS["pro-monthly"], PLANS["pro-annual"]
PAYMENT_INTENTS = "/v1/payment_intents"


async def signed_up(harness: BillingHarness, card: str = SUCCEEDS) -> tuple[str, datetime]:
    now = await harness.now()
    anchor = now.replace(minute=0, second=0, microsecond=0) + DAY
    sub = await harness.signup("basic-monthly", card=card, billing_anchor_at=anchor)
    await harness.advance_to(anchor + timedelta(hours=1))
    await harness.wait_for(sub.subscription_id, lambda v: v.invoices_issued == 1)
    return sub.subscription_id, anchor


async def change(
    harness: BillingHarness, sub_id: str, *, update_id: str | None = None, **fields: Any
) -> ChangePlanResult:
    await harness.now()
    result: ChangePlanResult = await harness.handle(sub_id).execute_update(
        SubscriptionMessage.CHANGE_PLAN,
        ChangePlanInput(**fields),
        id=update_id,
        result_type=ChangePlanResult,
    )
    return result


async def preview(harness: BillingHarness, sub_id: str, **fields: Any) -> ChangePreview:
    at = await harness.now()
    answer: ChangePreview = await harness.handle(sub_id).query(
        SubscriptionMessage.PREVIEW_CHANGE,
        PreviewChangeInput(change=ChangePlanInput(**fields), at=at),
        result_type=ChangePreview,
    )
    return answer


def succeeded_charges(harness: BillingHarness, sub_id: str) -> list[int]:
    return sorted(
        c["amount"] for c in harness.provider_charges(sub_id) if c["status"] == "succeeded"
    )


def lines_of(harness: BillingHarness, invoice_id: str) -> list[tuple[InvoiceLineKind, int]]:
    with unit_of_work(harness.session_factory) as session:
        return [
            (li.kind, li.amount_minor)
            for li in invoices_repo.list_invoice_lines(session, invoice_id)
        ]


def expected(old: Plan, new: Plan, start: datetime, end: datetime, at: datetime) -> list[int]:
    p = prorate(
        old=Terms(old.code, old.name, old.amount_minor, 1, old.currency),
        new=Terms(new.code, new.name, new.amount_minor, 1, new.currency),
        period_start=start,
        period_end=end,
        at=at,
        credit_cap_minor=old.amount_minor,
        change_id="x",
    )
    return [line.amount_minor for line in p.lines]


@BOTH_BACKENDS
async def test_an_upgrade_now_is_previewed_invoiced_and_charged_exactly_once(
    harness: BillingHarness,
) -> None:
    sub_id, anchor = await signed_up(harness)
    await harness.advance_to(anchor + 15 * DAY + timedelta(hours=3))

    shown = await preview(harness, sub_id, plan=PRO)
    assert shown.refused is None and shown.invoice_now and shown.effective == "now"
    result = await change(harness, sub_id, plan=PRO, update_id="upgrade-1")
    # The preview and the change come from the same decision: the same lines.
    assert [(li.amount_minor, li.period_end) for li in result.lines] == [
        (li.amount_minor, li.period_end) for li in shown.lines
    ]
    period_end = anchor + relativedelta(months=1)
    amounts = [li.amount_minor for li in result.lines]
    assert amounts == expected(BASIC, PRO, anchor, period_end, result.effective_at)
    assert amounts[0] < 0 < amounts[1]
    assert result.invoice_id is not None and result.amount_due_minor == sum(amounts)

    state = await harness.wait_for(sub_id, lambda v: v.open_invoice is None)
    assert (state.plan_code, state.amount_minor, state.status) == ("pro-monthly", 2900, "active")
    # The same update again (a retried request): the same answer, nothing more billed.
    again = await change(harness, sub_id, plan=PRO, update_id="upgrade-1")
    assert again.invoice_id == result.invoice_id
    assert succeeded_charges(harness, sub_id) == sorted([900, sum(amounts)])

    snap = harness.snapshot(sub_id)
    assert snap.subscription.plan_code == "pro-monthly"
    assert snap.subscription.amount_minor == 2900
    change_invoice = next(i for i in snap.invoices if i.change_id is not None)
    assert change_invoice.status == InvoiceStatus.PAID
    assert lines_of(harness, change_invoice.id) == [
        (InvoiceLineKind.PRORATION, amounts[0]),
        (InvoiceLineKind.PRORATION, amounts[1]),
    ]

    # The next renewal bills the new price, whole.
    await harness.advance_to(period_end + timedelta(hours=1))
    await harness.wait_for(sub_id, lambda v: v.invoices_issued == 3 and v.open_invoice is None)
    assert succeeded_charges(harness, sub_id) == sorted([900, sum(amounts), 2900])

    # Nothing to change, another currency, an unknown word: refused, nothing written.
    before = harness.snapshot(sub_id)
    for fields, reason in (
        ({"plan": PRO}, "nothing to change"),
        ({"plan": PLANS["team-weekly"]}, "currency cannot change"),
        ({"quantity": 0}, "quantity must be between"),
        ({"quantity": 2, "effective": "tomorrow"}, "effective must be one of"),
    ):
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            await change(harness, sub_id, **fields)
        assert reason in str(refused.value.cause), fields
    after = harness.snapshot(sub_id)
    assert (after.invoices, after.subscription) == (before.invoices, before.subscription)


async def test_a_charge_answer_lost_during_the_upgrade_is_not_charged_twice(
    harness: BillingHarness,
) -> None:
    sub_id, anchor = await signed_up(harness)
    await harness.advance_to(anchor + 10 * DAY)
    # The change invoice's charge reaches Stripe, then the answer is lost (as if the worker
    # died before reading it): Temporal re-runs the attempt under the same key.
    harness.http_client.drop_responses(PAYMENT_INTENTS, retryable=False)
    result = await change(harness, sub_id, quantity=3)
    assert result.invoice_id is not None
    await harness.wait_for(sub_id, lambda v: v.open_invoice is None)
    key = idempotency_key_for(result.invoice_id, 1)
    sent = [r for r in harness.http_client.requests_to(PAYMENT_INTENTS) if r.idempotency_key == key]
    assert [r.response_dropped for r in sent] == [True, False]

    # Issuing the change's invoice again (a re-run activity) finds the same invoice.
    activity = BillingActivities(
        harness.session_factory, harness.deps.gateway, harness.deps.clock
    ).create_change_invoice
    snap = harness.snapshot(sub_id)
    invoice = next(i for i in snap.invoices if i.change_id is not None)
    again = activity(
        CreateChangeInvoiceInput(
            subscription_id=sub_id,
            customer_id=snap.subscription.customer_id,
            change_id=result.change_id,
            period_index=0,
            period_start=invoice.period_start,
            period_end=invoice.period_end,
            currency="USD",
            description="again",
            issued_at=invoice.created_at,
            lines=list(result.lines),
        )
    )
    assert (again.invoice_id, again.created) == (invoice.id, False)
    assert len(harness.snapshot(sub_id).invoices) == 2
    assert snap.subscription.quantity == 3


@BOTH_BACKENDS
async def test_a_downgrade_waits_for_the_renewal_and_can_be_canceled_until_then(
    harness: BillingHarness,
) -> None:
    sub_id, anchor = await signed_up(harness)
    await change(harness, sub_id, plan=PRO)  # now, prorated
    await harness.wait_for(sub_id, lambda v: v.open_invoice is None)
    await harness.advance_to(anchor + 20 * DAY)

    scheduled = await change(harness, sub_id, plan=BASIC)  # a downgrade: period end
    period_end = anchor + relativedelta(months=1)
    assert scheduled.pending and scheduled.effective == "period_end"
    assert scheduled.effective_at == period_end and scheduled.lines == []
    state = await harness.state(sub_id)
    assert state.pending_change is not None and state.pending_change.plan_code == "basic-monthly"
    with pytest.raises(WorkflowUpdateFailedError) as second:
        await change(harness, sub_id, quantity=2)
    assert "already has a change pending" in str(second.value.cause)

    await harness.advance_to(period_end + timedelta(hours=1))
    state = await harness.wait_for(sub_id, lambda v: v.invoices_issued == 3 and not v.open_invoice)
    assert (state.plan_code, state.pending_change) == ("basic-monthly", None)
    renewal = harness.snapshot(sub_id).invoices[-1]
    assert (renewal.period_start, renewal.amount_due_minor) == (period_end, 900)
    assert renewal.change_id is None

    # Scheduled again, then canceled: the renewal keeps the price.
    await change(harness, sub_id, quantity=1, plan=PRO, effective="period_end")
    canceled: CancelPendingChangeResult = await harness.update(
        sub_id,
        SubscriptionMessage.CANCEL_PENDING_CHANGE,
        CancelPendingChangeInput(),
        CancelPendingChangeResult,
    )
    assert canceled.plan_code == "pro-monthly"
    await harness.advance_to(period_end + relativedelta(months=1) + timedelta(hours=1))
    await harness.wait_for(sub_id, lambda v: v.invoices_issued == 4 and not v.open_invoice)
    assert harness.snapshot(sub_id).invoices[-1].amount_due_minor == 900


@BOTH_BACKENDS
async def test_a_change_during_dunning_adjusts_the_unpaid_renewal_instead_of_crediting(
    harness: BillingHarness,
) -> None:
    sub_id, anchor = await signed_up(harness, card=DECLINES_AFTER_ATTACH)
    await harness.advance_to(anchor + 2 * DAY)
    state = await harness.state(sub_id)
    assert state.status == SubscriptionStatus.PAST_DUE and state.open_invoice is not None
    renewal_id = state.open_invoice.invoice_id

    result = await change(harness, sub_id, plan=PRO, proration="create_prorations")
    # Money for the period was never received: no credit to the balance; the renewal is
    # voided and billed again with the change on one invoice, collected now.
    assert result.voided_invoice_id == renewal_id and result.invoice_id is not None
    amounts = [li.amount_minor for li in result.lines]
    assert result.amount_due_minor == 900 + sum(amounts)
    assert lines_of(harness, result.invoice_id) == [
        (InvoiceLineKind.SUBSCRIPTION, 900),
        (InvoiceLineKind.PRORATION, amounts[0]),
        (InvoiceLineKind.PRORATION, amounts[1]),
    ]
    snap = harness.snapshot(sub_id)
    assert {i.id: i.status for i in snap.invoices}[renewal_id] == InvoiceStatus.VOID
    with unit_of_work(harness.session_factory) as session:
        assert balances_repo.credit_balance(session, snap.subscription.customer_id, "USD") == 0

    # A working card: the adjusted invoice is paid once; nothing for the voided one.
    pm = await harness.to_thread_card(SUCCEEDS)
    updated: UpdatePaymentMethodResult = await harness.update(
        sub_id,
        SubscriptionMessage.UPDATE_PAYMENT_METHOD,
        UpdatePaymentMethodInput(payment_method_id=pm),
        UpdatePaymentMethodResult,
    )
    assert updated.retry_scheduled
    state = await harness.wait_for(sub_id, lambda v: v.open_invoice is None)
    assert state.status == SubscriptionStatus.ACTIVE
    assert succeeded_charges(harness, sub_id) == [900 + sum(amounts)]


@BOTH_BACKENDS
async def test_a_change_racing_the_renewal_at_the_same_instant_bills_the_period_once(
    harness: BillingHarness,
) -> None:
    sub_id, anchor = await signed_up(harness)
    renewal_at = anchor + relativedelta(months=1)
    await harness.advance_to(renewal_at)
    # The renewal has just been issued (its charge may be in flight) and the clock has not
    # moved: the change lands at the renewal's instant. (Sent in the very workflow task the
    # timer fires in, the time-skipping server refuses the task: "invalid history builder
    # state for action", a test-server limit; the real server takes it.)
    await harness.wait_for(sub_id, lambda v: v.invoices_issued >= 2, at_rest=False)
    result = await change(harness, sub_id, plan=PRO)
    assert result.effective_at.replace(microsecond=0) == renewal_at
    await harness.wait_for(sub_id, lambda v: v.invoices_issued >= 2 and v.open_invoice is None)

    snap = harness.snapshot(sub_id)
    renewals = [i for i in snap.invoices if i.change_id is None and i.period_start == renewal_at]
    changes = [i for i in snap.invoices if i.change_id is not None]
    assert len(renewals) == 1 and len(changes) == 1
    # The change's invoice starts where the renewal does: keyed by its change, no collision.
    assert changes[0].period_start == renewal_at
    # Whichever came first, the period from the renewal bills the new price once in total.
    billed = sum(i.amount_due_minor for i in renewals + changes if i.status == InvoiceStatus.PAID)
    assert billed == 2900, (result, snap.invoices)
    assert sum(succeeded_charges(harness, sub_id)) == 900 + 2900


async def test_monthly_to_annual_now_starts_a_new_period_with_a_new_anchor(
    harness: BillingHarness,
) -> None:
    sub_id, anchor = await signed_up(harness)
    await harness.advance_to(anchor + 10 * DAY)
    result = await change(harness, sub_id, plan=ANNUAL)
    at = result.effective_at.replace(microsecond=0)
    credit, charge = [li.amount_minor for li in result.lines]
    assert (
        charge == 29000
        and credit == expected(BASIC, ANNUAL, anchor, anchor + relativedelta(months=1), at)[0]
    )
    state = await harness.wait_for(sub_id, lambda v: v.open_invoice is None)
    assert state.anchor_at == at and state.current_period_start == at
    assert state.current_period_end == at + relativedelta(years=1)
    assert state.next_billing_at == at + relativedelta(years=1)
    assert harness.snapshot(sub_id).subscription.anchor_at == at


@BOTH_BACKENDS
async def test_a_downgrade_now_credits_the_balance_which_pays_the_next_renewal(
    harness: BillingHarness,
) -> None:
    sub_id, anchor = await signed_up(harness)
    await change(harness, sub_id, quantity=4)  # 4 seats now, invoiced and paid
    await harness.wait_for(sub_id, lambda v: v.open_invoice is None)
    await harness.advance_to(anchor + 20 * DAY)
    result = await change(harness, sub_id, quantity=1, effective="now")
    credit, charge = [li.amount_minor for li in result.lines]
    assert credit < 0 < charge and credit + charge < 0
    # Owes nothing: paid at once, no charge; the rest is the customer's credit.
    assert (result.invoice_status, result.amount_due_minor) == ("paid", 0)
    customer_id = harness.snapshot(sub_id).subscription.customer_id
    with unit_of_work(harness.session_factory) as session:
        held = balances_repo.credit_balance(session, customer_id, "USD")
    assert held == -(credit + charge)

    charges_before = succeeded_charges(harness, sub_id)
    await harness.advance_to(anchor + relativedelta(months=1) + timedelta(hours=1))
    await harness.wait_for(sub_id, lambda v: v.invoices_issued == 4 and not v.open_invoice)
    renewal = harness.snapshot(sub_id).invoices[-1]
    assert renewal.credit_applied_minor == min(held, 900)
    assert renewal.amount_due_minor == 900 - min(held, 900)
    new_charges = succeeded_charges(harness, sub_id)
    assert len(new_charges) == len(charges_before) + (1 if held < 900 else 0)


async def test_create_prorations_carries_the_lines_to_the_next_renewal(
    harness: BillingHarness,
) -> None:
    sub_id, anchor = await signed_up(harness)
    await harness.advance_to(anchor + 15 * DAY)
    result = await change(harness, sub_id, quantity=3, proration="create_prorations")
    assert result.invoice_id is None and result.proration == "create_prorations"
    amounts = [li.amount_minor for li in result.lines]
    state = await harness.state(sub_id)
    assert [li.amount_minor for li in state.pending_lines] == amounts
    assert succeeded_charges(harness, sub_id) == [900]

    await harness.advance_to(anchor + relativedelta(months=1) + timedelta(hours=1))
    state = await harness.wait_for(sub_id, lambda v: v.invoices_issued == 2 and not v.open_invoice)
    assert state.pending_lines == []
    renewal = harness.snapshot(sub_id).invoices[-1]
    assert lines_of(harness, renewal.id) == [
        (InvoiceLineKind.SUBSCRIPTION, 2700),
        (InvoiceLineKind.PRORATION, amounts[0]),
        (InvoiceLineKind.PRORATION, amounts[1]),
    ]
    assert renewal.amount_due_minor == 2700 + sum(amounts)
    assert succeeded_charges(harness, sub_id) == sorted([900, 2700 + sum(amounts)])


@BOTH_BACKENDS
async def test_a_change_during_dunning_keeps_a_credit_note_issued_on_the_unpaid_renewal(
    harness: BillingHarness,
) -> None:
    """A pre-payment credit note lowered the unpaid renewal (900 -> 600). The change voids the
    renewal and bills its lines again: the credit note must come along (the customer is never
    charged for what was credited), and it is not turned into balance credit either (never
    credited twice)."""
    from tests.workflows.test_credit_notes_during_dunning import credit, tell

    sub_id, anchor = await signed_up(harness, card=DECLINES_AFTER_ATTACH)
    await harness.advance_to(anchor + 2 * DAY)
    state = await harness.state(sub_id)
    assert state.status == SubscriptionStatus.PAST_DUE and state.open_invoice is not None
    renewal_id = state.open_invoice.invoice_id
    issued = credit(harness, renewal_id, 300)
    await tell(harness, issued)
    await harness.wait_for(
        sub_id, lambda v: v.open_invoice is not None and v.open_invoice.amount_minor == 600
    )

    result = await change(harness, sub_id, plan=PRO)
    assert result.voided_invoice_id == renewal_id and result.invoice_id is not None
    amounts = [li.amount_minor for li in result.lines]
    # The renewal again (900), less the credit note on it (300), plus the change's lines.
    assert result.amount_due_minor == 900 - 300 + sum(amounts)
    assert lines_of(harness, result.invoice_id) == [
        (InvoiceLineKind.SUBSCRIPTION, 900),
        (InvoiceLineKind.CREDIT_NOTE, -300),
        (InvoiceLineKind.PRORATION, amounts[0]),
        (InvoiceLineKind.PRORATION, amounts[1]),
    ]
    customer_id = harness.snapshot(sub_id).subscription.customer_id
    with unit_of_work(harness.session_factory) as session:
        assert balances_repo.credit_balance(session, customer_id, "USD") == 0

    pm = await harness.to_thread_card(SUCCEEDS)
    await harness.update(
        sub_id,
        SubscriptionMessage.UPDATE_PAYMENT_METHOD,
        UpdatePaymentMethodInput(payment_method_id=pm),
        UpdatePaymentMethodResult,
    )
    await harness.wait_for(sub_id, lambda v: v.open_invoice is None)
    assert succeeded_charges(harness, sub_id) == [600 + sum(amounts)]
    with unit_of_work(harness.session_factory) as session:
        assert balances_repo.credit_balance(session, customer_id, "USD") == 0


@BOTH_BACKENDS
async def test_plan_changes_are_logged_once_and_move_mrr_as_expansion_and_contraction(
    harness: BillingHarness,
) -> None:
    """The real workflow's upgrade (now) and downgrade (at the renewal) are each logged once,
    when they took effect, and the MRR report, from the database's rollups and from
    the rows alike, shows them as expansion and contraction in their months, not as new
    business or churn."""
    sub_id, anchor = await signed_up(harness)
    # Past the first month start the basic plan counted at.
    upgrade_at = Month.of(anchor).next().next().start + 3 * DAY
    await harness.advance_to(upgrade_at)
    upgraded = await change(harness, sub_id, plan=PRO, update_id="mrr-upgrade")
    await harness.wait_for(sub_id, lambda v: v.open_invoice is None and v.amount_minor == 2900)
    again = await change(harness, sub_id, plan=PRO, update_id="mrr-upgrade")
    assert again.change_id == upgraded.change_id
    # The downgrade takes effect in a later month than the upgrade.
    await harness.advance_to(Month.of(upgraded.effective_at).next().start + DAY)
    await harness.wait_for(sub_id, lambda v: not v.open_invoice)
    scheduled = await change(harness, sub_id, plan=BASIC)
    assert scheduled.effective == "period_end"
    await harness.advance_to(scheduled.effective_at + timedelta(hours=1))
    await harness.wait_for(sub_id, lambda v: v.amount_minor == 900 and not v.open_invoice)

    with unit_of_work(harness.session_factory) as session:
        logged = subscriptions_repo.list_terms_changes(session, sub_id)
    assert [
        (t.from_plan_code, t.to_plan_code, t.from_monthly_minor, t.to_monthly_minor) for t in logged
    ] == [("basic-monthly", "pro-monthly", 900, 2900), ("pro-monthly", "basic-monthly", 2900, 900)]
    # Logged by the sync that follows the change in the same workflow (its clock a few
    # milliseconds on, after the change invoice's local activity).
    for terms, effective in zip(logged, (upgraded, scheduled), strict=True):
        assert timedelta(0) <= terms.changed_at - effective.effective_at < timedelta(seconds=5)

    months = reporting.MonthRange(Month.of(anchor), Month.of(scheduled.effective_at).next())
    for from_rows in (False, True):
        rows = {
            str(r.month): r
            for r in reporting.mrr(harness.session_factory, months, from_rows=from_rows)
            if r.currency == "USD"
        }
        moved = {
            month: (r.new_minor, r.expansion_minor, r.contraction_minor, r.churned_minor)
            for month, r in rows.items()
            if r.new_minor or r.expansion_minor or r.contraction_minor or r.churned_minor
        }
        assert moved == {
            str(Month.of(anchor)): (900, 0, 0, 0),
            str(Month.of(upgraded.effective_at)): (0, 2000, 0, 0),
            str(Month.of(scheduled.effective_at)): (0, 0, 2000, 0),
        }, from_rows
        last = rows[str(Month.of(scheduled.effective_at))]
        assert last.revenue_churn_rate == reports.rate(2000, 2900)
