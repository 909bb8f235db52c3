"""``billing.pacing.ProviderPacer`` on the database: every worker process sharing the database
takes its provider requests' turns from one row (``db.repositories.pacing``)."""

from __future__ import annotations

import time

from sqlalchemy.orm import Session, sessionmaker

from billing.pacing import spacing_s
from db.engine import unit_of_work
from db.repositories import pacing as pacing_repo

__all__ = ["DatabasePacer"]


class DatabasePacer:
    """At most ``cap_per_s`` provider requests in any one-second window across every process
    that paces with schedule ``name`` (the payments task queue's name) on this database."""

    def __init__(self, session_factory: sessionmaker[Session], *, name: str, cap_per_s: float):
        self._session_factory = session_factory
        self.name = name
        self.cap_per_s = cap_per_s
        self.spacing_s = spacing_s(cap_per_s)

    def wait_turn(self, *, max_wait_s: float) -> bool:
        with unit_of_work(self._session_factory) as session:
            wait = pacing_repo.claim_turn(
                session, self.name, spacing_s=self.spacing_s, max_wait_s=max(0.0, max_wait_s)
            )
        if wait is None:
            return False
        if wait > 0:
            time.sleep(wait)
        return True
