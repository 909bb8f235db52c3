"""The worker's sticky cache is a bound on its memory, not on the book: subscriptions that do
not fit are evicted and replayed from their history when they wake, and are billed exactly as
cached ones are: every period once, one PaymentIntent per invoice. The default is the one
measured in docs/benchmarks.md ("Issue 16, session 8")."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from dateutil.relativedelta import relativedelta
from temporalio.testing import WorkflowEnvironment

from billing.invoices import InvoiceStatus
from billing.settings import DEFAULT_WORKER_MAX_CACHED_WORKFLOWS, Settings
from billing.testing.cards import SUCCEEDS
from billing.testing.harness import BillingHarness
from billing.testing.localstripe import LocalStripe
from billing.worker import build_worker
from tests.conftest import BOTH_BACKENDS, recorded_harness

#: Subscriptions due at once, and the cache they do not fit in.
SUBSCRIPTIONS = 5
CACHE = 2


@pytest.fixture
async def small_cache_harness(
    request: pytest.FixtureRequest,
    temporal_env: WorkflowEnvironment,
    localstripe: LocalStripe,
    database_url: str,
) -> AsyncIterator[BillingHarness]:
    async with recorded_harness(
        request, temporal_env, localstripe, database_url, max_cached_workflows=CACHE
    ) as h:
        yield h


@BOTH_BACKENDS
async def test_subscriptions_beyond_the_sticky_cache_are_billed_once_each(
    small_cache_harness: BillingHarness,
) -> None:
    h = small_cache_harness
    now = await h.now()
    anchor = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    subs = [
        await h.signup("basic-monthly", card=SUCCEEDS, billing_anchor_at=anchor)
        for _ in range(SUBSCRIPTIONS)
    ]
    # Three periods, each due for all five at one instant: every wake-up of all but two is a
    # replay of the history so far.
    await h.advance_to(anchor + relativedelta(months=2) + timedelta(hours=1))
    for sub in subs:
        await h.wait_for(sub.subscription_id, lambda v: v.invoices_issued == 3)
        snap = h.snapshot(sub.subscription_id)
        assert [i.period_start for i in snap.invoices] == [
            anchor + relativedelta(months=k) for k in range(3)
        ]
        assert [i.status for i in snap.invoices] == [InvoiceStatus.PAID] * 3
        assert sum(len(p) for p in snap.payments.values()) == 3
        # One charge at the provider per invoice: a replay never charges again.
        assert len(h.provider_charges(sub.subscription_id)) == 3


def test_the_worker_cache_default_is_the_measured_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The setting's default is the measured 500 (RSS with 10,000 idle subscriptions within
    50 MiB of 1,000's), the worker builder and the test harness use the same, and the
    environment still overrides it."""
    monkeypatch.delenv("BILLING_WORKER_MAX_CACHED_WORKFLOWS", raising=False)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.worker_max_cached_workflows == DEFAULT_WORKER_MAX_CACHED_WORKFLOWS == 500
    for built in (build_worker, BillingHarness.__init__):
        default = built.__kwdefaults__["max_cached_workflows"]  # type: ignore[index]
        assert default == DEFAULT_WORKER_MAX_CACHED_WORKFLOWS, built
    monkeypatch.setenv("BILLING_WORKER_MAX_CACHED_WORKFLOWS", "2000")
    assert Settings(_env_file=None).worker_max_cached_workflows == 2000  # type: ignore[call-arg]


async def test_the_worker_runs_with_the_cache_setting(harness: BillingHarness) -> None:
    """What the worker command builds from the settings reaches Temporal's worker."""
    settings = Settings(_env_file=None, worker_max_cached_workflows=321)  # type: ignore[call-arg]
    worker = build_worker(
        harness.client,
        harness.deps,
        task_queue=f"{harness.task_queue}-cache",
        max_cached_workflows=settings.worker_max_cached_workflows,
    )
    assert worker.config()["max_cached_workflows"] == 321
    assert harness._worker is not None
    assert harness._worker.config()["max_cached_workflows"] == DEFAULT_WORKER_MAX_CACHED_WORKFLOWS
