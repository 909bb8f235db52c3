"""Builds the Temporal workers, with dependencies (database, payment gateway, clock)
constructed from Settings:

- the billing worker: the subscription workflow plus every billing activity;
- the payments worker: the activities that call the payment provider, on their own task queue
  with a rate cap (``Settings.charge_rate_per_s``), so a billing-day burst never exceeds the
  provider's request limit. Run both in every worker process."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import math
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker
from temporalio import activity
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleCalendarSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleRange,
    ScheduleSpec,
)
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.service import TLSConfig
from temporalio.worker import Worker, WorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from activities.billing import AfterChargeHook, BillingActivities
from activities.ledger import LedgerActivities
from activities.settlement import AfterRefundHook, RefundSweepActivities, SettlementActivities
from activities.signup_sweep import SignupSweepActivities
from activities.stripe_gateway import StripeGateway, make_stripe_client
from billing.clock import Clock, SystemClock
from billing.ledger import LedgerGateway
from billing.payments import PaymentGateway
from billing.refunds import RefundGateway
from billing.settings import Settings
from billing.settlement import (
    RefundSweepInput,
    SettlementSyncInput,
    refund_sweeper_workflow_id,
    settlement_schedule_id,
)
from billing.signup_sweep import PendingSignupSweepInput, sweeper_workflow_id
from billing.subscription import SubscriptionStatus
from db.engine import make_engine, make_session_factory, unit_of_work
from db.repositories import ledger as ledger_repo
from db.repositories import subscriptions as subscriptions_repo
from workflows.invoice_payment import InvoicePaymentWorkflow
from workflows.ledger import PayoutImportWorkflow, SettlementSyncWorkflow
from workflows.refund import RefundSweepWorkflow, RefundWorkflow
from workflows.signup_sweep import PendingSignupSweepWorkflow
from workflows.subscription import SubscriptionWorkflow

log = logging.getLogger("billing.worker")


@dataclass
class Dependencies:
    session_factory: sessionmaker[Session]
    gateway: PaymentGateway
    clock: Clock
    #: TEST ONLY fault injection; None unless BILLING_CHAOS_CRASH_AFTER_CHARGE_PERCENT is set.
    after_charge_hook: AfterChargeHook | None = None
    #: The process's pacing of provider activities (``Settings.charge_rate_per_s``), shared by
    #: both workers; None: no pacing (tests and simulations against localstripe).
    provider_window: OneSecondWindow | None = None
    #: Refunds at the provider (the same StripeGateway); None: refunds are not carried out
    #: by this worker (their activity is not registered).
    refund_gateway: RefundGateway | None = None
    #: TEST ONLY: called after the provider answered a refund, before it is recorded.
    after_refund_hook: AfterRefundHook | None = None
    #: The provider's balance transactions, payouts and charges (the same StripeGateway);
    #: None: the ledger activities are not registered.
    ledger_gateway: LedgerGateway | None = None


def temporal_tls_config(settings: Settings) -> TLSConfig | bool:
    """The ``tls`` argument of ``Client.connect`` for these settings: a ``TLSConfig`` carrying
    the client certificate, key and CA read from their PEM files (mTLS to a self-hosted
    cluster), True for TLS with the system's roots (Temporal Cloud with an API key), or False
    (plain gRPC: the local dev server, a cluster on a private network)."""
    if not settings.temporal_uses_tls():
        return False
    custom = (
        settings.temporal_tls_cert,
        settings.temporal_tls_ca,
        settings.temporal_tls_server_name,
    )
    if all(value is None for value in custom):
        return True  # an API key alone: TLS with the system's roots
    return TLSConfig(
        server_root_ca_cert=_read_pem(settings.temporal_tls_ca),
        client_cert=_read_pem(settings.temporal_tls_cert),
        client_private_key=_read_pem(settings.temporal_tls_key),
        domain=settings.temporal_tls_server_name,
    )


def _read_pem(path: Path | None) -> bytes | None:
    return None if path is None else path.read_bytes()


async def connect_temporal(settings: Settings, *, runtime: Runtime | None = None) -> Client:
    """A client of the configured Temporal server: address, namespace, TLS and API key.
    ``runtime``: the worker's (``metrics_runtime``), so its workers' metrics reach its
    Prometheus endpoint; None: the SDK's default runtime (no metrics served)."""
    api_key = settings.temporal_api_key
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        tls=temporal_tls_config(settings),
        api_key=api_key.get_secret_value() if api_key is not None else None,
        runtime=runtime,
    )


