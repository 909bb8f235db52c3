"""Billing dates over time, on the time-skipping server with the real workflow, activities,
localstripe and a real database. Dates are asserted from what the database recorded."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from dateutil.relativedelta import relativedelta

from billing.calendar import IntervalUnit
from billing.invoices import InvoiceStatus
from billing.plans import Plan
from billing.subscription import SubscriptionStatus
from billing.testing.cards import SUCCEEDS
from billing.testing.harness import BillingHarness
from tests.conftest import BOTH_BACKENDS


def local_dates(invoices: list, tz: str) -> list[date]:
    return [i.period_start.astimezone(ZoneInfo(tz)).date() for i in invoices]


@BOTH_BACKENDS
async def test_leap_year_month_end_anchor_bills_twelve_exact_invoices(
    harness: BillingHarness,
) -> None:
    tz = "America/New_York"
    # 2028 is the next leap year after the test server's start (its clock cannot go back).
    anchor = datetime(2028, 1, 31, 9, 0, tzinfo=ZoneInfo(tz))
    sub = await harness.signup(
        "basic-monthly", card=SUCCEEDS, timezone=tz, billing_anchor_at=anchor
    )

    await harness.advance_to(anchor + relativedelta(months=11) + timedelta(days=1))

    snap = harness.snapshot(sub.subscription_id)
    assert local_dates(snap.invoices, tz) == [
        date(2028, 1, 31), date(2028, 2, 29), date(2028, 3, 31), date(2028, 4, 30),
        date(2028, 5, 31), date(2028, 6, 30), date(2028, 7, 31), date(2028, 8, 31),
        date(2028, 9, 30), date(2028, 10, 31), date(2028, 11, 30), date(2028, 12, 31),
    ]  # fmt: skip
    # The local time of day survives both DST changes.
    assert {i.period_start.astimezone(ZoneInfo(tz)).hour for i in snap.invoices} == {9}
    # Periods are contiguous: each ends where the next begins.
    for a, b in zip(snap.invoices, snap.invoices[1:], strict=False):
        assert a.period_end == b.period_start
    assert [i.status for i in snap.invoices] == [InvoiceStatus.PAID] * 12
    assert {(i.amount_due_minor, i.amount_paid_minor, i.currency) for i in snap.invoices} == {
        (900, 900, "USD")
    }
    numbers = [i.number for i in snap.invoices]
    assert (
        len(set(numbers)) == 12 and numbers[0].endswith("-0001") and numbers[-1].endswith("-0012")
    )

    # One settled payment per invoice, and the provider holds exactly those charges.
    payments = [p for i in snap.invoices for p in snap.payments[i.id]]
    assert len(payments) == 12
    assert all(p.amount_minor == 900 and p.currency == "USD" for p in payments)
    charges = harness.provider_charges(sub.subscription_id)
    assert sorted(c["id"] for c in charges) == sorted(p.stripe_charge_id for p in payments)
    assert all(c["amount"] == 900 and c["currency"] == "usd" and c["paid"] for c in charges)

    state = await harness.state(sub.subscription_id)
    assert state.status == SubscriptionStatus.ACTIVE
    assert state.invoices_issued == 12
    assert state.next_billing_at is not None
    assert state.next_billing_at.astimezone(ZoneInfo(tz)).date() == date(2029, 1, 31)


async def test_feb_29_annual_anchor_bills_feb_28_in_common_years(harness: BillingHarness) -> None:
    harness.add_plan(Plan("leap-annual", "Leap annual", 12000, "EUR", IntervalUnit.YEAR))
    tz = "Europe/Paris"
    anchor = datetime(2028, 2, 29, 10, 0, tzinfo=ZoneInfo(tz))
    sub = await harness.signup("leap-annual", card=SUCCEEDS, timezone=tz, billing_anchor_at=anchor)

    await harness.advance_to(datetime(2032, 3, 1, tzinfo=ZoneInfo(tz)))

    snap = harness.snapshot(sub.subscription_id)
    assert local_dates(snap.invoices, tz) == [
        date(2028, 2, 29), date(2029, 2, 28), date(2030, 2, 28), date(2031, 2, 28),
        date(2032, 2, 29),
    ]  # fmt: skip
    assert all(
        i.status == InvoiceStatus.PAID and i.amount_paid_minor == 12000 for i in snap.invoices
    )


async def test_trial_then_monthly_from_trial_end(harness: BillingHarness) -> None:
    start = await harness.now()
    sub = await harness.signup("pro-monthly", card=SUCCEEDS, timezone="Asia/Tokyo")
    assert sub.status == SubscriptionStatus.TRIALING
    assert sub.trial_end_at is not None
    # 14 days from signup (signup happens a moment after `start` on the server's clock).
    assert timedelta(days=14) <= sub.trial_end_at - start < timedelta(days=14, minutes=1)

    state = await harness.state(sub.subscription_id)
    assert state.status == SubscriptionStatus.TRIALING
    assert state.next_billing_at == sub.trial_end_at
    # Nothing is billed during the trial.
    await harness.advance(timedelta(days=13))
    assert harness.snapshot(sub.subscription_id).invoices == []

    await harness.advance_to(sub.trial_end_at + relativedelta(months=2) + timedelta(hours=1))
    snap = harness.snapshot(sub.subscription_id)
    trial_end_local = sub.trial_end_at.astimezone(ZoneInfo("Asia/Tokyo"))
    assert [i.period_start for i in snap.invoices] == [
        sub.trial_end_at,
        (trial_end_local + relativedelta(months=1)).astimezone(ZoneInfo("UTC")),
        (trial_end_local + relativedelta(months=2)).astimezone(ZoneInfo("UTC")),
    ]
    assert [i.amount_paid_minor for i in snap.invoices] == [2900, 2900, 2900]
    assert snap.subscription.status == SubscriptionStatus.ACTIVE
    assert (await harness.state(sub.subscription_id)).status == SubscriptionStatus.ACTIVE
