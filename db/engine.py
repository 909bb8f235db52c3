"""Engine and session setup, and the unit of work: one commit per activity or request."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

#: How long SQLite waits for another connection's write lock before failing, in milliseconds.
SQLITE_BUSY_TIMEOUT_MS = 5000


def normalize_url(url: str | URL) -> URL:
    """Parse ``url``; ``postgresql://`` and ``postgres://`` mean PostgreSQL through psycopg 3."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def make_engine(url: str | URL, *, throwaway: bool = False, **engine_options: Any) -> Engine:
    """An engine for SQLite (the embedded default) or PostgreSQL (``postgresql+psycopg``).

    ``throwaway``: a SQLite database nobody keeps (simulations) skips fsync on commit; never
    set it for real money. ``engine_options`` go to ``create_engine`` (e.g. ``echo``).
    """
    parsed = normalize_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(parsed, **engine_options)

    connect_args = dict(engine_options.pop("connect_args", {}))
    # Activities run in worker threads; the pool hands one connection to one thread at a time.
    connect_args.setdefault("check_same_thread", False)
    engine = create_engine(parsed, connect_args=connect_args, **engine_options)
    _configure_sqlite(engine, synchronous="OFF" if throwaway else "FULL")
    return engine


def _configure_sqlite(engine: Engine, *, synchronous: str) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module: in its legacy mode it does
        # not BEGIN before SELECT or SAVEPOINT, so savepoints (used for idempotent inserts)
        # would not roll back with the enclosing transaction. We emit BEGIN ourselves below.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            # SQLite ships with foreign keys off; the schema relies on them.
            cursor.execute("PRAGMA foreign_keys=ON")
            # WAL lets readers proceed while one writer commits.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            # FULL: a committed payment survives a power cut. OFF only for throwaway databases.
            cursor.execute(f"PRAGMA synchronous={synchronous}")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # IMMEDIATE takes the write lock up front. With a deferred BEGIN, a transaction that
        # reads and then writes (allocate a number, compare-and-set a status) fails at once
        # with "database is locked" when another writer got there first, and busy_timeout
        # does not help; IMMEDIATE makes concurrent workers queue for up to busy_timeout.
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose loaded values stay readable after commit (``expire_on_commit=False``)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def unit_of_work(session_factory: sessionmaker[Session]) -> Iterator[Session]:
    """One transaction: commit when the block ends normally, roll back if it raises.

    Use one per activity or request, so everything it writes lands together or not at all.
    """
    with session_factory() as session, session.begin():
        yield session