#: Counted by the subscription workflow each time it parks a subscription (a Temporal workflow
#: metric, so it is served by the worker that ran the workflow task; it restarts from 0 with
#: the process, like every counter).
PARKED_COUNTER = "billing_subscriptions_parked"
#: How many subscriptions are parked in needs_attention now, from the database: what an alert
#: wants (``billing_subscriptions_needs_attention > 0``), whichever worker parked them and
#: however long ago.
NEEDS_ATTENTION_GAUGE = "billing_subscriptions_needs_attention"
#: Findings of the daily charge reconciliation, by severity (from the database).
RECONCILIATION_FINDINGS_GAUGE = "billing_reconciliation_findings"


class MetricsAddressInUse(Exception):
    """The Prometheus endpoint could not be bound."""


def metrics_runtime(settings: Settings) -> Runtime | None:
    """A Temporal runtime serving Prometheus metrics on ``worker_metrics_address`` (None when
    it is unset). A Client connected with it gives its workers' metrics, including the
    workflow's own counters, to that endpoint."""
    address = settings.worker_metrics_address
    if address is None:
        return None
    try:
        return Runtime(
            telemetry=TelemetryConfig(
                # Counters end in _total, as Prometheus names them.
                metrics=PrometheusConfig(bind_address=address, counters_total_suffix=True)
            )
        )
    except Exception as error:  # the SDK core reports a bind failure as a plain exception
        raise MetricsAddressInUse(
            f"cannot serve metrics on {address} (BILLING_WORKER_METRICS_ADDRESS): {error}; "
            "pick a free port or unset it"
        ) from error


async def report_needs_attention(
    runtime: Runtime,
    session_factory: sessionmaker[Session],
    *,
    every_s: float,
    stop: asyncio.Event,
) -> None:
    """Set the needs_attention gauge from the database every ``every_s`` seconds until
    ``stop``. A database that does not answer leaves the last value and is logged: a gauge
    that stops changing is better than a worker that stops."""
    gauge = runtime.metric_meter.create_gauge(
        NEEDS_ATTENTION_GAUGE,
        "subscriptions parked in needs_attention now, waiting for an operator "
        "(billing subscriptions resume-billing ID)",
    )
    findings = runtime.metric_meter.create_gauge(
        RECONCILIATION_FINDINGS_GAUGE,
        "differences the daily charge reconciliation recorded, by severity "
        "(GET /v1/reconciliation/findings)",
    )
    while not stop.is_set():
        try:
            count = await asyncio.to_thread(_count_needs_attention, session_factory)
            by_severity = await asyncio.to_thread(_count_findings, session_factory)
        except Exception:
            log.warning("counting needs_attention subscriptions failed", exc_info=True)
        else:
            gauge.set(count)
            for severity in ("info", "warning", "error"):
                findings.with_additional_attributes({"severity": severity}).set(
                    by_severity.get(severity, 0)
                )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)


def _count_findings(session_factory: sessionmaker[Session]) -> dict[str, int]:
    with unit_of_work(session_factory) as session:
        return ledger_repo.count_findings_by_severity(session)


def _count_needs_attention(session_factory: sessionmaker[Session]) -> int:
    with unit_of_work(session_factory) as session:
        return subscriptions_repo.count_subscriptions_with_status(
            session, SubscriptionStatus.NEEDS_ATTENTION
        )


