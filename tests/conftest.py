"""Shared fixtures: one localstripe process and one time-skipping Temporal test server per
session; a fresh, migrated database per test (SQLite, or PostgreSQL where marked).

PostgreSQL tests run wherever a server is reachable. Under CI=true an unreachable server is a
failure, not a skip.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
from temporalio.testing import WorkflowEnvironment

from billing.testing.database import postgres_available, temporary_database
from billing.testing.harness import BillingHarness, start_time_skipping_environment
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
def localstripe() -> Iterator[LocalStripe]:
    with LocalStripe() as server:
        yield server


@pytest.fixture
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    """A fresh time-skipping server per test (0.1 s to start): its clock only moves forward,
    so tests that bill at fixed dates each need their own."""
    env = await start_time_skipping_environment()
    try:
        yield env
    finally:
        await env.shutdown()


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


@pytest.fixture
async def harness(
    temporal_env: WorkflowEnvironment, localstripe: LocalStripe, database_url: str
) -> AsyncIterator[BillingHarness]:
    async with BillingHarness(
        temporal_env, database_url=database_url, stripe_api_base=localstripe.url
    ) as h:
        yield h


BOTH_BACKENDS = pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
