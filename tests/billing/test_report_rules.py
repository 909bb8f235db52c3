"""The report rules (billing.reports), without a database: MRR normalisation, movements that
always add up, aging buckets and rates."""

from __future__ import annotations

import dataclasses
import itertools
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from billing.calendar import IntervalUnit
from billing.reports import (
    AgingBucket,
    Month,
    Movement,
    MrrMonth,
    SubscriptionHistory,
    aging_bucket,
    classify_movement,
    days_past_due,
    month_range,
    monthly_recurring_minor,
    mrr_report,
    rate,
)
from billing.subscription import SubscriptionStatus


def test_mrr_normalises_each_interval() -> None:
    assert monthly_recurring_minor(12000, IntervalUnit.YEAR, 1) == 1000
    assert monthly_recurring_minor(999, IntervalUnit.WEEK, 1) == 4329  # 999 x 52 / 12
    assert monthly_recurring_minor(3000, IntervalUnit.MONTH, 3) == 1000
    assert monthly_recurring_minor(500, IntervalUnit.MONTH, 1, quantity=7) == 3500
    # 1000 / 12 = 83.33 -> 83; 150 / 12 = 12.5 -> 12 (half to even); 162 / 12 = 13.5 -> 14.
    assert monthly_recurring_minor(1000, IntervalUnit.YEAR, 1) == 83
    assert monthly_recurring_minor(150, IntervalUnit.YEAR, 1) == 12
    assert monthly_recurring_minor(162, IntervalUnit.YEAR, 1) == 14


@given(
    amount=st.integers(0, 10**12),
    quantity=st.integers(0, 1000),
    unit=st.sampled_from(list(IntervalUnit)),
    count=st.integers(1, 36),
)
def test_mrr_is_within_half_a_minor_unit_of_the_exact_value(
    amount: int, quantity: int, unit: IntervalUnit, count: int
) -> None:
    months = {"day": 12 / 365, "week": 12 / 52, "month": 1, "year": 12}[unit.value] * count
    got = monthly_recurring_minor(amount, unit, count, quantity)
    # In exact arithmetic: |got * months - amount * quantity| <= months / 2.
    from fractions import Fraction

    exact_months = {
        "day": Fraction(12, 365),
        "week": Fraction(12, 52),
        "month": Fraction(1),
        "year": Fraction(12),
    }[unit.value] * count
    assert abs(got - Fraction(amount * quantity) / exact_months) <= Fraction(1, 2)
    assert months > 0


_T0 = datetime(2025, 1, 1, tzinfo=UTC)
_statuses = st.sampled_from(list(SubscriptionStatus))


@st.composite
def histories(draw: st.DrawFn) -> list[SubscriptionHistory]:
    result = []
    for n in range(draw(st.integers(0, 8))):
        created = _T0 + timedelta(days=draw(st.integers(0, 400)))
        offsets = sorted(draw(st.lists(st.integers(-30, 500), max_size=6)))
        # Plan and seat changes: a new monthly amount, sometimes 0 (a free plan), sometimes
        # at the very instant of a status change or of the creation.
        price_offsets = sorted(
            draw(st.lists(st.one_of(st.integers(-30, 500), st.sampled_from(offsets or [0])),
                          max_size=4))
        )  # fmt: skip
        result.append(
            SubscriptionHistory(
                subscription_id=f"sub_{n}",
                customer_id=f"cus_{draw(st.integers(0, 3))}",
                currency=draw(st.sampled_from(["USD", "EUR"])),
                monthly_minor=draw(st.integers(0, 10**6)),
                created_at=created,
                initial_status=draw(_statuses),
                changes=tuple((created + timedelta(days=o), draw(_statuses)) for o in offsets),
                price_changes=tuple(
                    (created + timedelta(days=o), draw(st.sampled_from((0, 1, 900, 5000, 10**6))))
                    for o in price_offsets
                ),
            )
        )
    return result


@given(histories())
def test_movements_always_add_up_and_months_chain(subs: list[SubscriptionHistory]) -> None:
    months = month_range(Month(2025, 1), Month(2026, 6))
    rows = mrr_report(subs, months)
    for row in rows:
        assert row.opening_mrr_minor + row.net_movement_minor == row.closing_mrr_minor
        assert (
            min(
                row.new_minor,
                row.churned_minor,
                row.reactivated_minor,
                row.expansion_minor,
                row.contraction_minor,
            )
            >= 0
        )
        assert row.churned_customers <= row.opening_customers
    for a, b in itertools.pairwise(rows):
        if a.currency == b.currency:
            assert a.closing_mrr_minor == b.opening_mrr_minor


def test_a_return_is_a_reactivation_not_new_business() -> None:
    assert classify_movement(0, 100, counted_before=False) == "new"
    assert classify_movement(0, 100, counted_before=True) == "reactivated"
    assert classify_movement(100, 0, counted_before=True) == "churned"
    assert classify_movement(100, 150, counted_before=True) == "expansion"
    assert classify_movement(150, 100, counted_before=True) == "contraction"
    assert classify_movement(100, 100, counted_before=True) is None


