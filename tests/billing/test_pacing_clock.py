"""ClockOffset: the database's clock against a worker's, bounded from round trips. The pacer
places a plan on the worker's clock with it: never before the plan (the request would leave
early), and counting the lateness from the earliest placing (a slow way back is lateness)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.pacing import CLOCK_SAMPLE_TTL_S, ClockOffset

offsets = st.floats(min_value=-1e9, max_value=1e9, allow_nan=False)
round_trips = st.lists(
    st.tuples(
        st.floats(min_value=0.0, max_value=0.5),  # from asking to the remote clock's reading
        st.floats(min_value=0.0, max_value=0.5),  # from the reading to the answer
        st.floats(min_value=0.0, max_value=1.0),  # then until the next statement
    ),
    min_size=1,
    max_size=40,
)


@given(offset=offsets, trips=round_trips)
def test_the_bounds_always_hold_the_true_offset_and_the_quickest_trip_bounds_their_width(
    offset: float, trips: list[tuple[float, float, float]]
) -> None:
    clock = ClockOffset()
    local = 1000.0
    quickest = float("inf")
    for before, after, idle in trips:
        asked = local
        read = asked + before
        answered = read + after
        clock.add(asked=asked, answered=answered, remote=read + offset)
        quickest = min(quickest, answered - asked)
        low, high = clock.bounds(answered)
        tolerance = 1e-9 * max(1.0, abs(offset))  # float rounding of large offsets
        assert low - tolerance <= offset <= high + tolerance
        assert high - low <= quickest + 2 * tolerance
        local = answered + idle


def test_a_slow_answer_is_placed_by_an_earlier_quick_one() -> None:
    """A worker that took 200 ms to see the answer (it waited for the interpreter) is told
    that much of its time went after the remote clock's reading: the plan's earliest placing
    is the real one, so the 200 ms count as lateness."""
    clock = ClockOffset()
    clock.add(asked=10.0, answered=10.001, remote=5010.0005)  # offset 5000, +- 0.5 ms
    clock.add(asked=20.0, answered=20.201, remote=5020.0005)  # read at once, seen 200 ms later
    low, high = clock.bounds(20.201)
    assert (low, high) == pytest.approx((4999.9995, 5000.0005))
    plan = 5020.0005  # planned at the reading (no wait): placed at 20.000 local at the earliest
    assert 20.201 - (plan - high) == pytest.approx(0.201)


def test_a_stepped_clock_drops_the_readings_it_contradicts() -> None:
    clock = ClockOffset()
    clock.add(asked=10.0, answered=10.002, remote=5010.001)
    clock.add(asked=11.0, answered=11.002, remote=6011.001)  # the remote clock jumped 1000 s
    low, high = clock.bounds(11.002)
    assert low <= 5999.999 + 1e-6 and high >= 6000.001 - 1e-6
    assert 6000.0 - 0.01 < low <= high < 6000.0 + 0.01


def test_readings_older_than_a_minute_no_longer_count() -> None:
    clock = ClockOffset()
    clock.add(asked=0.0, answered=0.001, remote=100.0005)  # tight: offset 100 +- 0.5 ms
    clock.add(asked=10.0, answered=10.5, remote=110.2)  # loose
    assert clock.bounds(10.5) == pytest.approx((99.9995, 100.0005))
    later = CLOCK_SAMPLE_TTL_S + 5.0
    low, high = clock.bounds(later)
    assert (low, high) == pytest.approx((99.7, 100.2))  # the loose one alone


def test_a_reading_answered_before_it_was_asked_or_none_at_all_is_refused() -> None:
    clock = ClockOffset()
    with pytest.raises(LookupError):
        clock.bounds(0.0)
    with pytest.raises(ValueError, match="answered"):
        clock.add(asked=2.0, answered=1.0, remote=5.0)
