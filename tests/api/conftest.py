"""The API under test: the real app (``create_app``) on a BillingHarness (real worker on the
time-skipping server, localstripe, a real database), called in-process through
``httpx.ASGITransport``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from temporalio.testing import WorkflowEnvironment

from billing.api import create_app
from billing.testing.harness import BillingHarness
from billing.testing.localstripe import LocalStripe
from tests.api.support import Api, api_settings


@pytest.fixture
async def harness(
    temporal_env: WorkflowEnvironment, localstripe: LocalStripe, database_url: str
) -> AsyncIterator[BillingHarness]:
    # Not the recording harness: API tests add no histories to the replay set.
    async with BillingHarness(
        temporal_env, database_url=database_url, stripe_api_base=localstripe.url
    ) as h:
        yield h


@pytest.fixture
def app(harness: BillingHarness) -> FastAPI:
    return create_app(api_settings(harness), deps=harness.deps, temporal=harness.client)


@pytest.fixture
async def api(app: FastAPI, harness: BillingHarness) -> AsyncIterator[Api]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://billing.test") as client:
        yield Api(client, harness)
