"""``timer_delay``: a timer decided in a slow workflow task counts from the latest instant the
task observed, so it fires on time, never before its instant by Temporal's clock without a
second look, and never shortened by more than a task can last."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from billing.collection import MAX_TIMER_LEAD, MIN_TIMER, timer_delay

T0 = datetime(2027, 1, 1, tzinfo=UTC)
offsets = st.timedeltas(min_value=timedelta(days=-40), max_value=timedelta(days=400))
leads = st.none() | st.timedeltas(min_value=timedelta(seconds=-60), max_value=timedelta(seconds=60))


@given(remaining=offsets, lead=leads)
def test_the_delay_is_never_negative_and_never_longer_than_what_remains(
    remaining: timedelta, lead: timedelta | None
) -> None:
    when = T0 + remaining
    delay = timer_delay(when, T0, None if lead is None else T0 + lead)
    if remaining <= timedelta(0):
        assert delay == timedelta(0)  # the instant has come by Temporal's clock: act now
    else:
        assert timedelta(0) < delay <= remaining  # still to come: a timer, never none
        assert delay >= min(remaining, MIN_TIMER)
        assert delay >= remaining - MAX_TIMER_LEAD  # shortened by at most a task's length


@given(remaining=offsets.filter(lambda r: r > timedelta(0)), lead=leads)
def test_a_timer_started_at_the_observed_instant_fires_on_time(
    remaining: timedelta, lead: timedelta | None
) -> None:
    """Temporal starts the timer no earlier than the task's local activity finished: started
    there, it fires at ``when`` (or at once if that instant has passed), not ``lead`` late."""
    when = T0 + remaining
    observed = None if lead is None else T0 + lead
    delay = timer_delay(when, T0, observed)
    started = T0 if observed is None or observed <= T0 else observed
    if observed is not None and timedelta(0) < lead <= MAX_TIMER_LEAD and observed < when:
        assert started + delay == when
    elif observed is None or lead <= timedelta(0):
        assert T0 + delay == when  # nothing observed later than the task's start: as before


def test_examples() -> None:
    when = T0 + timedelta(days=30)
    # A task that ran its sync 2.9 s after it started: the timer is 2.9 s shorter.
    assert timer_delay(when, T0, T0 + timedelta(seconds=2.9)) == timedelta(days=30, seconds=-2.9)
    # A clock far ahead (an hour): at most the 10 s a task can last.
    assert timer_delay(when, T0, T0 + timedelta(hours=1)) == timedelta(days=30, seconds=-10)
    # Observed past the instant itself: the shortest timer, and the workflow looks again.
    assert timer_delay(T0 + timedelta(seconds=1), T0, T0 + timedelta(seconds=5)) == MIN_TIMER
    # Nothing observed, or observed before the task started: the plain delay.
    assert timer_delay(when, T0, None) == timedelta(days=30)
    assert timer_delay(when, T0, T0 - timedelta(seconds=3)) == timedelta(days=30)
