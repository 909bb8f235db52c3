"""The pacer's window rule (``billing.pacing``): whatever the asks and however late each
request leaves, a ring of slots, each used again only a reuse after its last stamp, puts at
most the cap in any one-second window at the provider; a late request costs only its own
slot's delay, never a turn; a saturated ring sustains the share the margin leaves."""

from __future__ import annotations

import functools
import heapq
import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from billing.pacing import (
    FULL_RING_POLL_S,
    MAX_LATENESS_S,
    RACE_RETRY_S,
    SEND_MARGIN_S,
    least_span_s,
    min_gap_s,
    pause_before_asking_again,
    slot_count,
    slot_reuse_s,
    sustained_per_s,
)


def most_in_one_second(instants: list[float], window_s: float = 1.0) -> int:
    """The most instants in any half-open window [t, t + 1 s): what Stripe counts."""
    ordered = sorted(instants)
    most = first = 0
    for last, at in enumerate(ordered):
        while at - ordered[first] >= window_s:
            first += 1
        most = max(most, last - first + 1)
    return most


def ring(
    asks: list[float], cap: float, wake_late: list[float], send_delay: list[float]
) -> tuple[list[float], list[float]]:
    """The rule, run in order of asks: each ask holds the slot free soonest, plans its stamp
    there but at least ``min_gap_s`` after the latest plan up to a ring's spread beyond, wakes
    ``wake_late`` after its plan, leaves on its plan if that is within ``MAX_LATENESS_S``,
    else stamps the slot again then (its slot next free a reuse after its stamp), and reaches
    the provider ``send_delay`` after it left. Returns (stamps, arrivals)."""
    reuse, gap = slot_reuse_s(cap), min_gap_s(cap)
    free: list[tuple[float, int]] = [(-math.inf, slot) for slot in range(slot_count(cap))]
    stamps, arrivals = [], []
    plans: list[float] = []
    for ask, late, delay in zip(asks, wake_late, send_delay, strict=False):
        free_at, slot = heapq.heappop(free)
        base = max(free_at, ask)
        prior = [plan for plan in plans if plan < base + slot_count(cap) * gap]
        plans.append(max(base, max(prior) + gap) if prior else base)
        # Back within the allowed lateness: it leaves on its plan; later: stamped again.
        stamp = plans[-1] if late <= MAX_LATENESS_S else plans[-1] + late
        heapq.heappush(free, (stamp + reuse, slot))
        stamps.append(stamp)
        arrivals.append(plans[-1] + late + delay)
    return stamps, arrivals


asks_strategy = st.lists(
    st.floats(min_value=0.0, max_value=0.2, allow_nan=False), min_size=1, max_size=300
).map(lambda gaps: list(itertools.accumulate(gaps)))


@settings(max_examples=300, deadline=None)
@given(
    cap=st.one_of(
        st.integers(min_value=1, max_value=150),
        st.floats(min_value=0.2, max_value=40, allow_nan=False, allow_infinity=False),
    ),
    asks=asks_strategy,
    wake_late=st.lists(
        st.one_of(
            st.just(0.0),
            st.floats(min_value=0.0, max_value=MAX_LATENESS_S, allow_nan=False),
            st.floats(min_value=0.0, max_value=3.0, allow_nan=False),
        ),
        min_size=300,
        max_size=300,
    ),
    send_delay=st.lists(
        st.floats(
            min_value=0.0,
            max_value=SEND_MARGIN_S - MAX_LATENESS_S,
            exclude_max=True,
            allow_nan=False,
        ),
        min_size=300,
        max_size=300,
    ),
)
def test_no_one_second_window_holds_more_than_the_cap(
    cap: float, asks: list[float], wake_late: list[float], send_delay: list[float]
) -> None:
    """However late each request wakes (up to 3 s) and however long it then takes to reach
    the provider (anything below what the margin leaves beyond ``MAX_LATENESS_S``), no
    one-second window there holds more than the cap, nor more than the ring's slots (a cap
    below one a second: one in any ``1 / cap`` seconds); no request leaves before its ask."""
    stamps, arrivals = ring(asks, cap, wake_late, send_delay)
    assert all(stamp >= ask for stamp, ask in zip(stamps, asks, strict=False))
    window = max(1.0, 1 / cap)
    assert most_in_one_second(arrivals, window) <= slot_count(cap) <= max(1, cap)
    assert most_in_one_second(stamps, window) <= slot_count(cap)


@pytest.mark.parametrize("cap", [1, 7, 20, 100])
def test_a_waiting_queue_gets_the_whole_ring_then_one_ring_per_reuse(cap: int) -> None:
    """All asking at once: the first ring spread over half a reuse, then each slot again as
    soon as it comes free, back to back: the sustained share is ``1 / (1 + SEND_MARGIN_S)`` of
    the cap and the span is the least the rule allows (``least_span_s``)."""
    n = 3 * cap + 1
    stamps, _ = ring([0.0] * n, cap, [0.0] * n, [0.0] * n)
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert min(gaps) >= min_gap_s(cap) * (1 - 1e-9)
    assert stamps[cap - 1] == pytest.approx((cap - 1) * min_gap_s(cap))
    assert stamps[-1] == pytest.approx(least_span_s(n, cap)) == pytest.approx(3 * (1 + 0.05))
    spans = [b - a for a, b in zip(stamps, stamps[cap:], strict=False)]
    assert spans == pytest.approx([1 + SEND_MARGIN_S] * len(spans))
    assert sustained_per_s(cap) == pytest.approx(cap / (1 + SEND_MARGIN_S))
    assert sustained_per_s(cap) >= 0.95 * cap


