"""The pacer's window rule (``billing.pacing``): whatever the asks, the turns the shared
schedule hands out put at most the cap in any one-second window, and so do the requests that
leave up to the stated lateness after their turn; a waiting queue of asks gets the share of the
cap the headroom promises, every turn back to back."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from billing.pacing import MAX_TURN_LATENESS_S, PACING_HEADROOM, next_turn, spacing_s


def most_in_one_second(instants: list[float]) -> int:
    """The most instants in any half-open window [t, t + 1 s): what Stripe counts."""
    ordered = sorted(instants)
    most = first = 0
    for last, at in enumerate(ordered):
        while at - ordered[first] >= 1.0:
            first += 1
        most = max(most, last - first + 1)
    return most


def grant(asks: list[float], cap: float) -> list[float]:
    """The turns the schedule grants to asks arriving at ``asks`` (in order), from idle."""
    spacing = spacing_s(cap)
    next_free: float | None = None
    turns = []
    for now in asks:
        turn = next_turn(next_free, now, spacing)
        next_free = turn.next_free_at
        turns.append(turn.start_at)
    return turns


asks_strategy = st.lists(
    st.floats(min_value=0.0, max_value=0.2, allow_nan=False), min_size=1, max_size=400
).map(lambda gaps: list(itertools.accumulate(gaps)))


@settings(max_examples=300, deadline=None)
@given(
    cap=st.integers(min_value=1, max_value=200),
    asks=asks_strategy,
    lateness=st.lists(
        st.floats(min_value=0.0, max_value=1.0, exclude_max=True, allow_nan=False),
        min_size=400,
        max_size=400,
    ),
)
def test_no_one_second_window_holds_more_than_the_cap(
    cap: int, asks: list[float], lateness: list[float]
) -> None:
    turns = grant(asks, cap)
    spacing = spacing_s(cap)
    # Never before the ask, never closer than the spacing: whoever asks, whenever.
    assert all(turn >= ask for turn, ask in zip(turns, asks, strict=True))
    assert all(b - a >= spacing * (1 - 1e-9) for a, b in itertools.pairwise(turns))
    assert most_in_one_second(turns) <= cap
    # A request that leaves after its turn by less than the slack the headroom leaves
    # (``1 / PACING_HEADROOM - 1`` s) still keeps every window at or under the cap at Stripe.
    slack = 1 / PACING_HEADROOM - 1
    sent = [
        turn + fraction * slack * 0.999
        for turn, fraction in zip(turns, lateness[: len(turns)], strict=True)
    ]
    assert most_in_one_second(sent) <= cap


@pytest.mark.parametrize("cap", [1, 7, 20, 100])
def test_a_waiting_queue_gets_the_headroom_share_back_to_back(cap: int) -> None:
    """All asking at once: turns exactly the spacing apart, so the schedule sustains
    ``PACING_HEADROOM`` of the cap and never stands idle while someone waits."""
    turns = grant([0.0] * (3 * cap + 1), cap)
    gaps = [b - a for a, b in itertools.pairwise(turns)]
    assert max(gaps) == pytest.approx(min(gaps)) == pytest.approx(spacing_s(cap))
    assert (len(turns) - 1) / (turns[-1] - turns[0]) == pytest.approx(PACING_HEADROOM * cap)


def test_one_request_more_than_the_slack_late_could_break_the_cap() -> None:
    """Why a turn woken up for too late is given up (``MAX_TURN_LATENESS_S``, below the
    slack): back to back turns with the first request late by more than the slack put cap + 1
    requests in one second."""
    cap = 20
    slack = 1 / PACING_HEADROOM - 1
    assert 0 < MAX_TURN_LATENESS_S < slack
    turns = grant([0.0] * (2 * cap), cap)
    on_time = list(turns)
    assert most_in_one_second(on_time) <= cap
    late_first = [turns[0] + slack * 1.01, *turns[1:]]
    # The late one now shares a second with the cap's worth of turns after it.
    assert most_in_one_second(late_first) == cap + 1
