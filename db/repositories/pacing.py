"""The shared schedule of provider requests (``billing.pacing``): one atomic statement per
turn, so any number of workers, threads and processes share it without a lock of ours."""

from __future__ import annotations

import time
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, and_, func, insert, literal, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from db.models import PROVIDER_PACING

__all__ = ["claim_turn"]


def _now(session: Session) -> ColumnElement[Any]:
    """Now, in Unix seconds: the database server's own clock on PostgreSQL (one clock for
    every worker, whatever theirs say); this machine's on SQLite (a file on one machine)."""
    if session.get_bind().dialect.name == "postgresql":
        return func.extract("epoch", func.clock_timestamp())
    return literal(time.time())


def _later(session: Session, a: ColumnElement[Any], b: ColumnElement[Any]) -> ColumnElement[Any]:
    if session.get_bind().dialect.name == "postgresql":
        return func.greatest(a, b)
    return func.max(a, b)  # SQLite's scalar max of its arguments


def claim_turn(session: Session, name: str, *, spacing_s: float, max_wait_s: float) -> float | None:
    """Take the next free turn of schedule ``name``: the seconds to wait until it (0 or more),
    or None, taking nothing, if it is more than ``max_wait_s`` away. One UPDATE, atomic on
    both databases: the turn ``max(next_free_at, now)`` is handed out and the next free turn
    moves ``spacing_s`` after it."""
    now = _now(session)
    start = _later(session, PROVIDER_PACING.c.next_free_at, now)
    for _ in range(2):
        row = session.execute(
            update(PROVIDER_PACING)
            .where(and_(PROVIDER_PACING.c.name == name, start - now <= max_wait_s))
            .values(next_free_at=start + spacing_s)
            .returning(PROVIDER_PACING.c.next_free_at, now)
        ).first()
        if row is not None:
            next_free_at, at = float(row[0]), float(row[1])
            return max(0.0, next_free_at - spacing_s - at)
        if not _create(session, name):
            return None  # the row exists: its next free turn is too far away
    return None


def _create(session: Session, name: str) -> bool:
    """Create schedule ``name``, free from now; False if it exists already."""
    values = {"name": name, "next_free_at": 0.0}
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        statement: Any = pg_insert(PROVIDER_PACING).values(values).on_conflict_do_nothing()
    elif dialect == "sqlite":
        statement = sqlite_insert(PROVIDER_PACING).values(values).on_conflict_do_nothing()
    else:
        statement = insert(PROVIDER_PACING).values(values)
    result = cast(CursorResult[Any], session.execute(statement))
    return bool(result.rowcount)
