"""The readiness probe's database check: one trivial query."""

from __future__ import annotations

from sqlalchemy import literal, select
from sqlalchemy.orm import Session


def ping(session: Session) -> bool:
    """True when the database answered ``SELECT 1``."""
    return session.execute(select(literal(1))).scalar_one() == 1