def crash_selected(idempotency_key: str, percent: int) -> bool:
    """Whether the key falls in the ``percent`` share that the crash hook picks. A hash of the
    key, so the same attempts are picked in every process and run."""
    digest = hashlib.sha256(idempotency_key.encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < percent


def crash_after_charge_hook(percent: int) -> AfterChargeHook | None:
    """TEST ONLY (scripts/chaos.py): a hook that SIGKILLs this process after Stripe answered
    the first send of a picked charge and before the database hears of it. A re-driven
    attempt is never picked, so the retry after the crash goes through."""
    if percent == 0:
        return None

    def crash(idempotency_key: str, redriven: bool) -> None:
        if redriven or not crash_selected(idempotency_key, percent):
            return
        # One line the chaos run counts; stderr is unbuffered enough once flushed.
        print(f"CHAOS crash-after-charge {idempotency_key}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    return crash


def crash_after_refund_hook(percent: int) -> AfterRefundHook | None:
    """TEST ONLY (scripts/chaos.py): SIGKILL this process after Stripe made a picked refund and
    before our database hears of it (a refund's create is only ever sent once: a re-drive
    finds it by its key first, so the retry after the crash goes through)."""
    if percent == 0:
        return None

    def crash(idempotency_key: str) -> None:
        if not crash_selected(idempotency_key, percent):
            return
        print(f"CHAOS crash-after-refund {idempotency_key}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    return crash


def build_dependencies(settings: Settings, *, clock: Clock | None = None) -> Dependencies:
    engine = make_engine(settings.database_url)
    client = make_stripe_client(
        api_key=settings.stripe_secret(),
        api_base=settings.stripe_api_base,
        max_network_retries=settings.stripe_max_network_retries,
        connect_timeout_s=settings.stripe_connect_timeout_s,
        read_timeout_s=settings.stripe_read_timeout_s,
    )
    # localstripe rejects `description` on PaymentIntents; real Stripe gets it.
    gateway = StripeGateway(client, send_description=settings.stripe_api_key is not None)
    return Dependencies(
        session_factory=make_session_factory(engine),
        gateway=gateway,
        refund_gateway=gateway,
        ledger_gateway=gateway,
        clock=clock or SystemClock(),
        # Settings refuse a non-zero percentage in production.
        after_charge_hook=crash_after_charge_hook(settings.chaos_crash_after_charge_percent),
        after_refund_hook=crash_after_refund_hook(settings.chaos_crash_after_charge_percent),
        provider_window=OneSecondWindow(settings.charge_rate_per_s, window_s=1 + PACING_GUARD_S),
    )


def build_worker(
    client: Client,
    deps: Dependencies,
    *,
    task_queue: str,
    activity_threads: int = 16,
    workflow_runner: WorkflowRunner | None = None,
    max_cached_workflows: int = 1000,
    graceful_shutdown_s: float = 0.0,
    payments_task_queue: str | None = None,
) -> Worker:
    """``workflow_runner``: the sandbox by default; simulations pass
    ``UnsandboxedWorkflowRunner()`` to skip re-creating the sandbox for every run (the
    sandboxed test suite and the replay test keep guarding determinism).

    It also runs the pending-signup sweeper (``ensure_signup_sweeper`` starts it), which
    starts subscription workflows on ``task_queue`` with provider calls on
    ``payments_task_queue`` (default ``{task_queue}-payments``, as ``Settings``)."""
    activities = BillingActivities(
        deps.session_factory, deps.gateway, deps.clock, after_charge_hook=deps.after_charge_hook
    )
    registered = activities.all()
    if deps.provider_window is not None:
        # Runs started before the payments queue existed schedule their provider calls here,
        # out of reach of that queue's Temporal rate: they take the same per-process pacing.
        provider = {_activity_name(fn) for fn in provider_activities(activities)}
        registered = [
            paced(fn, deps.provider_window) if _activity_name(fn) in provider else fn
            for fn in registered
        ]
    sweep = SignupSweepActivities(
        deps.session_factory,
        deps.gateway,
        deps.clock,
        task_queue=task_queue,
        payments_task_queue=payments_task_queue or f"{task_queue}-payments",
    )
    settlement = _settlement_activities(
        deps, task_queue=task_queue, payments_task_queue=payments_task_queue
    )
    return Worker(
        client,
        task_queue=task_queue,
        workflows=[
            SubscriptionWorkflow,
            InvoicePaymentWorkflow,
            PendingSignupSweepWorkflow,
            RefundWorkflow,
            RefundSweepWorkflow,
            PayoutImportWorkflow,
            SettlementSyncWorkflow,
        ],
        activities=[*registered, sweep.sweep_pending_signups, *settlement],
        activity_executor=ThreadPoolExecutor(max_workers=activity_threads),
        max_concurrent_activities=activity_threads,
        workflow_runner=workflow_runner or SandboxedWorkflowRunner(),
        max_cached_workflows=max_cached_workflows,
        # Running activities get this long to finish after shutdown starts, then are cancelled.
        graceful_shutdown_timeout=timedelta(seconds=graceful_shutdown_s),
    )


def _settlement_activities(
    deps: Dependencies, *, task_queue: str, payments_task_queue: str | None
) -> list[Any]:
    """The refund sweep, and (with a refund gateway) the refund activity: runs started with
    no payments queue schedule it on the workflow's own."""
    found: list[Any] = [
        RefundSweepActivities(
            deps.session_factory,
            deps.clock,
            task_queue=task_queue,
            payments_task_queue=payments_task_queue or f"{task_queue}-payments",
        ).sweep_refunds
    ]
    if deps.refund_gateway is not None:
        found.extend(_refund_activities(deps, deps.refund_gateway))
    if deps.ledger_gateway is not None:
        found.extend(LedgerActivities(deps.session_factory, deps.ledger_gateway, deps.clock).all())
    return found


def _refund_activities(deps: Dependencies, gateway: RefundGateway) -> list[Any]:
    return SettlementActivities(
        deps.session_factory,
        gateway,
        deps.clock,
        after_refund_hook=deps.after_refund_hook,
    ).provider()


async def ensure_refund_sweeper(client: Client, *, task_queue: str) -> str:
    """Make sure the refund sweeper runs on ``task_queue`` (one per queue; a second start
    finds the running one). Returns its id."""
    workflow_id = refund_sweeper_workflow_id(task_queue)
    await client.start_workflow(
        RefundSweepWorkflow.run,
        RefundSweepInput(),
        id=workflow_id,
        task_queue=task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
    )
    return workflow_id


async def ensure_settlement_schedule(
    client: Client, *, task_queue: str, payments_task_queue: str | None, days: int = 3
) -> str:
    """Make sure the daily settlement Schedule exists (a Temporal Schedule, not cron): every
    day at 03:00 UTC it runs ``SettlementSyncWorkflow`` (ledger and payouts of the last
    ``days`` days, then the charge reconciliation); a run still going is not doubled (SKIP).
    Creating it again finds it. Returns its id."""
    schedule_id = settlement_schedule_id(task_queue)
    with contextlib.suppress(ScheduleAlreadyRunningError):
        await client.create_schedule(
            schedule_id,
            Schedule(
                action=ScheduleActionStartWorkflow(
                    SettlementSyncWorkflow.run,
                    SettlementSyncInput(days=days, payments_task_queue=payments_task_queue),
                    id=f"settlement-sync-{task_queue}",
                    task_queue=task_queue,
                ),
                spec=ScheduleSpec(
                    calendars=[ScheduleCalendarSpec(hour=[ScheduleRange(3)])], time_zone_name="UTC"
                ),
                policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
            ),
        )
    return schedule_id


async def ensure_signup_sweeper(
    client: Client, *, task_queue: str, sweep: PendingSignupSweepInput | None = None
) -> str:
    """Make sure the pending-signup sweeper runs on ``task_queue`` (one per queue: a second
    start finds the running one, so every worker process may call this). Returns its id."""
    workflow_id = sweeper_workflow_id(task_queue)
    await client.start_workflow(
        PendingSignupSweepWorkflow.run,
        sweep or PendingSignupSweepInput(),
        id=workflow_id,
        task_queue=task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
    )
    return workflow_id


def provider_activities(activities: BillingActivities) -> list[Any]:
    """The activities that call the payment provider: they run on the payments task queue."""
    return [
        activities.charge_invoice,
        activities.settle_invoice,
        activities.attach_payment_method,
        activities.confirm_authenticated_payment,
        activities.cancel_invoice_payment,
        activities.record_invoice_payment,
    ]


#: The pacing window is this much longer than a second: a provider call that starts up to this
#: long after its activity was let through still keeps every one-second window under the cap.
#: (Temporal's queue-wide rate, at half the cap, binds first, so throughput is unchanged.)
PACING_GUARD_S = 0.25


class OneSecondWindow:
    """At most ``limit`` starts in any sliding window of ``window_s`` seconds in this process:
    ``acquire`` blocks (the calling activity thread) until a start keeps the window under the
    limit."""

    def __init__(self, limit: float, *, window_s: float = 1.0) -> None:
        self.limit = max(1, math.floor(limit))
        self.window_s = window_s
        self._starts: deque[float] = deque()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                while self._starts and now - self._starts[0] >= self.window_s:
                    self._starts.popleft()
                if len(self._starts) < self.limit:
                    self._starts.append(now)
                    return
                wait = self.window_s - (now - self._starts[0])
            time.sleep(wait)


def _activity_name(fn: Callable[..., Any]) -> str:
    return str(getattr(fn, "__temporal_activity_definition").name)


def paced(fn: Callable[[Any], Any], window: OneSecondWindow) -> Callable[[Any], Any]:
    """The activity ``fn`` (one argument), under the same name, waiting for ``window`` before it
    runs."""
    name = _activity_name(fn)

    # Not its __dict__: that holds fn's own activity definition.
    @functools.wraps(fn, updated=())
    def run(input: Any) -> Any:
        window.acquire()
        return fn(input)

    return activity.defn(name=name)(run)


def queue_rate_for(charge_rate_per_s: float | None) -> float | None:
    """The rate to give Temporal for a cap of ``charge_rate_per_s`` in any one-second window:
    half, because its token bucket can add a full second's burst to the rate."""
    return None if charge_rate_per_s is None else charge_rate_per_s / 2


def build_payments_worker(
    client: Client,
    deps: Dependencies,
    *,
    task_queue: str,
    charge_rate_per_s: float | None,
    activity_threads: int = 16,
    graceful_shutdown_s: float = 0.0,
) -> Worker:
    """The payments worker: provider activities only, at most ``charge_rate_per_s`` started in
    any one-second window on ``task_queue`` by all its workers together. ``None``: no cap
    (tests and simulations, which talk to localstripe).

    Temporal's matching service enforces ``max_task_queue_activities_per_second`` for the whole
    queue as a token bucket that starts full: after a quiet spell it releases a whole second's
    worth at once on top of its rate, so a window can see twice the rate (measured by
    ``scripts/bench.py``: 23 charges in one second under a cap of 20). The queue therefore gets
    half the cap. Tasks the server spaced out can still start together in the worker (threads
    busy, a CPU-starved process: 22 in one second was measured with the half rate alone), so
    each payments worker also paces its own starts to the cap in any window of 1.25 seconds.

    The billing worker registers these activities too: runs started before the payments queue
    existed schedule them on their own queue. With ``deps.provider_window`` both workers pace
    with that one window, so the process stays under the cap across both queues."""
    activities = BillingActivities(
        deps.session_factory, deps.gateway, deps.clock, after_charge_hook=deps.after_charge_hook
    )
    provider = provider_activities(activities)
    if deps.refund_gateway is not None:
        provider.extend(_refund_activities(deps, deps.refund_gateway))
    if deps.ledger_gateway is not None:
        provider.extend(
            LedgerActivities(deps.session_factory, deps.ledger_gateway, deps.clock).all()
        )
    if charge_rate_per_s is not None:
        # The process's window when it has one: the billing worker paces with it too.
        window = deps.provider_window or OneSecondWindow(
            charge_rate_per_s, window_s=1 + PACING_GUARD_S
        )
        provider = [paced(fn, window) for fn in provider]
    return Worker(
        client,
        task_queue=task_queue,
        activities=provider,
        activity_executor=ThreadPoolExecutor(max_workers=activity_threads),
        max_concurrent_activities=activity_threads,
        max_task_queue_activities_per_second=queue_rate_for(charge_rate_per_s),
        graceful_shutdown_timeout=timedelta(seconds=graceful_shutdown_s),
    )


#: After the graceful period, how long cancelled activities get to report back before the
#: process stops waiting for them, seconds.
SHUTDOWN_MARGIN_S = 3.0


async def run_workers_until(
    stop: asyncio.Event, workers: list[Worker], *, graceful_shutdown_s: float
) -> bool:
    """Run ``workers`` until ``stop`` is set (or one fails), then shut them down within
    ``graceful_shutdown_s`` + SHUTDOWN_MARGIN_S seconds. True: every activity finished or
    reported its cancellation. False: some did not and were abandoned; their threads may still
    be running, so the caller must end the process with ``os._exit`` (a normal exit joins every
    activity thread, and a thread blocked in a database or provider call cannot be interrupted:
    that is how a worker used to ignore SIGTERM for minutes). Temporal runs an abandoned
    activity again after its timeout; every activity is idempotent.

    A worker's own fatal error is raised after its siblings are shut down."""
    runs = [asyncio.create_task(w.run()) for w in workers]
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait([stopped, *runs], return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    bound = graceful_shutdown_s + SHUTDOWN_MARGIN_S
    # Worker.shutdown waits for every activity with no bound; wait_for adds it.
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(w.shutdown() for w in workers), *runs, return_exceptions=True),
            timeout=bound,
        )
    except TimeoutError:
        return False
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return True