def test_aging_bucket_edges() -> None:
    due = datetime(2026, 1, 1, tzinfo=UTC)
    assert days_past_due(due, due + timedelta(hours=23, minutes=59)) == 0
    assert days_past_due(due, due - timedelta(days=3)) == 0
    edges = {0: "current", 1: "1-30", 30: "1-30", 31: "31-60", 60: "31-60", 61: "61-90",
             90: "61-90", 91: "over-90", 5000: "over-90"}  # fmt: skip
    for days, bucket in edges.items():
        assert aging_bucket(days) == AgingBucket(bucket)


def test_rates_round_half_even_and_have_no_base_of_zero() -> None:
    assert rate(1, 3) == "0.3333"
    assert rate(2, 3) == "0.6667"
    assert rate(1, 8) == "0.1250"
    assert rate(5, 0) is None


@given(histories(), st.integers(0, 17))
def test_steady_subscriptions_counted_in_bulk_give_the_same_report(
    subs: list[SubscriptionHistory], offset: int
) -> None:
    """What the database does for speed (steady subscriptions counted per price, not listed)
    changes no figure."""
    from collections import Counter

    from billing.reports import MRR_STATUSES, SteadyGroup, is_steady

    first = month_range(Month(2025, 1), Month(2026, 6))[offset]
    months = month_range(first, Month(2026, 6))
    start = first.start
    steady = [s for s in subs if is_steady(s, start) and s.status_at(start) in MRR_STATUSES]
    quiet_uncounted = [
        s for s in subs if is_steady(s, start) and s.status_at(start) not in MRR_STATUSES
    ]
    others = [s for s in subs if s not in steady and s not in quiet_uncounted]
    groups = Counter((s.currency, s.monthly_at(start)) for s in steady)
    # As the database counts them: owners of a steady subscription with MRR above 0.
    owners = {(s.currency, s.customer_id) for s in steady if s.monthly_at(start) > 0}
    by_currency = Counter(currency for currency, _ in owners)
    split = mrr_report(
        others,
        months,
        steady=[SteadyGroup(c, m, n) for (c, m), n in groups.items()],
        steady_customers=dict(by_currency),
        steady_customer_ids=frozenset(owners),
    )
    whole = mrr_report(subs, months)
    # A currency whose only subscriptions never count appears in the whole report with
    # zeros; the split one leaves it out.
    assert [r for r in whole if r.currency in {x.currency for x in split}] == split
    assert all(r.closing_mrr_minor == 0 and r.opening_mrr_minor == 0 for r in whole
               if r.currency not in {x.currency for x in split})  # fmt: skip


def _by_definition(subs: list[SubscriptionHistory], months: list[Month]) -> list[MrrMonth]:
    """MRR month by month straight from the definitions, every subscription at every boundary
    (what mrr_report computed before it was made to walk each subscription once)."""
    boundaries = [m.start for m in months] + [months[-1].next().start]
    result = []
    for currency in sorted({s.currency for s in subs}):
        mine = [s for s in subs if s.currency == currency]
        for k, month in enumerate(months):
            before = {s.subscription_id: s.mrr_at(boundaries[k]) for s in mine}
            after = {s.subscription_id: s.mrr_at(boundaries[k + 1]) for s in mine}
            totals = dict.fromkeys(Movement, 0)
            for s in mine:
                first = s.first_counted_boundary()
                movement = classify_movement(
                    before[s.subscription_id],
                    after[s.subscription_id],
                    counted_before=first is not None and first < boundaries[k],
                )
                if movement is not None:
                    totals[movement] += abs(after[s.subscription_id] - before[s.subscription_id])
            opening = {s.customer_id for s in mine if before[s.subscription_id]}
            closing = {s.customer_id for s in mine if after[s.subscription_id]}
            result.append(
                MrrMonth(
                    month=month,
                    currency=currency,
                    opening_mrr_minor=sum(before.values()),
                    new_minor=totals[Movement.NEW],
                    expansion_minor=totals[Movement.EXPANSION],
                    contraction_minor=totals[Movement.CONTRACTION],
                    churned_minor=totals[Movement.CHURNED],
                    reactivated_minor=totals[Movement.REACTIVATED],
                    closing_mrr_minor=sum(after.values()),
                    active_subscriptions=sum(1 for v in after.values() if v),
                    active_customers=len(closing),
                    opening_customers=len(opening),
                    churned_customers=len(opening - closing),
                )
            )
    return result


@given(histories(), st.integers(0, 17))
def test_the_report_is_the_definition_month_by_month(
    subs: list[SubscriptionHistory], offset: int
) -> None:
    months = month_range(month_range(Month(2025, 1), Month(2026, 6))[offset], Month(2026, 6))
    assert mrr_report(subs, months) == _by_definition(subs, months)


