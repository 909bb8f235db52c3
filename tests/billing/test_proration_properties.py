"""Properties of the pure proration function (billing.proration), with worked examples."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from billing.errors import InvalidInput
from billing.money import currency_exponent
from billing.proration import Terms, prorate, round_half_even_minor, whole_seconds

START = datetime(2026, 1, 1, tzinfo=UTC)
END = datetime(2026, 2, 1, tzinfo=UTC)  # 31 days: 2,678,400 s


def terms(code: str, unit: int, quantity: int = 1, currency: str = "USD") -> Terms:
    return Terms(code, code.title(), unit, quantity, currency)


# ---- worked examples (README "Plan changes") --------------------------------------------------


def test_upgrade_mid_month_worked_example() -> None:
    # basic 9.00 -> pro 29.00 on Jan 16 00:00: 16 of 31 days left.
    p = prorate(
        old=terms("basic", 900),
        new=terms("pro", 2900),
        period_start=START,
        period_end=END,
        at=datetime(2026, 1, 16, tzinfo=UTC),
        credit_cap_minor=900,
        change_id="c1",
    )
    # 900 x 16/31 = 464.516... -> 465; 2900 x 16/31 = 1496.77... -> 1497.
    assert [line.amount_minor for line in p.lines] == [-465, 1497]
    assert p.lines[0].period_start == datetime(2026, 1, 16, tzinfo=UTC)
    assert p.lines[1].period_end == END


def test_half_rounds_to_even() -> None:
    assert round_half_even_minor(Fraction(5, 2)) == 2
    assert round_half_even_minor(Fraction(7, 2)) == 4
    # 1 yen x half the period = 0.5 -> 0; 3 yen -> 1.5 -> 2.
    half = START + (END - START) / 2
    one = prorate(
        old=terms("a", 1, currency="JPY"),
        new=terms("b", 3, currency="JPY"),
        period_start=START,
        period_end=END,
        at=half,
        credit_cap_minor=1,
        change_id="c",
    )
    assert (one.credit_minor, one.charge_minor) == (0, 2)


def test_the_change_instant_counts_to_the_second() -> None:
    at = datetime(2026, 1, 16, 0, 0, 0, 999_999, tzinfo=UTC)
    p = prorate(
        old=terms("a", 3_100_000),
        new=terms("b", 3_100_000),
        period_start=START,
        period_end=END,
        at=at,
        credit_cap_minor=3_100_000,
        change_id="c",
    )
    assert p.remaining_s == 16 * 86400
    assert p.lines[0].period_start == datetime(2026, 1, 16, tzinfo=UTC)


def test_interval_change_charges_the_whole_new_period() -> None:
    at = datetime(2026, 1, 16, tzinfo=UTC)
    p = prorate(
        old=terms("pro-monthly", 2900),
        new=terms("pro-annual", 29000),
        period_start=START,
        period_end=END,
        at=at,
        credit_cap_minor=2900,
        change_id="c",
        new_period_end=datetime(2027, 1, 16, tzinfo=UTC),
    )
    assert [line.amount_minor for line in p.lines] == [-1497, 29000]
    assert p.lines[1].period_end == datetime(2027, 1, 16, tzinfo=UTC)


def test_currency_cannot_change() -> None:
    with pytest.raises(InvalidInput, match="currency cannot change"):
        prorate(
            old=terms("a", 100),
            new=terms("b", 100, currency="EUR"),
            period_start=START,
            period_end=END,
            at=START,
            credit_cap_minor=100,
            change_id="c",
        )


def test_a_change_outside_the_period_is_refused() -> None:
    with pytest.raises(InvalidInput, match="outside the billed period"):
        prorate(
            old=terms("a", 100),
            new=terms("b", 100),
            period_start=START,
            period_end=END,
            at=END,
            credit_cap_minor=100,
            change_id="c",
        )


# ---- properties -------------------------------------------------------------------------------

PERIOD_S = whole_seconds(START, END)
amounts = st.integers(min_value=0, max_value=10**9)
quantities = st.integers(min_value=1, max_value=500)
currencies = st.sampled_from(["USD", "JPY", "KWD", "EUR"])


@st.composite
def change_sequences(draw: st.DrawFn) -> tuple[str, list[tuple[int, Terms]]]:
    """A currency and changes at ascending seconds into the period, each with its new terms."""
    currency = draw(currencies)
    offsets = sorted(draw(st.lists(st.integers(0, PERIOD_S - 1), min_size=1, max_size=8)))
    changes = [
        (offset, Terms(f"p{i}", f"P{i}", draw(amounts), draw(quantities), currency))
        for i, offset in enumerate(offsets)
    ]
    return currency, changes


@settings(max_examples=300, deadline=None)
@given(initial_unit=amounts, initial_qty=quantities, sequence=change_sequences())
def test_sum_of_lines_is_the_time_weighted_price_within_one_unit_per_line(
    initial_unit: int, initial_qty: int, sequence: tuple[str, list[tuple[int, Terms]]]
) -> None:
    currency, changes = sequence
    current = Terms("p", "P", initial_unit, initial_qty, currency)
    billed = current.total_minor  # the renewal's subscription line, paid
    cap = billed
    total = billed
    line_count = 1
    exact = Fraction(0)
    last_offset = 0
    for offset, new in changes:
        p = prorate(
            old=current,
            new=new,
            period_start=START,
            period_end=END,
            at=START + timedelta(seconds=offset),
            credit_cap_minor=cap,
            change_id=f"c{offset}",
        )
        # A credit never exceeds what was billed for the old terms in this period.
        assert p.credit_minor <= cap
        assert all(line.amount_minor != 0 for line in p.lines)
        total += sum(line.amount_minor for line in p.lines)
        # Each change rounds two amounts (credit and charge), even when one rounds to 0 and
        # its line is left off.
        line_count += 2
        exact += Fraction(current.total_minor * (offset - last_offset), PERIOD_S)
        current, cap, last_offset = new, p.charge_minor, offset
    exact += Fraction(current.total_minor * (PERIOD_S - last_offset), PERIOD_S)
    # Half a minor unit per rounded amount at most (the renewal line is exact).
    assert abs(total - exact) <= Fraction(line_count - 1, 2)


@settings(max_examples=300, deadline=None)
@given(
    old_unit=amounts,
    new_unit=amounts,
    old_qty=quantities,
    new_qty=quantities,
    offset=st.integers(0, PERIOD_S - 1),
    currency=currencies,
)
def test_upgrade_and_immediate_downgrade_back_net_to_zero(
    old_unit: int, new_unit: int, old_qty: int, new_qty: int, offset: int, currency: str
) -> None:
    old = Terms("old", "Old", old_unit, old_qty, currency)
    new = Terms("new", "New", new_unit, new_qty, currency)
    at = START + timedelta(seconds=offset)
    up = prorate(
        old=old,
        new=new,
        period_start=START,
        period_end=END,
        at=at,
        credit_cap_minor=old.total_minor,
        change_id="up",
    )
    back = prorate(
        old=new,
        new=old,
        period_start=START,
        period_end=END,
        at=at,
        credit_cap_minor=up.charge_minor,
        change_id="back",
    )
    assert sum(line.amount_minor for line in up.lines + back.lines) == 0


@settings(max_examples=300, deadline=None)
@given(
    old=amounts,
    new=amounts,
    cap=amounts,
    offset=st.integers(0, PERIOD_S - 1),
)
def test_a_credit_never_exceeds_what_was_paid(old: int, new: int, cap: int, offset: int) -> None:
    p = prorate(
        old=terms("a", old),
        new=terms("b", new),
        period_start=START,
        period_end=END,
        at=START + timedelta(seconds=offset),
        credit_cap_minor=cap,
        change_id="c",
    )
    assert 0 <= p.credit_minor <= min(cap, old)
    assert 0 <= p.charge_minor <= new


@settings(max_examples=200, deadline=None)
@given(
    unit=st.integers(0, 10**7),
    offset=st.integers(0, PERIOD_S - 1),
    currency=st.sampled_from(["JPY", "KWD", "USD"]),
)
def test_each_line_is_the_exact_share_rounded_half_even_in_the_minor_unit(
    unit: int, offset: int, currency: str
) -> None:
    # JPY has no decimals and KWD three: amounts are whole minor units (1 yen, 1 fils), so the
    # share is rounded to a whole minor unit, half to even, whatever the exponent.
    assert currency_exponent(currency) in (0, 2, 3)
    p = prorate(
        old=terms("a", unit, currency=currency),
        new=terms("b", unit, currency=currency),
        period_start=START,
        period_end=END,
        at=START + timedelta(seconds=offset),
        credit_cap_minor=unit,
        change_id="c",
    )
    share = Fraction(unit * (PERIOD_S - offset), PERIOD_S)
    assert p.charge_minor == round(share)
    assert abs(p.charge_minor - share) <= Fraction(1, 2)
    if share.denominator == 2:  # an exact half goes to the even neighbour
        assert p.charge_minor % 2 == 0
