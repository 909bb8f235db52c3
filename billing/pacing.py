"""Pacing of payment-provider requests across every worker: at most the configured cap in any
one-second window, however many workers send them.

Temporal's task-queue rate (``max_task_queue_activities_per_second``) is global to the queue
but is a token bucket that starts full: after a quiet spell it releases a whole second's worth
of tasks at once on top of its rate, so one second can see twice the cap. Pacing each process
alone does not hold across several processes either. So every provider request first takes a
turn from one shared schedule (a row in the database, ``db.repositories.pacing``): turns are
``spacing_s`` apart, the generic cell rate algorithm with a burst of one. ``n`` turns then
span ``(n - 1) * spacing_s`` seconds, so a one-second window holds at most
``floor(cap * PACING_HEADROOM) + 1`` of them, which is at most the cap; the headroom also
absorbs a start a little late (a thread woken late, a slow connect) after its turn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

#: The share of the cap the schedule hands out. 0.95 sustains 95 % of the cap; a start can be
#: ``(1 / 0.95 - 1) / cap * cap`` = 5 % of a second (53 ms) later than the one ``cap`` turns
#: before it and the window still holds.
PACING_HEADROOM = 0.95

#: How late (seconds) a request may start after its turn. ``cap`` + 1 turns span
#: ``1 / PACING_HEADROOM`` seconds, so requests each late by less than the slack
#: ``1 / PACING_HEADROOM - 1`` (53 ms) still put at most ``cap`` in any one-second window. A
#: worker that wakes later than this (a starved CPU, a long pause) gives its turn up unused
#: and takes the next free one: a wasted turn only lowers the rate, a late one could break
#: the cap. Three quarters of the slack leave room for the send itself.
MAX_TURN_LATENESS_S = 0.75 * (1 / PACING_HEADROOM - 1)


def spacing_s(cap_per_s: float) -> float:
    """Seconds between two turns for a cap of ``cap_per_s`` requests in any one-second window."""
    if not math.isfinite(cap_per_s) or cap_per_s <= 0:
        raise ValueError(f"the provider cap must be a positive number per second; got {cap_per_s}")
    return 1.0 / (cap_per_s * PACING_HEADROOM)


@dataclass(frozen=True)
class Turn:
    """One request's turn: when it may start, and when the next free turn is (Unix seconds)."""

    start_at: float
    next_free_at: float


def next_turn(next_free_at: float | None, now: float, spacing: float) -> Turn:
    """The turn a request asking at ``now`` gets: the next free one, or now if the schedule is
    idle (an idle schedule stores no credit: a burst after a quiet spell is still spaced)."""
    start = now if next_free_at is None else max(next_free_at, now)
    return Turn(start_at=start, next_free_at=start + spacing)


@dataclass(frozen=True)
class GrantedTurn:
    """A turn the shared schedule handed out: when it starts (Unix seconds on the schedule's
    clock) and how long the caller waits for it from when it was granted (0 or more)."""

    start_at: float
    wait_s: float


class ProviderPacer(Protocol):
    """Waits for a provider request's turn in the shared schedule."""

    def wait_turn(self, *, max_wait_s: float) -> float | None:
        """Block until this request's turn and return its start as the schedule granted it
        (Unix seconds on the schedule's clock: what the cap is kept on; the request itself
        leaves a little later, when the thread wakes); None at once (no turn taken) if the
        next free turn is more than ``max_wait_s`` away."""
        ...
