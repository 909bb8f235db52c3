"""Engine setup, the unit of work, and the test database helpers themselves."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import Engine, event, insert, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from billing.settings import Settings
from billing.testing.database import postgres_available, temporary_database
from billing.worker import build_dependencies
from db.engine import make_engine, normalize_url, unit_of_work
from db.models import NotificationRow
from db.repositories import customers

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Nothing listens on port 1.
UNREACHABLE_POSTGRES = "postgresql://postgres@127.0.0.1:1/postgres"


# Narrow the session-wide ``backend`` parameter for tests about one backend only.
ONLY_SQLITE = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
ONLY_POSTGRES = pytest.mark.parametrize(
    "backend", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)


class Abort(Exception):
    pass


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://billing:secret@db.internal:5433/billing",
        "postgres://billing:secret@db.internal:5433/billing",
        "postgresql+psycopg://billing:secret@db.internal:5433/billing",
    ],
)
def test_postgres_urls_use_psycopg_3(url: str) -> None:
    parsed = normalize_url(url)
    assert parsed.drivername == "postgresql+psycopg"
    assert (parsed.host, parsed.port, parsed.database) == ("db.internal", 5433, "billing")
    assert parsed.password == "secret"
    engine = make_engine(url)
    assert engine.dialect.driver == "psycopg"
    engine.dispose()


@ONLY_SQLITE
def test_sqlite_connections_enforce_foreign_keys_and_use_wal(engine: Engine) -> None:
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000


def test_unit_of_work_commits_on_success(
    session_factory: sessionmaker[Session], factory: Any
) -> None:
    with unit_of_work(session_factory) as session:
        customer = factory.customer(session)
    with unit_of_work(session_factory) as session:
        assert customers.get_customer(session, customer.id) == customer


def test_unit_of_work_rolls_back_everything_on_error(
    session_factory: sessionmaker[Session], factory: Any
) -> None:
    with pytest.raises(Abort), unit_of_work(session_factory) as session:
        customer = factory.customer(session)
        raise Abort
    with unit_of_work(session_factory) as session:
        assert customers.get_customer(session, customer.id) is None


def test_a_released_savepoint_still_rolls_back_with_its_transaction(
    session_factory: sessionmaker[Session], factory: Any
) -> None:
    """Idempotent inserts run in savepoints. On SQLite that is only sound because the engine
    emits BEGIN itself: in the sqlite3 module's legacy mode a SAVEPOINT opened outside a
    transaction commits on release, and a later rollback would not undo it."""
    with pytest.raises(Abort), unit_of_work(session_factory) as session:
        customer = factory.customer(session)  # inserted and released inside a savepoint
        raise Abort
    with unit_of_work(session_factory) as session:
        assert customers.get_customer(session, customer.id) is None
        # The failed insert of an idempotent pair rolls back only its savepoint.
        kept = factory.customer(session)
        notice = {
            "id": "ntf_1",
            "kind": "trial_ending",
            "customer_id": "cus_missing",
            "dedupe_key": "k1",
            "payload": {},
            "created_at": factory.t0,
        }
        with pytest.raises(IntegrityError, match=r"(?i)foreign key"), session.begin_nested():
            session.execute(insert(NotificationRow).values(notice))
    with unit_of_work(session_factory) as session:
        assert customers.get_customer(session, kept.id) == kept
        assert session.execute(select(NotificationRow.id)).all() == []


def test_postgres_available_answers_fast_when_nothing_listens() -> None:
    started = time.monotonic()
    assert postgres_available(UNREACHABLE_POSTGRES) is False
    assert time.monotonic() - started < 3


@ONLY_POSTGRES
def test_temporary_postgres_database_is_dropped_afterwards(admin_url: str, backend: str) -> None:
    with temporary_database("postgres", admin_url=admin_url) as url:
        name = normalize_url(url).database
        assert name is not None and name.startswith("billing_test_")
        # A leaked connection must not keep the database alive.
        leaky_engine = make_engine(url)
        leaked = leaky_engine.connect()
        leaked.execute(text("SELECT 1"))
    leaked.invalidate()  # the server already closed it; release the Python side too
    leaky_engine.dispose()
    admin = make_engine(admin_url)
    try:
        with admin.connect() as connection:
            exists = connection.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}
            ).first()
    finally:
        admin.dispose()
    assert exists is None


def test_temporary_sqlite_database_is_removed_afterwards() -> None:
    with temporary_database("sqlite") as url:
        path = Path(str(normalize_url(url).database))
        assert path.exists()
    assert not path.parent.exists()


def _run_postgres_test_without_server(ci: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["BILLING_TEST_POSTGRES_URL"] = UNREACHABLE_POSTGRES
    if ci is not None:
        env["CI"] = ci
    node = "tests/db/test_db_engine.py::test_unit_of_work_commits_on_success[postgres]"
    return subprocess.run(
        [sys.executable, "-m", "pytest", node, "-q", "-rs", "-p", "no:cacheprovider"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_without_a_server_postgres_tests_skip_locally() -> None:
    result = _run_postgres_test_without_server(ci=None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout
    assert "not reachable" in result.stdout


def test_without_a_server_postgres_tests_fail_under_ci() -> None:
    result = _run_postgres_test_without_server(ci="true")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "skipped" not in result.stdout
    assert "CI=true" in result.stdout


@ONLY_POSTGRES
def test_the_worker_pool_keeps_a_connection_per_busy_thread(database_url: str) -> None:
    """Sixteen threads, each running short transactions at once, as a worker's activity
    threads do in a burst: with the pool the settings give (``database_pool``), PostgreSQL
    sees one connection per thread and no more; with SQLAlchemy's default (5 kept), the
    threads beyond five open and close a connection (a PostgreSQL backend) again and again."""
    settings = Settings(_env_file=None, database_url=database_url)  # type: ignore[call-arg]
    assert settings.database_pool() == {"pool_size": 32, "max_overflow": 16}

    def connections_opened(engine: Engine) -> int:
        opened = [0]

        def count(*_: Any) -> None:
            opened[0] += 1

        event.listen(engine, "connect", count)
        factory = sessionmaker(engine)
        barrier = threading.Barrier(16)

        def work() -> None:
            barrier.wait()
            for _ in range(20):
                with unit_of_work(factory) as session:
                    session.execute(text("SELECT pg_sleep(0.001)"))
                time.sleep(0.003)  # the activity's own work between two transactions

        threads = [threading.Thread(target=work) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        engine.dispose()
        return opened[0]

    assert connections_opened(make_engine(database_url, pool=settings.database_pool())) <= 16
    assert connections_opened(make_engine(database_url)) > 16


def test_the_pool_size_is_a_setting_with_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BILLING_DATABASE_POOL_SIZE", "4")
    monkeypatch.setenv("BILLING_ACTIVITY_THREADS", "8")
    assert Settings(_env_file=None).database_pool() == {"pool_size": 4, "max_overflow": 8}  # type: ignore[call-arg]
    monkeypatch.setenv("BILLING_DATABASE_POOL_SIZE", "0")
    with pytest.raises(ValidationError, match="database_pool_size"):
        Settings(_env_file=None)  # type: ignore[call-arg]


@ONLY_POSTGRES
def test_the_workers_engine_takes_the_pool_from_the_settings(database_url: str) -> None:
    settings = Settings(_env_file=None, database_url=database_url, database_pool_size=7)  # type: ignore[call-arg]
    deps = build_dependencies(settings)
    pool = deps.session_factory.kw["bind"].pool
    assert (pool.size(), pool._max_overflow) == (7, settings.activity_threads)
