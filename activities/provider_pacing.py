"""``billing.pacing.ProviderPacer`` on the database: every worker process sharing the database
takes its provider requests' slots from one ring (``db.repositories.pacing``)."""

from __future__ import annotations

import logging
import secrets
import threading
import time

from sqlalchemy.orm import Session, sessionmaker

from billing.pacing import (
    HOLD_LEASE_S,
    MAX_LATENESS_S,
    ClockOffset,
    min_gap_s,
    pause_before_asking_again,
    slot_count,
    slot_reuse_s,
)
from db.engine import unit_of_work
from db.repositories import pacing as pacing_repo

__all__ = ["PACER_RESTAMPED", "DatabasePacer"]

log = logging.getLogger(__name__)

#: The start of the warning ``wait_turn`` logs each time a request, later than its planned
#: instant by more than ``MAX_LATENESS_S``, stamps its slot again (the bench counts them).
PACER_RESTAMPED = "provider slot stamped again"


class DatabasePacer:
    """At most ``cap_per_s`` provider requests in any one-second window across every process
    that paces with ring ``name`` (the payments task queue's name) on this database."""

    def __init__(self, session_factory: sessionmaker[Session], *, name: str, cap_per_s: float):
        self._session_factory = session_factory
        self.name = name
        self.cap_per_s = cap_per_s
        self.slots = slot_count(cap_per_s)
        self.reuse_s = slot_reuse_s(cap_per_s)
        self.gap_s = min_gap_s(cap_per_s)
        #: Times a request of this process left later than planned and stamped its slot again.
        self.restamps = 0
        #: Holds this process lost to their lease running out before it could stamp again.
        self.holds_lost = 0
        # The database's clock against this process's, from every statement's round trip.
        self._clock = ClockOffset()
        self._clock_lock = threading.Lock()

    def wait_turn(self, *, max_wait_s: float) -> float | None:
        """Hold a slot, sleep until its planned instant and return the stamp the request
        leaves on (Unix seconds on the schedule's clock): the plan, or, if this thread got
        there more than ``MAX_LATENESS_S`` late, a fresh stamp now. None at once, nothing
        taken, if no slot comes free within ``max_wait_s``."""
        give_up_at = time.monotonic() + max(0.0, max_wait_s)
        token = secrets.token_hex(16)
        while True:
            asked = time.monotonic()
            with unit_of_work(self._session_factory) as session:
                held = pacing_repo.hold_slot(
                    session,
                    self.name,
                    count=self.slots,
                    reuse_s=self.reuse_s,
                    gap_s=self.gap_s,
                    token=token,
                    max_wait_s=max(0.0, give_up_at - time.monotonic()),
                    lease_s=HOLD_LEASE_S,
                )
                ring = (
                    None
                    if held is not None
                    else pacing_repo.outlook(session, self.name, count=self.slots)
                )
            answered = time.monotonic()
            if held is None:
                assert ring is not None
                pause = self._pause(ring, give_up_at)
                if pause is None:
                    return None
                if pause > 0:
                    time.sleep(pause)
                continue
            # The plan is on the database's clock, which may not be this machine's: it is
            # placed on this machine's clock by the offset the round trips allow. Sleeping
            # to its latest placing never leaves before the plan; lateness is counted from
            # its earliest. (Taken from the answer alone, a busy worker's slow way back,
            # up to 200 ms of waiting for the interpreter in session 12's trace, went
            # uncounted: 21 requests reached the provider in one second under a cap of 20.)
            with self._clock_lock:
                self._clock.add(asked=asked, answered=answered, remote=held.now)
                low, high = self._clock.bounds(answered)
            sleep_s = held.at - low - time.monotonic()
            if sleep_s > 0:
                time.sleep(sleep_s)
            at = self._leave(held, token, held.at - high)
            if at is not None:
                return at
            # The hold lapsed while this thread was away and another took the slot: take a
            # slot afresh.

    def _pause(self, ring: pacing_repo.Outlook, give_up_at: float) -> float | None:
        """How long to sleep before asking again when no slot could be held; None: no slot
        comes free before ``give_up_at``."""
        if ring.slots < self.slots:  # a new ring (or a bigger cap): make its slots
            with unit_of_work(self._session_factory) as session:
                pacing_repo.create_slots(session, self.name, count=self.slots)
            return 0.0
        return pause_before_asking_again(
            now=ring.now,
            soonest_unheld=ring.soonest_unheld,
            soonest_lapse=ring.soonest_lapse,
            left_s=give_up_at - time.monotonic(),
            cap_per_s=self.cap_per_s,
        )

    def _leave(self, held: pacing_repo.Held, token: str, earliest_due: float) -> float | None:
        """The stamp to leave on: the plan if this thread is back within ``MAX_LATENESS_S``
        of the earliest local instant the plan can stand for (``earliest_due``), else a fresh
        stamp, taken again as long as the thread is back more than that after asking for it;
        None if the hold was lost meanwhile."""
        at = held.at
        while True:
            late_s = time.monotonic() - earliest_due
            if late_s <= MAX_LATENESS_S:
                return at
            self.restamps += 1
            # Each one moves one slot later by the lateness: many mean the worker is starved.
            log.warning(
                "%s: this worker got to its request %.0f ms after its stamp (more than %.0f ms "
                "could put more than the cap in one second at the provider)",
                PACER_RESTAMPED,
                late_s * 1000,
                MAX_LATENESS_S * 1000,
            )
            asked = time.monotonic()
            with unit_of_work(self._session_factory) as session:
                stamp = pacing_repo.restamp(
                    session, self.name, slot=held.slot, token=token, reuse_s=self.reuse_s
                )
            answered = time.monotonic()
            if stamp is None:
                self.holds_lost += 1
                log.warning(
                    "provider slot %d of %s was taken by another request while this one was "
                    "away more than %.1f s; taking a slot afresh",
                    held.slot,
                    self.name,
                    HOLD_LEASE_S,
                )
                return None
            # The new stamp is the database's clock when it was written: its way back and
            # the commit count as lateness again.
            with self._clock_lock:
                self._clock.add(asked=asked, answered=answered, remote=stamp)
                earliest_due = stamp - self._clock.bounds(answered)[1]
            at = stamp
