"""Engine and session setup, and the unit of work: one commit per activity or request."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
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


#: ``session.info`` key: this transaction wrote a notice or an event delivery to send.
_DELIVERY_WRITTEN = "billing.delivery_written"

log = logging.getLogger(__name__)


def mark_delivery_written(session: Session) -> None:
    """Note that the session's transaction wrote something for the delivery dispatcher (a
    pending notice or event delivery); ``on_delivery_commit`` callbacks run once it commits."""
    session.info[_DELIVERY_WRITTEN] = True


def on_delivery_commit(
    session_factory: sessionmaker[Session], callback: Callable[[], None]
) -> Callable[[], None]:
    """Call ``callback`` after each commit of a ``session_factory`` session that wrote a
    notice or an event delivery (never after a rollback). Best effort: it runs in the
    committing thread, must not block, and an error in it is logged, never raised (the
    commit happened; the dispatcher's poll still finds the rows). Returns what removes the
    callback again."""

    def after_commit(session: Session) -> None:
        if session.info.pop(_DELIVERY_WRITTEN, False):
            try:
                callback()
            except Exception:
                log.warning("waking the delivery dispatcher failed", exc_info=True)

    def after_rollback(session: Session) -> None:
        session.info.pop(_DELIVERY_WRITTEN, None)

    event.listen(session_factory, "after_commit", after_commit)
    event.listen(session_factory, "after_rollback", after_rollback)

    def remove() -> None:
        event.remove(session_factory, "after_commit", after_commit)
        event.remove(session_factory, "after_rollback", after_rollback)

    return remove
