"""Engine and session setup, and the unit of work: one commit per activity or request."""

from __future__ import annotations

import collections
import fcntl
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event, exc
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


def make_engine(
    url: str | URL,
    *,
    throwaway: bool = False,
    pool: Mapping[str, int] | None = None,
    **engine_options: Any,
) -> Engine:
    """An engine for SQLite (the embedded default) or PostgreSQL (``postgresql+psycopg``).

    ``throwaway``: a SQLite database nobody keeps (simulations) skips fsync on commit; never
    set it for real money. ``pool``: PostgreSQL's ``pool_size`` and ``max_overflow``
    (``Settings.database_pool``; None: SQLAlchemy's 5 and 10); SQLite ignores it, its
    writers take turns anyway. ``engine_options`` go to ``create_engine`` (e.g. ``echo``).
    """
    parsed = normalize_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(parsed, **{**dict(pool or {}), **engine_options})

    connect_args = dict(engine_options.pop("connect_args", {}))
    # Activities run in worker threads; the pool hands one connection to one thread at a time.
    connect_args.setdefault("check_same_thread", False)
    engine = create_engine(parsed, connect_args=connect_args, **engine_options)
    _configure_sqlite(
        engine, synchronous="OFF" if throwaway else "FULL", turn=_TransactionTurn(parsed.database)
    )
    return engine


class _FifoLock:
    """A lock handed to its waiters in the order they came (``threading.Lock`` lets the thread
    that releases it take it straight back, so a waiter could be passed over again and
    again)."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._held = False
        self._waiters: collections.deque[threading.Lock] = collections.deque()

    def acquire(self, timeout_s: float) -> bool:
        with self._mutex:
            if not self._held:
                self._held = True
                return True
            waiter = threading.Lock()
            waiter.acquire()
            self._waiters.append(waiter)
        if waiter.acquire(timeout=timeout_s):
            return True  # handed over by release()
        with self._mutex:
            try:
                self._waiters.remove(waiter)
            except ValueError:
                return True  # handed over just as the wait timed out
            return False

    def release(self) -> None:
        with self._mutex:
            if self._waiters:
                self._waiters.popleft().release()  # still held: now by that waiter
            else:
                self._held = False


#: How often a process waiting for another process's transaction looks again, in seconds.
TURN_POLL_S = 0.001
#: The key in a pooled connection's ``info`` saying it holds the turn.
_HOLDS_TURN = "billing_holds_transaction_turn"


class _TransactionTurn:
    """One transaction at a time on a SQLite database, handed over promptly.

    Every transaction here takes SQLite's write lock at BEGIN (IMMEDIATE, see
    ``_configure_sqlite``), so they run one after another anyway. Left to SQLite, a waiting
    connection sleeps in its busy handler, up to 100 ms between looks, and meanwhile other
    threads take the lock in the gaps: with many activity threads on a loaded machine a
    transaction was seen waiting out the whole busy timeout and failing with "database is
    locked" (then retried by Temporal; a simulation stands still meanwhile). So each engine
    queues its threads on a lock, and the one at the front waits for other processes on an
    advisory lock of a file beside the database (``<database>-turn``), looking every
    millisecond. SQLite's own locking is untouched: this only orders who asks.
    """

    def __init__(self, database: str | None) -> None:
        self._threads = _FifoLock()
        in_memory = not database or database == ":memory:" or database.startswith("file:")
        self._path = None if in_memory else f"{database}-turn"
        self._fd: int | None = None
        self._timeout_s = SQLITE_BUSY_TIMEOUT_MS / 1000

    def install(self, engine: Engine) -> None:
        """Give the turn back when a connection returns to the pool: after its COMMIT or
        ROLLBACK (the engine's commit event comes before the COMMIT, when the next
        transaction would still find SQLite locked). A unit of work is one checkout."""

        # A plain function: the listeners are what keeps this object alive.
        def on_checkin(_dbapi_connection: Any, record: Any) -> None:
            self._release(record.info)

        event.listen(engine.pool, "checkin", on_checkin)

    def take(self, connection: Any) -> None:
        """Wait for the turn before ``connection`` begins (called by the begin listener, before
        its BEGIN IMMEDIATE)."""
        info = connection.connection.info
        if info.get(_HOLDS_TURN):
            return
        if not self._acquire():
            raise exc.OperationalError(
                "BEGIN IMMEDIATE",
                None,
                sqlite3.OperationalError(
                    f"database is locked (no turn within {self._timeout_s:g} s)"
                ),
            )
        info[_HOLDS_TURN] = True

    def _acquire(self) -> bool:
        deadline = time.monotonic() + self._timeout_s
        if not self._threads.acquire(self._timeout_s):
            return False
        if self._path is None:
            return True
        try:
            if self._fd is None:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
                # Closed with the engine (its listeners hold this object).
                weakref.finalize(self, os.close, self._fd)
            while True:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return True
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        self._threads.release()
                        return False
                    time.sleep(TURN_POLL_S)
        except OSError:
            # No file beside the database (a read-only folder): SQLite's own busy handler
            # orders the processes, as without this class.
            return True
        except BaseException:
            self._threads.release()
            raise

    def _release(self, info: dict[str, Any]) -> None:
        if not info.pop(_HOLDS_TURN, False):
            return
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._threads.release()


def _configure_sqlite(engine: Engine, *, synchronous: str, turn: _TransactionTurn) -> None:
    turn.install(engine)

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
        # They queue for their turn first (_TransactionTurn), so the BEGIN rarely waits.
        turn.take(connection)
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
