"""Pacing of payment-provider requests across every worker: at most the configured cap in any
one-second window, however many workers send them.

Temporal's task-queue rate (``max_task_queue_activities_per_second``) is global to the queue
but is a token bucket that starts full: after a quiet spell it releases a whole second's worth
of tasks at once on top of its rate, so one second can see twice the cap. Pacing each process
alone does not hold across several processes either. So every provider request first takes a
*slot* of one shared schedule (rows in the database, ``db.repositories.pacing``).

The rule is a sliding window kept as a ring of ``slot_count(cap)`` slots. A request may leave
only through a slot, and a slot is used again only ``slot_reuse_s(cap)`` (at least one second
and ``SEND_MARGIN_S``) after the instant its last request was *stamped* with, which is never
before that request left. Then any one-second window holds at most one request per slot, at
most the cap, whatever order the requests leave in and however late any of them is: a late
request only moves its own slot's next use later.

A request takes the slot that comes free soonest and plans to leave there; the plan is its
stamp, written when it takes the slot, and the slot stays its own (nobody else may take it)
until ``HOLD_LEASE_S`` after the plan. If the thread wakes for it on time, within
``MAX_LATENESS_S``, the request leaves with no further word to the database: one statement
per request. The plan is on the database's clock; ``ClockOffset`` places it on the worker's
from the statements' round trips, so that the thread never leaves before it and a slow way
back from the database counts as lateness. If it is later (a starved CPU, a
slow commit), it stamps the slot again with the instant it really leaves: its slot's next use
moves later by its lateness, and nobody else's. (A schedule of fixed instants, which this
replaced, had to give a turn up whenever a thread woke too late for it, because the turns after
it were already promised to others: on a loaded 2-core machine 7-47 turns of a 300-charge
burst.)

Plans are also at least ``min_gap_s`` apart (half the sustained spacing), so a ring that comes
free at once (a burst after a quiet spell) does not wake all its holders in the same instant.
The gap only smooths; the cap rests on the slots alone.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Protocol

#: What a slot's reuse adds to the one-second window (seconds): a request leaves at most this
#: long after its stamp, its way out and the network's jitter included, without two requests
#: of one slot reaching the provider less than a second apart. It is also the share of the cap
#: given up: a saturated schedule sustains ``1 / (1 + SEND_MARGIN_S)``, 0.952 of it.
SEND_MARGIN_S = 0.05

#: How late (seconds) a request may leave after its planned instant on that stamp: later, it
#: stamps its slot again first. The rest of ``SEND_MARGIN_S`` (15 ms) covers the HTTP
#: client's work after the pacer returns and the network's jitter.
MAX_LATENESS_S = 0.035

#: How long after its planned instant a slot stays its holder's (seconds): nobody else takes
#: it meanwhile, so a holder that wakes late may stamp it again. Half a reuse: a holder later
#: than this may find its slot taken (at its next use) and take another; the next holder can
#: still take it half a second before it comes free.
HOLD_LEASE_S = 0.5


def _checked(cap_per_s: float) -> float:
    if not math.isfinite(cap_per_s) or cap_per_s <= 0:
        raise ValueError(f"the provider cap must be a positive number per second; got {cap_per_s}")
    return cap_per_s


def slot_count(cap_per_s: float) -> int:
    """How many slots the ring has: the most requests any one-second window may hold (a
    fractional cap allows only its whole part; below one a second, one slot, reused more
    slowly)."""
    return max(1, math.floor(_checked(cap_per_s)))


def slot_reuse_s(cap_per_s: float) -> float:
    """Seconds from a slot's stamp to its next use: one second plus ``SEND_MARGIN_S``, or, for
    a cap below one a second, the longer interval that keeps it (one request per ``1 / cap``
    seconds)."""
    return max(1.0, slot_count(cap_per_s) / _checked(cap_per_s)) + SEND_MARGIN_S


def sustained_per_s(cap_per_s: float) -> float:
    """The rate a saturated schedule keeps up: every slot used again as soon as it may."""
    return slot_count(cap_per_s) / slot_reuse_s(cap_per_s)


#: The least gap between two planned stamps, as a share of the sustained spacing
#: (``min_gap_s``): a ring that comes free at once is spread over half a reuse.
PLAN_SPREAD = 0.5


def min_gap_s(cap_per_s: float) -> float:
    """The least time between two holds' planned stamps: ``PLAN_SPREAD`` of the sustained
    spacing, so the planned rate is twice the sustained one and the slots, not the plan, set
    the pace of a saturated ring."""
    return PLAN_SPREAD / sustained_per_s(cap_per_s)


def least_span_s(requests: int, cap_per_s: float) -> float:
    """The shortest time from the first to the last of ``requests`` requests the schedule
    allows, starting with every slot free: the first ring spread at ``min_gap_s``, then each
    slot again a reuse after its last stamp. The time a burst took beyond this is time the
    cap went unused."""
    if requests <= 0:
        return 0.0
    rings, last = divmod(requests - 1, slot_count(cap_per_s))
    return rings * slot_reuse_s(cap_per_s) + last * min_gap_s(cap_per_s)


#: Shortest sleep before asking again when every slot is held (seconds): waiters beyond the
#: ring's size poll for the first hold to lapse, no faster than this.
FULL_RING_POLL_S = 0.02

#: Sleep before asking again after a hold lost a race for a free slot (seconds).
RACE_RETRY_S = 0.001


def pause_before_asking_again(
    *,
    now: float,
    soonest_unheld: float | None,
    soonest_lapse: float | None,
    left_s: float,
    cap_per_s: float,
) -> float | None:
    """A request that could not take a slot: how long to sleep before asking again, or None
    if no slot can be its own within ``left_s``. ``now``, ``soonest_unheld`` (the soonest
    instant of a slot nobody holds) and ``soonest_lapse`` (the soonest a hold lapses) are on
    the schedule's clock.

    A plan may be up to ``slot_count + 1`` gaps after its slot's instant (plans are kept
    apart), so a slot whose instant is within reach may still have been refused for a plan
    beyond it. The bound counts that spread: with the instant alone the refusal would repeat
    however long the request waited (both sides of the comparison shrink alike), a request
    asking again and again until the ring changed."""
    if soonest_unheld is not None:
        spread = (slot_count(cap_per_s) + 1) * min_gap_s(cap_per_s)
        if max(soonest_unheld, now) + spread - now > left_s:
            return None
        # A slot came free between the two statements, or another worker's concurrent hold
        # was taking it: ask again in a moment.
        return RACE_RETRY_S
    if soonest_lapse is None:
        return RACE_RETRY_S  # the slots were made meanwhile
    # Every slot is held: the soonest hold lapses a lease after its plan, and its slot is
    # free a reuse after that plan.
    if soonest_lapse - HOLD_LEASE_S + slot_reuse_s(cap_per_s) - now > left_s:
        return None
    return max(FULL_RING_POLL_S, soonest_lapse - now)


#: How long a reading of the schedule's clock counts towards ``ClockOffset`` (seconds): long
#: enough to meet a quick round trip, short enough that two clocks drifting apart (parts per
#: million) or slewed by NTP move less than a millisecond meanwhile.
CLOCK_SAMPLE_TTL_S = 60.0
#: The most readings ``ClockOffset`` keeps (the newest).
CLOCK_SAMPLES = 256


class ClockOffset:
    """The schedule's clock (the database's) minus this process's monotonic clock, bounded
    from round trips: a statement that read the remote clock as ``remote`` was sent at
    ``asked`` and answered at ``answered`` (local), so the offset lies in ``[remote -
    answered, remote - asked]``. The readings of the last minute are intersected, so one
    quick round trip bounds it to a millisecond or so, however slow the others were (a
    worker busy with other threads takes its answers late, which must not count as the
    request being late, nor the request leave before its plan). Readings that cannot all
    hold (a clock was stepped) are dropped for the newest one."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, float, float]] = deque(maxlen=CLOCK_SAMPLES)

    def add(self, *, asked: float, answered: float, remote: float) -> None:
        if answered < asked:
            raise ValueError(f"answered ({answered}) before asked ({asked})")
        self._samples.append((answered, remote - answered, remote - asked))
        low, high = self.bounds(answered)
        if low > high:  # a clock was stepped: the older readings no longer hold
            newest = self._samples[-1]
            self._samples.clear()
            self._samples.append(newest)

    def bounds(self, now: float) -> tuple[float, float]:
        """(least, greatest) offset the readings of the last ``CLOCK_SAMPLE_TTL_S`` allow."""
        while len(self._samples) > 1 and self._samples[0][0] < now - CLOCK_SAMPLE_TTL_S:
            self._samples.popleft()
        if not self._samples:
            raise LookupError("no reading of the schedule's clock yet")
        return max(s[1] for s in self._samples), min(s[2] for s in self._samples)


class ProviderPacer(Protocol):
    """Waits for a provider request's slot in the shared schedule."""

    def wait_turn(self, *, max_wait_s: float) -> float | None:
        """Block until this request may leave and return its stamp (Unix seconds on the
        schedule's clock: what the cap is kept on; the pacer has checked that the calling
        thread is back within ``MAX_LATENESS_S`` of it); None at once, no slot taken, if no
        slot comes free within ``max_wait_s``."""
        ...
