"""The API as ``billing api`` serves it (``create_app`` with the Stripe webhook router and a
webhook secret), on a BillingHarness (real worker on the time-skipping server, localstripe,
a real database), called in-process through ``httpx.ASGITransport``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from billing.api import create_app
from billing.api.webhooks import webhook_router
from billing.settings import Settings
from billing.testing.harness import BillingHarness
from tests.api.support import Api, api_settings
from tests.api.webhook_fixtures import WEBHOOK_SECRET


def full_settings(harness: BillingHarness) -> Settings:
    return api_settings(harness).model_copy(
        update={"stripe_webhook_secret": SecretStr(WEBHOOK_SECRET)}
    )


@pytest.fixture
def full_app(harness: BillingHarness) -> FastAPI:
    return create_app(
        full_settings(harness),
        deps=harness.deps,
        temporal=harness.client,
        include_routers=[webhook_router()],
    )


@pytest.fixture
async def api(full_app: FastAPI, harness: BillingHarness) -> AsyncIterator[Api]:
    transport = httpx.ASGITransport(app=full_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://billing.test") as client:
        yield Api(client, harness)