@given(histories(), st.lists(st.integers(-30, 600), max_size=20))
def test_mrr_at_each_is_mrr_at_every_instant(
    subs: list[SubscriptionHistory], days: list[int]
) -> None:
    """Including instants exactly at a creation or a change (seen only after it)."""
    instants = sorted(
        {_T0 + timedelta(days=d) for d in days}
        | {at for s in subs for at, _ in s.changes}
        | {at for s in subs for at, _ in s.price_changes}
        | {s.created_at for s in subs}
    )
    for sub in subs:
        assert sub.mrr_at_each(instants) == [sub.mrr_at(i) for i in instants]


def _sub(
    created: datetime,
    *,
    monthly: int,
    changes: list[tuple[datetime, SubscriptionStatus]] | None = None,
    prices: list[tuple[datetime, int]] | None = None,
) -> SubscriptionHistory:
    return SubscriptionHistory(
        subscription_id="sub_1",
        customer_id="cus_1",
        currency="USD",
        monthly_minor=monthly,
        created_at=created,
        initial_status=SubscriptionStatus.ACTIVE,
        changes=tuple(changes or ()),
        price_changes=tuple(prices or ()),
    )


def test_a_plan_change_is_expansion_or_contraction_in_the_month_it_is_made() -> None:
    """An upgrade from 900 to 2900 a month on 10 March moves +2000 as expansion in March (seen
    at April's start); a downgrade to 500 on 5 June moves -2400 as contraction in June, and
    counts in revenue churn; neither is new business nor churn."""
    t = datetime(2026, 1, 15, tzinfo=UTC)
    sub = _sub(
        t,
        monthly=900,
        prices=[
            (datetime(2026, 3, 10, tzinfo=UTC), 2900),
            (datetime(2026, 6, 5, tzinfo=UTC), 500),
        ],
    )
    rows = {str(r.month): r for r in mrr_report([sub], month_range(Month(2026, 1), Month(2026, 7)))}
    assert rows["2026-01"].new_minor == 900
    assert (rows["2026-03"].expansion_minor, rows["2026-03"].contraction_minor) == (2000, 0)
    assert rows["2026-03"].closing_mrr_minor == 2900
    assert (rows["2026-06"].expansion_minor, rows["2026-06"].contraction_minor) == (0, 2400)
    assert rows["2026-06"].revenue_churn_rate == rate(2400, 2900)
    assert rows["2026-06"].logo_churn_rate == "0.0000"
    assert all(r.churned_minor == 0 for r in rows.values())
    assert rows["2026-07"].closing_mrr_minor == 500


def test_a_free_plan_to_a_paid_one_is_new_business_and_back_is_churn() -> None:
    t = datetime(2026, 1, 15, tzinfo=UTC)
    sub = _sub(
        t,
        monthly=0,
        prices=[
            (datetime(2026, 2, 10, tzinfo=UTC), 1000),
            (datetime(2026, 4, 10, tzinfo=UTC), 0),
            (datetime(2026, 5, 10, tzinfo=UTC), 1000),
        ],
    )
    rows = {str(r.month): r for r in mrr_report([sub], month_range(Month(2026, 1), Month(2026, 6)))}
    assert rows["2026-01"].closing_mrr_minor == 0
    assert rows["2026-02"].new_minor == 1000
    assert rows["2026-04"].churned_minor == 1000
    assert rows["2026-04"].churned_customers == 1
    assert rows["2026-05"].reactivated_minor == 1000
    assert sub.first_counted_boundary() == datetime(2026, 3, 1, tzinfo=UTC)


def test_a_spell_between_two_month_starts_never_counted() -> None:
    """Paused from its creation, active from 3 to 20 February (no month start between), active
    again from 2 April: MRR never saw the spell, so April's return is new business, not a
    reactivation."""
    t = datetime(2026, 1, 15, tzinfo=UTC)
    sub = dataclasses.replace(
        _sub(
            t,
            monthly=700,
            changes=[
                (datetime(2026, 2, 3, tzinfo=UTC), SubscriptionStatus.ACTIVE),
                (datetime(2026, 2, 20, tzinfo=UTC), SubscriptionStatus.PAUSED),
                (datetime(2026, 4, 2, tzinfo=UTC), SubscriptionStatus.ACTIVE),
            ],
        ),
        initial_status=SubscriptionStatus.PAUSED,
    )
    assert sub.first_counted_boundary() == datetime(2026, 5, 1, tzinfo=UTC)
    rows = {str(r.month): r for r in mrr_report([sub], month_range(Month(2026, 1), Month(2026, 5)))}
    assert all(r.churned_minor == 0 for r in rows.values())
    assert (rows["2026-04"].new_minor, rows["2026-04"].reactivated_minor) == (700, 0)
