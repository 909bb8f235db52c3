"""Fixtures shared by the workflow tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from temporalio.testing import WorkflowEnvironment

from billing.payments import PaymentGateway
from billing.simulate.provider import BankReports, ReportingGateway
from billing.testing.harness import BillingHarness
from billing.testing.localstripe import LocalStripe
from tests.conftest import recorded_harness


def StolenCardGateway(inner: PaymentGateway) -> ReportingGateway:
    """The real gateway, except that a decline comes back as `stolen_card`, as real Stripe
    reports it. localstripe declines stolen/lost test cards at attach time and never returns a
    decline_code on a charge, so this is a case the real part here cannot produce."""
    return ReportingGateway(inner, BankReports(every_card="stolen_card"))


@pytest.fixture
async def stolen_card_harness(
    request: pytest.FixtureRequest,
    temporal_env: WorkflowEnvironment,
    localstripe: LocalStripe,
    database_url: str,
) -> AsyncIterator[BillingHarness]:
    async with recorded_harness(
        request, temporal_env, localstripe, database_url, wrap_gateway=StolenCardGateway
    ) as h:
        yield h
