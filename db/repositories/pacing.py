"""The shared schedule of provider requests (``billing.pacing``): one atomic statement per
turn, so any number of workers, threads and processes share it without a lock of ours."""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, and_, func, insert, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from billing.pacing import GrantedTurn
from db.models import PROVIDER_PACING

__all__ = ["claim_turn"]


def _now(session: Session) -> ColumnElement[Any]:
    """Now, in Unix seconds: the database server's own clock on PostgreSQL (one clock for
    every worker, whatever theirs say); this machine's on SQLite (a file on one machine), read
    by SQLite when the statement runs, i.e. once it holds the write lock (to the millisecond):
    a time taken before the statement was sent would be stale by however long it waited for
    the lock, and a turn granted on an idle schedule would then start in the past."""
    if session.get_bind().dialect.name == "postgresql":
        return func.extract("epoch", func.clock_timestamp())
    # julianday('now') counts days from noon, 24 November 4714 BC; the Unix epoch is day
    # 2440587.5 of it.
    return (func.julianday("now") - 2440587.5) * 86400.0


def _later(session: Session, a: ColumnElement[Any], b: ColumnElement[Any]) -> ColumnElement[Any]:
    if session.get_bind().dialect.name == "postgresql":
        return func.greatest(a, b)
    return func.max(a, b)  # SQLite's scalar max of its arguments


def claim_turn(
    session: Session, name: str, *, spacing_s: float, max_wait_s: float
) -> GrantedTurn | None:
    """Take the next free turn of schedule ``name``: when it starts and the seconds to wait
    until it (0 or more), or None, taking nothing, if it is more than ``max_wait_s`` away. One
    UPDATE, atomic on both databases: the turn ``max(next_free_at, now)`` is handed out and the
    next free turn moves ``spacing_s`` after it."""
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
            start_at = next_free_at - spacing_s
            return GrantedTurn(start_at=start_at, wait_s=max(0.0, start_at - at))
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
