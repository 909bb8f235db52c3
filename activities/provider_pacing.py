"""``billing.pacing.ProviderPacer`` on the database: every worker process sharing the database
takes its provider requests' turns from one row (``db.repositories.pacing``)."""

from __future__ import annotations

import logging
import time

from sqlalchemy.orm import Session, sessionmaker

from billing.pacing import MAX_TURN_LATENESS_S, spacing_s
from db.engine import unit_of_work
from db.repositories import pacing as pacing_repo

__all__ = ["DatabasePacer"]

log = logging.getLogger(__name__)

#: The start of the warning ``wait_turn`` logs for each turn it gives up (the bench counts them).
TURN_GIVEN_UP = "provider turn given up"


class DatabasePacer:
    """At most ``cap_per_s`` provider requests in any one-second window across every process
    that paces with schedule ``name`` (the payments task queue's name) on this database."""

    def __init__(self, session_factory: sessionmaker[Session], *, name: str, cap_per_s: float):
        self._session_factory = session_factory
        self.name = name
        self.cap_per_s = cap_per_s
        self.spacing_s = spacing_s(cap_per_s)
        #: Turns this process woke up too late for and left unused (see ``wait_turn``).
        self.late_turns_given_up = 0

    def wait_turn(self, *, max_wait_s: float) -> float | None:
        """Sleep until the granted turn and return its start (Unix seconds on the schedule's
        clock); None at once, no turn taken, if the next free one is more than ``max_wait_s``
        away. A turn this process woke up too late for (``MAX_TURN_LATENESS_S``) is given up
        and the next free one taken, within the same ``max_wait_s``."""
        give_up_at = time.monotonic() + max(0.0, max_wait_s)
        while True:
            with unit_of_work(self._session_factory) as session:
                turn = pacing_repo.claim_turn(
                    session,
                    self.name,
                    spacing_s=self.spacing_s,
                    max_wait_s=max(0.0, give_up_at - time.monotonic()),
                )
                # Counted from the grant's answer, before the commit: the database's clock may
                # not be this machine's, so the wait it computed is taken from when it
                # answered. The commit and the thread's way back to here are part of the
                # request's lateness, checked below like the sleep's: counted from after the
                # commit, they went unchecked and, on a starved machine, a request left up to
                # 200 ms after its turn with the check seeing under 40 (one too many in a
                # second at the provider, docs/benchmarks.md "Issue 16, session 8").
                due = time.monotonic() + (turn.wait_s if turn is not None else 0.0)
            if turn is None:
                return None
            if turn.wait_s > 0:
                time.sleep(turn.wait_s)
            late_s = time.monotonic() - due
            if late_s <= MAX_TURN_LATENESS_S:
                return turn.start_at
            self.late_turns_given_up += 1
            # Each one costs a turn of the cap: many mean the worker is starved of CPU.
            log.warning(
                "%s: this worker woke %.0f ms after its turn (more than %.0f ms could put more "
                "than the cap in one second at the provider); taking the next free one",
                TURN_GIVEN_UP,
                late_s * 1000,
                MAX_TURN_LATENESS_S * 1000,
            )
