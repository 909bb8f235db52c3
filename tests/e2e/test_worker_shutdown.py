"""A worker stops within its graceful timeout whatever its activities are doing.

`billing worker` runs as a real process against a real Temporal dev server and a real
PostgreSQL database. A subscription workflow's first step (the sync of its status, a database
activity) is made to hang the way a real database hangs: another session holds a lock on the
subscriptions table, so the activity's thread waits inside the driver, where no cancellation
can reach it. SIGTERM must still end the process within BILLING_WORKER_GRACEFUL_SHUTDOWN_S plus
the margin for cancellations, saying what it abandoned. (Before, the worker waited for that
thread for as long as the database did.)
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool
from temporalio.client import Client

from billing.contracts import SubscriptionWorkflowInput, WorkflowName, workflow_id_for
from billing.devstack import spawn_temporal_dev_server
from billing.plans import parse_plan
from billing.settings import Settings
from billing.subscription import SubscriptionState
from billing.testing.database import temporary_database
from billing.worker import SHUTDOWN_MARGIN_S
from db.engine import normalize_url
from tests.conftest import POSTGRES_ADMIN_URL, require_postgres
from tests.e2e.test_cli_start_up import BILLING, environment, free_port, wait_for_text

GRACEFUL_S = 2.0
#: Process start-up of the signal handler's work and interpreter teardown on a busy machine.
SLACK_S = 5.0


@pytest.fixture
def postgres_url() -> Iterator[str]:
    require_postgres()
    with temporary_database("postgres", admin_url=POSTGRES_ADMIN_URL) as url:
        yield url


def _lock_waiters(url: str) -> int:
    """Sessions of this database waiting for a lock (the stuck activity)."""
    engine = create_engine(normalize_url(url), poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return int(
                connection.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                    )
                ).scalar_one()
            )
    finally:
        engine.dispose()


async def _start_subscription(address: str, task_queue: str) -> None:
    client = await Client.connect(address)
    now = datetime.now(UTC)
    plan = parse_plan(
        {
            "code": "basic-monthly",
            "name": "Basic",
            "amount_minor": 1000,
            "currency": "USD",
            "interval": "month",
        }
    )
    subscription_id = f"sub_{uuid.uuid4().hex[:20]}"
    state = SubscriptionState(
        subscription_id=subscription_id,
        customer_id="cus_shutdown",
        plan=plan,
        timezone="UTC",
        started_at=now,
        anchor_at=now + timedelta(days=30),
        trial_end_at=now + timedelta(days=30),
    )
    await client.start_workflow(
        WorkflowName.SUBSCRIPTION,
        SubscriptionWorkflowInput(state=state),
        id=workflow_id_for(subscription_id),
        task_queue=task_queue,
    )


def test_sigterm_stops_the_worker_within_its_graceful_timeout_while_an_activity_hangs(
    tmp_path: Path, postgres_url: str
) -> None:
    address = f"127.0.0.1:{free_port()}"
    settings = Settings(temporal_address=address, temporal_ui_port=free_port())
    server = spawn_temporal_dev_server(settings, db_filename=None, log=tmp_path / "t.log")
    env = environment(
        address,
        postgres_url,
        BILLING_WORKER_GRACEFUL_SHUTDOWN_S=str(GRACEFUL_S),
        # Nothing here calls the provider; a closed port makes sure of it.
        BILLING_STRIPE_API_BASE=f"http://127.0.0.1:{free_port()}",
    )
    locker = create_engine(normalize_url(postgres_url), poolclass=NullPool).connect()
    out, err = tmp_path / "worker.out", tmp_path / "worker.err"
    worker = None
    try:
        # The hang: a session that holds the subscriptions table and never lets go.
        locker.execute(text("LOCK TABLE subscriptions IN ACCESS EXCLUSIVE MODE"))
        with out.open("wb") as stdout, err.open("wb") as stderr:
            worker = subprocess.Popen([BILLING, "worker"], env=env, stdout=stdout, stderr=stderr)
        wait_for_text(out, "worker running", 60)
        asyncio.run(_start_subscription(address, env["BILLING_TASK_QUEUE"]))
        deadline = time.monotonic() + 60
        while _lock_waiters(postgres_url) == 0:
            assert time.monotonic() < deadline, "the sync activity never reached the database"
            assert worker.poll() is None, err.read_text()
            time.sleep(0.1)

        worker.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        bound = GRACEFUL_S + SHUTDOWN_MARGIN_S + SLACK_S
        try:
            code = worker.wait(timeout=bound)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"the worker still ran {bound:g} s after SIGTERM with an activity stuck in the "
                f"database; output:\n{err.read_text()}"
            )
        took = time.monotonic() - sent
        stderr_text = err.read_text()
        assert took >= GRACEFUL_S, f"exited after {took:.1f} s: the graceful period was skipped"
        assert code == 1, stderr_text
        assert "worker stopped with activities still running" in stderr_text
        assert "Traceback" not in stderr_text
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
            worker.wait()
        locker.close()
        server.stop()


def test_sigterm_stops_an_idle_worker_cleanly(tmp_path: Path) -> None:
    with temporary_database("sqlite") as sqlite_url:
        address = f"127.0.0.1:{free_port()}"
        settings = Settings(temporal_address=address, temporal_ui_port=free_port())
        server = spawn_temporal_dev_server(settings, db_filename=None, log=tmp_path / "t.log")
        out, err = tmp_path / "worker.out", tmp_path / "worker.err"
        try:
            with out.open("wb") as stdout, err.open("wb") as stderr:
                worker = subprocess.Popen(
                    [BILLING, "worker"],
                    env=environment(address, sqlite_url, BILLING_WORKER_GRACEFUL_SHUTDOWN_S="30"),
                    stdout=stdout,
                    stderr=stderr,
                )
            wait_for_text(out, "worker running", 60)
            sent = time.monotonic()
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=30) == 0, err.read_text()
            # Nothing was running: no reason to wait out the graceful period.
            assert time.monotonic() - sent < 15
        finally:
            if worker.poll() is None:
                worker.kill()
            server.stop()