def test_a_late_request_costs_the_burst_at_most_one_gap() -> None:
    """The fixed-turn schedule this replaced gave a turn up when a thread woke too late for
    it. Here the late request uses its slot late and the others go on around it: a saturated
    queue of 100 with one request 300 ms late ends at most one ``min_gap_s`` later, every
    request served, the cap kept."""
    cap, n = 20, 100
    on_time, _ = ring([0.0] * n, cap, [0.0] * n, [0.0] * n)
    late = [0.0] * n
    late[5] = 0.3  # the sixth request wakes 300 ms late
    stamps, arrivals = ring([0.0] * n, cap, late, [0.0] * n)
    assert len(stamps) == n  # no turn given up
    assert stamps[5] == pytest.approx(on_time[5] + 0.3)
    assert on_time[-1] <= max(stamps) <= on_time[-1] + min_gap_s(cap) + 1e-9
    assert most_in_one_second(arrivals) <= cap


def test_a_request_held_up_past_the_margin_after_its_stamp_could_break_the_cap() -> None:
    """Why a request must reach the provider within the margin of its stamp (so one later
    than ``MAX_LATENESS_S`` stamps again): in a saturated ring, the last of one ring arriving
    after the margin shares a second with the next ring's whole cap."""
    cap = 20
    assert 0 < MAX_LATENESS_S < SEND_MARGIN_S
    n = 2 * cap
    delays = [0.0] * n
    assert most_in_one_second(ring([0.0] * n, cap, [0.0] * n, delays)[1]) <= cap
    delays[cap - 1] = SEND_MARGIN_S * 1.01
    assert most_in_one_second(ring([0.0] * n, cap, [0.0] * n, delays)[1]) == cap + 1


@pytest.mark.parametrize(
    ("cap", "slots", "reuse"),
    [(20, 20, 1.05), (20.9, 20, 1.05), (2.5, 2, 1.05), (1, 1, 1.05), (0.5, 1, 2.05)],
)
def test_slots_and_reuse(cap: float, slots: int, reuse: float) -> None:
    assert slot_count(cap) == slots
    assert slot_reuse_s(cap) == pytest.approx(reuse)


@pytest.mark.parametrize("bad", [0, -1, math.inf, math.nan])
def test_a_cap_that_is_not_a_positive_number_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="positive number per second"):
        slot_count(bad)


def test_least_span() -> None:
    gap = min_gap_s(20)
    assert gap == pytest.approx(0.5 * 1.05 / 20)
    assert least_span_s(0, 20) == 0.0
    assert least_span_s(1, 20) == 0.0
    assert least_span_s(20, 20) == pytest.approx(19 * gap)
    assert least_span_s(21, 20) == pytest.approx(1.05)
    assert least_span_s(300, 20) == pytest.approx(14 * 1.05 + 19 * gap)


def test_a_request_refused_a_slot_asks_again_only_while_one_can_still_be_its_own() -> None:
    """Cap 2: two slots, gaps of 0.2625 s, so a plan may fall up to 0.79 s after its slot's
    instant. A slot 0.3 s away with 0.4 s left could be refused again and again (its plan
    beyond reach, both sides shrinking alike as time passes): given up at once. With time
    to spare: ask again in a moment. Every slot held: sleep until the soonest hold lapses,
    unless even that slot's next use is out of reach."""
    pause = functools.partial(pause_before_asking_again, now=100.0, cap_per_s=2)
    spread = 3 * min_gap_s(2)
    assert spread == pytest.approx(0.7875)
    assert pause(soonest_unheld=100.3, soonest_lapse=None, left_s=0.4) is None
    assert pause(soonest_unheld=100.3, soonest_lapse=None, left_s=0.3 + spread - 0.01) is None
    assert pause(soonest_unheld=100.3, soonest_lapse=None, left_s=5) == RACE_RETRY_S
    # A slot free since long ago counts from now.
    assert pause(soonest_unheld=50.0, soonest_lapse=None, left_s=spread + 0.01) == RACE_RETRY_S
    assert pause(soonest_unheld=None, soonest_lapse=100.2, left_s=5) == pytest.approx(0.2)
    assert pause(soonest_unheld=None, soonest_lapse=100.001, left_s=5) == FULL_RING_POLL_S
    # The soonest hold lapses at 100.2: its plan was 99.7, its slot's next use 100.75.
    assert pause(soonest_unheld=None, soonest_lapse=100.2, left_s=0.7) is None
