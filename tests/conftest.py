"""Shared fixtures: one localstripe process and one time-skipping Temporal test server per
session; a fresh, migrated database per test (SQLite, or PostgreSQL where marked).

PostgreSQL tests run wherever a server is reachable. Under CI=true an unreachable server is a
failure, not a skip.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from billing.testing.database import postgres_available, temporary_database
from billing.testing.harness import BillingHarness
from billing.testing.localstripe import LocalStripe

IN_CI = os.environ.get("CI", "").lower() == "true"
POSTGRES_ADMIN_URL = os.environ.get(
    "BILLING_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def require_postgres() -> None:
    if postgres_available(POSTGRES_ADMIN_URL):
        return
    message = f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL}"
    if IN_CI:
        pytest.fail(f"{message}; CI=true requires it (start it, see .ci/run)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def localstripe(billing_localstripe: LocalStripe) -> LocalStripe:
    """The plugin's session localstripe (one process for the whole run)."""
    return billing_localstripe


@pytest.fixture
def temporal_env(billing_env: WorkflowEnvironment) -> WorkflowEnvironment:
    """The plugin's time-skipping server: a fresh one per test (0.1 s to start), because its
    clock only moves forward and tests that bill at fixed dates each need their own."""
    return billing_env


@pytest.fixture(params=["sqlite"])
def backend(request: pytest.FixtureRequest) -> str:
    """Override with ``@pytest.mark.parametrize("backend", ["sqlite", "postgres"])``."""
    return str(request.param)


@pytest.fixture
def database_url(backend: str) -> Iterator[str]:
    if backend == "postgres":
        require_postgres()
        with temporary_database("postgres", admin_url=POSTGRES_ADMIN_URL) as url:
            yield url
    else:
        with temporary_database("sqlite") as url:
            yield url


HISTORIES_DIR = Path(__file__).parent / "histories"
RECORD_HISTORIES = os.environ.get("BILLING_RECORD_HISTORIES") == "1"


async def record_histories(h: BillingHarness, test_name: str) -> None:
    """Save the runs of every subscription the test started, for the replay test. Long chains
    keep their first three runs and the last one."""
    for n, subscription_id in enumerate(h.started_subscription_ids):
        runs = await h.run_histories(subscription_id)
        keep = list(enumerate(runs))
        if len(keep) > 4:
            keep = [*keep[:3], keep[-1]]
        for index, history in keep:
            name = f"{test_name}-s{n}-run{index + 1}.json"
            (HISTORIES_DIR / name).write_text(history.to_json())


async def record_workflow_history(client: Client, workflow_id: str, test_name: str) -> None:
    """Save the latest run of ``workflow_id`` (any workflow type: refunds, payouts, the
    settlement sync, an invoice's payment) for the replay test when
    BILLING_RECORD_HISTORIES=1; named after the test and the workflow type."""
    if not RECORD_HISTORIES:
        return
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    started = history.events[0].workflow_execution_started_event_attributes
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", test_name)
    (HISTORIES_DIR / f"{safe}-{started.workflow_type.name}.json").write_text(history.to_json())


@contextlib.asynccontextmanager
async def recorded_harness(
    request: pytest.FixtureRequest,
    temporal_env: WorkflowEnvironment,
    localstripe: LocalStripe,
    database_url: str,
    **options: Any,
) -> AsyncIterator[BillingHarness]:
    """A BillingHarness whose workflow histories are saved for the replay test when
    BILLING_RECORD_HISTORIES=1."""
    async with BillingHarness(
        temporal_env, database_url=database_url, stripe_api_base=localstripe.url, **options
    ) as h:
        yield h
        if RECORD_HISTORIES:
            safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
            await record_histories(h, safe)


@pytest.fixture
async def harness(
    request: pytest.FixtureRequest,
    temporal_env: WorkflowEnvironment,
    localstripe: LocalStripe,
    database_url: str,
) -> AsyncIterator[BillingHarness]:
    async with recorded_harness(request, temporal_env, localstripe, database_url) as h:
        yield h


BOTH_BACKENDS = pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
