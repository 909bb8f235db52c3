"""Provider calls run on the payments task queue, whose workers cap their rate (Stripe's
live-mode limit is about 100 requests per second); database work stays on the billing queue.
A history's activity task queue is not part of replay's determinism check, so runs recorded
before the payments queue existed (or on another queue name) still replay."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHistory
from temporalio.exceptions import ApplicationError
from temporalio.worker import Replayer

from billing.cli import _payments_worker
from billing.contracts import ActivityName, ChargeInvoiceInput, SyncSubscriptionInput
from billing.invoices import InvoiceStatus
from billing.settings import Settings
from billing.settlement import LedgerActivityName, SettlementActivityName
from billing.subscription import SubscriptionStatus
from billing.testing.cards import SUCCEEDS
from billing.testing.harness import BillingHarness
from billing.testing.localstripe import LocalStripe
from billing.worker import OneSecondWindow, build_dependencies, build_worker
from tests.conftest import recorded_harness
from workflows.subscription import SubscriptionWorkflow


def scheduled_queues(history: WorkflowHistory) -> dict[str, set[str]]:
    queues: dict[str, set[str]] = {}
    for event in history.events:
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            attrs = event.activity_task_scheduled_event_attributes
            queues.setdefault(attrs.activity_type.name, set()).add(attrs.task_queue.name)
    return queues


@pytest.fixture
async def capped_harness(
    request: pytest.FixtureRequest,
    temporal_env: Any,
    localstripe: LocalStripe,
    database_url: str,
) -> Any:
    async with recorded_harness(
        request, temporal_env, localstripe, database_url, charge_rate_per_s=7.5
    ) as h:
        yield h


async def test_charge_and_settle_run_on_the_rate_capped_payments_queue(
    capped_harness: BillingHarness,
) -> None:
    h = capped_harness
    signup = await h.signup("basic-monthly", card=SUCCEEDS)
    await h.wait_for(
        signup.subscription_id, lambda v: v.invoices_issued == 1 and not v.open_invoice
    )
    [invoice] = h.snapshot(signup.subscription_id).invoices
    assert invoice.status == InvoiceStatus.PAID

    [run] = await h.run_histories(signup.subscription_id)
    # The charge (which also settles) is the one ordinary activity of a paid period, on the
    # payments queue; the database steps are local activities of the billing worker.
    assert scheduled_queues(run) == {ActivityName.CHARGE_INVOICE: {h.payments_task_queue}}
    # The configured cap reaches the payments worker: Temporal gets half of it, because its
    # token bucket may add a full second's burst to the rate.
    assert h._payments_worker is not None
    config = h._payments_worker.config()
    assert config["task_queue"] == h.payments_task_queue
    assert config["max_task_queue_activities_per_second"] == 7.5 / 2

    # Replay: as recorded, and with every activity moved to another queue (the task queue is
    # not compared on replay, so histories from before the payments queue replay too).
    replayer = Replayer(workflows=[SubscriptionWorkflow])
    result = await replayer.replay_workflow(run, raise_on_replay_failure=False)
    assert result.replay_failure is None
    moved = json.loads(run.to_json())
    scheduled = [
        e["activityTaskScheduledEventAttributes"]
        for e in moved["events"]
        if "activityTaskScheduledEventAttributes" in e
    ]
    assert len(scheduled) >= 1
    for attrs in scheduled:
        attrs["taskQueue"]["name"] = "some-other-queue"
    result = await replayer.replay_workflow(
        WorkflowHistory.from_json(run.workflow_id, moved), raise_on_replay_failure=False
    )
    assert result.replay_failure is None


async def test_the_worker_command_caps_the_payments_queue_from_settings(
    harness: BillingHarness,
) -> None:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        task_queue="bench-billing",
        charge_rate_per_s=12.5,
    )
    assert settings.payments_queue() == "bench-billing-payments"
    worker = _payments_worker(settings, harness.client, harness.deps)
    config = worker.config()
    assert config["task_queue"] == "bench-billing-payments"
    assert config["max_task_queue_activities_per_second"] == 12.5 / 2
    names = {getattr(a, "__temporal_activity_definition").name for a in config["activities"]}
    assert names == {
        ActivityName.CHARGE_INVOICE,
        ActivityName.SETTLE_INVOICE,
        ActivityName.ATTACH_PAYMENT_METHOD,
        ActivityName.CONFIRM_AUTHENTICATED_PAYMENT,
        ActivityName.CANCEL_INVOICE_PAYMENT,
        ActivityName.RECORD_INVOICE_PAYMENT,
        # Settlement (issue 13): refunds and the ledger's reads of Stripe.
        SettlementActivityName.EXECUTE_REFUND,
        LedgerActivityName.IMPORT_PAYOUT,
        LedgerActivityName.SYNC_LEDGER,
        LedgerActivityName.RECONCILE_CHARGES,
    }


def test_payments_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BILLING_PAYMENTS_TASK_QUEUE", "stripe-calls")
    monkeypatch.setenv("BILLING_CHARGE_RATE_PER_S", "40")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.payments_queue() == "stripe-calls"
    assert settings.charge_rate_per_s == 40


def test_the_default_charge_rate_keeps_three_requests_each_under_stripes_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("BILLING_CHARGE_RATE_PER_S", raising=False)
    monkeypatch.delenv("BILLING_PAYMENTS_TASK_QUEUE", raising=False)
    settings = Settings(_env_file=None, task_queue="q")  # type: ignore[call-arg]
    assert settings.payments_queue() == "q-payments"
    # At most 3 Stripe requests per provider activity; Stripe's live limit is ~100/s.
    assert settings.charge_rate_per_s * 3 < 100


def test_the_window_lets_no_more_than_the_cap_start_in_any_window() -> None:
    window = OneSecondWindow(5, window_s=0.2)
    starts: list[float] = []
    lock = threading.Lock()

    def start_three() -> None:
        for _ in range(3):
            window.acquire()
            with lock:
                starts.append(time.monotonic())

    threads = [threading.Thread(target=start_three) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    starts.sort()
    assert len(starts) == 12
    # Any 6 consecutive starts span at least one window: never 6 inside one.
    assert all(later - earlier >= 0.2 for earlier, later in zip(starts, starts[5:], strict=False))


class CountingWindow(OneSecondWindow):
    def __init__(self) -> None:
        super().__init__(1000)
        self.acquired = 0

    def acquire(self) -> None:
        self.acquired += 1
        super().acquire()


async def test_both_workers_of_a_process_pace_provider_calls_with_one_window(
    temporal_env: Any, database_url: str
) -> None:
    # Runs from before the payments queue schedule their charges on the billing queue, out of
    # reach of the payments queue's Temporal rate: the process's one window paces both.
    settings = Settings(_env_file=None, database_url=database_url)  # type: ignore[call-arg]
    deps = build_dependencies(settings)
    assert isinstance(deps.provider_window, OneSecondWindow)
    assert deps.provider_window.limit == 20  # the default cap
    window = deps.provider_window = CountingWindow()
    billing = build_worker(temporal_env.client, deps, task_queue="q")
    payments = _payments_worker(settings, temporal_env.client, deps)

    def activity(worker: Any, name: str) -> Any:
        [fn] = [
            f
            for f in worker.config()["activities"]
            if getattr(f, "__temporal_activity_definition").name == name
        ]
        return fn

    missing = ChargeInvoiceInput(invoice_id="inv_missing", attempt_number=1, reason="scheduled")
    for worker in (billing, payments):
        with pytest.raises(ApplicationError, match="inv_missing"):
            activity(worker, ActivityName.CHARGE_INVOICE)(missing)
    assert window.acquired == 2
    # Database-only steps are not paced.
    with pytest.raises(ApplicationError):
        activity(billing, ActivityName.SYNC_SUBSCRIPTION)(
            SyncSubscriptionInput(subscription_id="sub_missing", status=SubscriptionStatus.ACTIVE)
        )
    assert window.acquired == 2
