"""The pure subscription rules: which changes are refused, and when the next invoice is due."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from billing.calendar import IntervalUnit
from billing.errors import ChangeRefused, InvalidInput
from billing.plans import Plan
from billing.subscription import OpenInvoice, SubscriptionState, SubscriptionStatus

NY = ZoneInfo("America/New_York")
PLAN = Plan("pro-monthly", "Pro (monthly)", 2900, "USD", IntervalUnit.MONTH)
# 09:00 in New York on Jan 31 2024; renewals on the last day of shorter months.
ANCHOR = datetime(2024, 1, 31, 14, 0, tzinfo=UTC)
FEB_29 = datetime(2024, 2, 29, 14, 0, tzinfo=UTC)  # 09:00 EST
MAR_31 = datetime(2024, 3, 31, 13, 0, tzinfo=UTC)  # 09:00 EDT
APR_30 = datetime(2024, 4, 30, 13, 0, tzinfo=UTC)
MAY_31 = datetime(2024, 5, 31, 13, 0, tzinfo=UTC)
JUN_30 = datetime(2024, 6, 30, 13, 0, tzinfo=UTC)

Status = SubscriptionStatus


def state(**changes: Any) -> SubscriptionState:
    """An active subscription that has invoiced its first period (Jan 31 - Feb 29)."""
    base = SubscriptionState(
        subscription_id="sub_1",
        customer_id="cus_1",
        plan=PLAN,
        timezone="America/New_York",
        started_at=ANCHOR,
        anchor_at=ANCHOR,
        status=Status.ACTIVE,
        next_period_index=1,
        current_period_start=ANCHOR,
        current_period_end=FEB_29,
        invoices_issued=1,
    )
    return dataclasses.replace(base, **changes)


def open_invoice() -> OpenInvoice:
    return OpenInvoice(
        invoice_id="in_abc",
        number="CULB92RG-0002",
        period_index=1,
        period_start=FEB_29,
        period_end=MAR_31,
        amount_minor=2900,
        currency="USD",
    )


# ---- cancel ----------------------------------------------------------------------------------


def test_cancel_of_a_canceled_subscription_is_refused_with_the_date() -> None:
    canceled = state(status=Status.CANCELED, canceled_at=datetime(2024, 2, 10, 12, tzinfo=UTC))

    for at_period_end in (True, False):
        with pytest.raises(ChangeRefused) as caught:
            canceled.check_cancel(at_period_end=at_period_end)
        assert caught.value.message == (
            "subscription sub_1 is already canceled (since 2024-02-10T12:00:00+00:00)"
        )


def test_cancel_of_a_canceled_subscription_without_a_date() -> None:
    with pytest.raises(ChangeRefused, match=r"^subscription sub_1 is already canceled$"):
        state(status=Status.CANCELED).check_cancel(at_period_end=False)


def test_repeated_cancel_at_period_end_is_refused_saying_when_it_ends() -> None:
    ending = state(cancel_at_period_end=True)

    with pytest.raises(ChangeRefused) as caught:
        ending.check_cancel(at_period_end=True)

    assert caught.value.message == (
        "subscription sub_1 is already set to cancel at period end "
        "(2024-02-29T14:00:00+00:00); cancel immediately instead if needed"
    )


def test_a_subscription_set_to_end_can_still_be_canceled_now() -> None:
    state(cancel_at_period_end=True).check_cancel(at_period_end=False)


@pytest.mark.parametrize(
    "status", [Status.TRIALING, Status.ACTIVE, Status.PAST_DUE, Status.PAUSED, Status.UNPAID]
)
def test_live_subscriptions_can_be_canceled_either_way(status: SubscriptionStatus) -> None:
    state(status=status).check_cancel(at_period_end=True)
    state(status=status).check_cancel(at_period_end=False)


@pytest.mark.parametrize(
    ("queued", "at_period_end", "refused"),
    [
        ((), False, None),
        ((), True, None),
        # An immediate cancel ahead: whatever comes after it would find the subscription
        # canceled, so it is refused now rather than held in flight.
        ((False,), False, "already being canceled"),
        ((False,), True, "already being canceled"),
        ((True, False), True, "already being canceled"),
        # A cancel at period end ahead: a second one is refused, an immediate one is not.
        ((True,), True, "already being set to cancel at period end"),
        ((True,), False, None),
        ((True, True), False, None),
    ],
)
def test_a_cancel_behind_an_accepted_cancel_is_refused_as_that_one_would_refuse_it(
    queued: tuple[bool, ...], at_period_end: bool, refused: str | None
) -> None:
    if refused is None:
        state().check_cancel(at_period_end, queued)
        return
    with pytest.raises(ChangeRefused) as caught:
        state().check_cancel(at_period_end, queued)
    assert caught.value.message.startswith(f"subscription sub_1 is {refused}")


def test_cancel_at_period_end_before_any_invoice_ends_with_the_trial() -> None:
    trial_end = datetime(2024, 2, 14, 14, tzinfo=UTC)
    trialing = state(
        status=Status.TRIALING,
        cancel_at_period_end=True,
        current_period_start=None,
        current_period_end=None,
        trial_end_at=trial_end,
    )

    assert trialing.end_of_paid_through() == trial_end
    with pytest.raises(ChangeRefused, match=r"\(2024-02-14T14:00:00\+00:00\)"):
        trialing.check_cancel(at_period_end=True)


# ---- pause and resume ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"status": Status.PAUSED}, "subscription sub_1 is already paused"),
        ({"status": Status.CANCELED}, "subscription sub_1 is canceled and cannot be paused"),
        ({"status": Status.UNPAID}, "subscription sub_1 is unpaid and cannot be paused"),
        (
            {"status": Status.PAST_DUE, "open_invoice": open_invoice()},
            "subscription sub_1 has unpaid invoice CULB92RG-0002; "
            "update the payment method or cancel instead",
        ),
        (
            {"cancel_at_period_end": True},
            "subscription sub_1 is set to cancel at period end; it cannot also be paused",
        ),
    ],
)
def test_pause_is_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ChangeRefused) as caught:
        state(**changes).check_pause()
    assert caught.value.message == message


@pytest.mark.parametrize("status", [Status.ACTIVE, Status.TRIALING])
def test_pause_of_a_subscription_in_good_standing(status: SubscriptionStatus) -> None:
    state(status=status).check_pause()


@pytest.mark.parametrize("status", [s for s in SubscriptionStatus if s is not Status.PAUSED])
def test_resume_is_refused_unless_paused(status: SubscriptionStatus) -> None:
    with pytest.raises(ChangeRefused) as caught:
        state(status=status).check_resume()
    assert caught.value.message == (
        f"subscription sub_1 is {status}, not paused; only a paused subscription can be resumed"
    )


def test_resume_of_a_paused_subscription() -> None:
    state(status=Status.PAUSED).check_resume()


def paused(next_period_index: int = 2) -> SubscriptionState:
    """Paused on Mar 10 after invoicing Jan 31 and Feb 29."""
    return state(
        status=Status.PAUSED,
        paused_at=datetime(2024, 3, 10, 15, tzinfo=UTC),
        next_period_index=next_period_index,
    )


@pytest.mark.parametrize(
    ("resumed_at", "index", "next_billing"),
    [
        (datetime(2024, 4, 10, 12, tzinfo=UTC), 3, APR_30),  # mid-period: next anchor date
        (APR_30, 3, APR_30),  # exactly on a billing date: that date
        (APR_30 + timedelta(microseconds=1), 4, MAY_31),
        (datetime(2024, 6, 5, 12, tzinfo=UTC), 5, JUN_30),  # the 31st anchor clamps again
        (datetime(2024, 3, 15, 12, tzinfo=UTC), 2, MAR_31),  # before the next unbilled date
    ],
)
def test_resume_keeps_the_anchor(resumed_at: datetime, index: int, next_billing: datetime) -> None:
    subscription = paused()

    got = subscription.next_index_after_resume(resumed_at)

    assert got == index
    assert subscription.period(got).start == next_billing
    assert next_billing.astimezone(NY).hour == 9


def test_resume_never_goes_back_to_a_period_already_invoiced() -> None:
    # Invoiced through the Mar 31 period; a resume stamped Mar 15 (e.g. a late, queued request)
    # must not bill the Mar 31 period again.
    subscription = paused(next_period_index=3)

    assert subscription.next_index_after_resume(datetime(2024, 3, 15, tzinfo=UTC)) == 3
    assert subscription.next_index_after_resume(datetime(2024, 2, 1, tzinfo=UTC)) == 3


def test_resume_with_a_naive_instant_is_refused() -> None:
    with pytest.raises(InvalidInput, match="has no time zone"):
        paused().next_index_after_resume(datetime(2024, 4, 10, 12))


# ---- next billing date -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, FEB_29),
        ({"next_period_index": 2}, MAR_31),
        ({"status": Status.TRIALING, "next_period_index": 0}, ANCHOR),
        ({"status": Status.PAST_DUE, "next_period_index": 3}, APR_30),
    ],
)
def test_next_billing_at_is_the_next_anchor_date(
    changes: dict[str, Any], expected: datetime
) -> None:
    assert state(**changes).next_billing_at == expected


@pytest.mark.parametrize(
    "changes",
    [
        {"status": Status.CANCELED},
        {"status": Status.PAUSED},
        {"status": Status.UNPAID},
        {"status": Status.PENDING},
        {"cancel_at_period_end": True},
    ],
)
def test_no_next_billing_date_when_nothing_will_be_invoiced(changes: dict[str, Any]) -> None:
    assert state(**changes).next_billing_at is None


def test_paid_through_falls_back_to_the_start() -> None:
    fresh = state(current_period_start=None, current_period_end=None, trial_end_at=None)

    assert fresh.end_of_paid_through() == ANCHOR
    assert state().end_of_paid_through() == FEB_29


# ---- payment method --------------------------------------------------------------------------


def test_payment_method_of_a_canceled_subscription_cannot_change() -> None:
    with pytest.raises(ChangeRefused, match="sub_1 is canceled; its payment method"):
        state(status=Status.CANCELED).check_payment_method_update()


@pytest.mark.parametrize("status", [Status.PAST_DUE, Status.UNPAID, Status.PAUSED])
def test_payment_method_can_change_while_collection_is_struggling(
    status: SubscriptionStatus,
) -> None:
    state(status=status).check_payment_method_update()
