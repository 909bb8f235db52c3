"""Builds the Temporal workers, with dependencies (database, payment gateway, clock)
constructed from Settings:

- the billing worker: the subscription workflow plus every billing activity;
- the payments worker: the activities that call the payment provider, on their own task queue
  with a rate cap (``Settings.charge_rate_per_s``), so a billing-day burst never exceeds the
  provider's request limit. Run both in every worker process."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker
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
from temporalio.worker import UnsandboxedWorkflowRunner, Worker, WorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from activities.billing import AfterChargeHook, BillingActivities
from activities.delivery import DeliveryActivities, MailSettings
from activities.keepalive import KeepAlive
from activities.ledger import LedgerActivities
from activities.provider_pacing import DatabasePacer
from activities.settlement import AfterRefundHook, RefundSweepActivities, SettlementActivities
from activities.signup_sweep import SignupSweepActivities
from activities.smtp_mailer import SmtpConfig, SmtpMailer
from activities.stripe_gateway import StripeGateway, make_stripe_client
from billing.clock import Clock, SystemClock
from billing.delivery import DispatcherInput, dispatcher_workflow_id
from billing.ledger import LedgerGateway
from billing.payments import PaymentGateway
from billing.refunds import RefundGateway
from billing.settings import (
    DEFAULT_DELIVERY_WAKE_MIN_INTERVAL_S,
    DEFAULT_WORKER_MAX_CACHED_WORKFLOWS,
    Settings,
)
from billing.settlement import (
    RefundSweepInput,
    SettlementSyncInput,
    refund_sweeper_workflow_id,
    settlement_schedule_id,
)
from billing.signup_sweep import PendingSignupSweepInput, sweeper_workflow_id
from billing.subscription import SubscriptionStatus
from billing.temporal_payloads import DATA_CONVERTER
from db.engine import make_engine, make_session_factory, on_delivery_commit, unit_of_work
from db.repositories import ledger as ledger_repo
from db.repositories import subscriptions as subscriptions_repo
from workflows.delivery import (
    DeliveryDispatcherWorkflow,
    EventStreamWorkflow,
    NotificationDeliveryWorkflow,
)
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
    #: The schedule every Stripe request of this process takes its turn from, shared with
    #: every other worker on the database (``Settings.charge_rate_per_s``); None: no pacing
    #: (the API, tests and simulations against localstripe).
    pacer: DatabasePacer | None = None
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
        # The SDK's payloads byte for byte, decoded and encoded with less CPU.
        data_converter=DATA_CONVERTER,
    )


#: Counted by the subscription workflow each time it parks a subscription (a Temporal workflow
#: metric, so it is served by the worker that ran the workflow task; it restarts from 0 with
#: the process, like every counter).
PARKED_COUNTER = "billing_subscriptions_parked"
#: How many subscriptions are parked in needs_attention now, from the database: what an alert
#: wants (``billing_subscriptions_needs_attention > 0``), whichever worker parked them and
#: however long ago.
NEEDS_ATTENTION_GAUGE = "billing_subscriptions_needs_attention"
#: Open findings of the daily charge reconciliation, by severity (from the database); a
#: finding finance resolved no longer counts.
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
        "open (unresolved) differences the daily charge reconciliation recorded, by "
        "severity (GET /v1/reconciliation/findings?status=open)",
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


def build_dependencies(
    settings: Settings, *, clock: Clock | None = None, pace_provider: bool = False
) -> Dependencies:
    """``pace_provider``: a worker's dependencies, whose Stripe requests keep to
    ``Settings.charge_rate_per_s`` in any one-second window together with every other worker
    on the database (``billing.pacing``). The API's are not paced: a signup must not wait
    behind a billing-day burst (the cap leaves Stripe's limit room for it)."""
    engine = make_engine(settings.database_url, pool=settings.database_pool())
    session_factory = make_session_factory(engine)
    pacer = (
        DatabasePacer(
            session_factory, name=settings.payments_queue(), cap_per_s=settings.charge_rate_per_s
        )
        if pace_provider
        else None
    )
    client = make_stripe_client(
        api_key=settings.stripe_secret(),
        api_base=settings.stripe_api_base,
        max_network_retries=settings.stripe_max_network_retries,
        connect_timeout_s=settings.stripe_connect_timeout_s,
        read_timeout_s=settings.stripe_read_timeout_s,
        pacer=pacer,
    )
    # localstripe rejects `description` on PaymentIntents; real Stripe gets it.
    send_description = settings.stripe_send_description
    if send_description is None:
        send_description = settings.stripe_api_key is not None
    gateway = StripeGateway(
        client, send_description=send_description, return_url=settings.stripe_return_url
    )
    return Dependencies(
        session_factory=session_factory,
        gateway=gateway,
        clock=clock or SystemClock(),
        # Settings refuse a non-zero percentage in production.
        after_charge_hook=crash_after_charge_hook(settings.chaos_crash_after_charge_percent),
        pacer=pacer,
        refund_gateway=gateway,
        ledger_gateway=gateway,
        after_refund_hook=crash_after_refund_hook(settings.chaos_crash_after_charge_percent),
    )


def workflow_runner_for(settings: Settings) -> WorkflowRunner:
    """The workflow runner ``Settings.worker_workflow_sandbox`` asks for: Temporal's sandbox
    (the default) or none. ``billing worker`` and ``billing dev`` both build theirs here."""
    if settings.worker_workflow_sandbox:
        return SandboxedWorkflowRunner()
    return UnsandboxedWorkflowRunner()


def build_worker(
    client: Client,
    deps: Dependencies,
    *,
    task_queue: str,
    activity_threads: int = 16,
    workflow_runner: WorkflowRunner | None = None,
    max_cached_workflows: int = DEFAULT_WORKER_MAX_CACHED_WORKFLOWS,
    graceful_shutdown_s: float = 0.0,
    payments_task_queue: str | None = None,
    max_concurrent_workflow_tasks: int | None = None,
    build_id: str | None = None,
) -> Worker:
    """``workflow_runner``: the sandbox by default; simulations pass
    ``UnsandboxedWorkflowRunner()`` to skip re-creating the sandbox for every run (the
    sandboxed test suite and the replay test keep guarding determinism).

    ``build_id``: the worker's build id; None: the SDK's default, a hash of the bytecode of
    every loaded module, which costs a few tenths of a second of CPU the first time in a
    process (the test harness, started once per simulation, names its own).

    It also runs the pending-signup sweeper (``ensure_signup_sweeper`` starts it), which
    starts subscription workflows on ``task_queue`` with provider calls on
    ``payments_task_queue`` (default ``{task_queue}-payments``, as ``Settings``)."""
    activities = BillingActivities(
        deps.session_factory, deps.gateway, deps.clock, after_charge_hook=deps.after_charge_hook
    )
    # Runs started before the payments queue existed schedule their provider calls here, out
    # of reach of that queue's Temporal rate: the gateway's shared pacer still holds them to
    # the cap (it paces every Stripe request the process sends).
    registered = activities.all()
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
        max_concurrent_workflow_tasks=max_concurrent_workflow_tasks,
        # Running activities get this long to finish after shutdown starts, then are cancelled.
        graceful_shutdown_timeout=timedelta(seconds=graceful_shutdown_s),
        interceptors=[KeepAlive()],
        build_id=build_id,
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


#: Temporal's rate for the payments queue, as a multiple of the cap. Above the pacer's own
#: rate (``billing.pacing.sustained_per_s``, 0.95 of the cap), so the shared pacer, never
#: Temporal, sets the pace: a few due charges always wait for a slot, and no slot stands
#: idle. Temporal's limit is not exact enough to be the one that binds: it is split evenly
#: between the queue's partitions (four by default), each a token bucket of its own, so a
#: partition that runs dry leaves its share unused, and a dispatch late by some milliseconds
#: is lost to the pacer. At the pacer's rate the two in series used 0.63-0.88 of a cap of 20
#: (docs/benchmarks.md, "Issue 16, session 8"). What waits beyond the pacer's rate waits in
#: the worker's activity slots (at most ``activity_threads`` per worker, each for its slot, a
#: second or so at 16 and a cap of 20); the rest stays queued in Temporal.
PAYMENTS_QUEUE_RATE_OVER_CAP = 2.0


def queue_rate_for(charge_rate_per_s: float | None) -> float | None:
    """The rate Temporal's matching service gives the payments queue: a multiple of the cap
    (``PAYMENTS_QUEUE_RATE_OVER_CAP``), so Temporal keeps the backlog and the shared pacer
    (``billing.pacing``), which spaces every request globally, is the only limit that binds.
    The cap in every one-second window is the pacer's: Temporal's token bucket may release a
    burst on top of its rate, and the pacer spaces it out."""
    return None if charge_rate_per_s is None else charge_rate_per_s * PAYMENTS_QUEUE_RATE_OVER_CAP


def build_payments_worker(
    client: Client,
    deps: Dependencies,
    *,
    task_queue: str,
    charge_rate_per_s: float | None,
    activity_threads: int = 16,
    graceful_shutdown_s: float = 0.0,
    build_id: str | None = None,
) -> Worker:
    """The payments worker: provider activities only, on ``task_queue``, at ``charge_rate_per_s``
    in total for all its workers. ``None``: no cap (tests and simulations on localstripe).
    ``build_id``: as ``build_worker``'s.

    Two layers, both global. Every Stripe request takes its turn from one schedule in the
    database (``deps.pacer``, ``billing.pacing``), a ring of ``cap`` slots each used again a
    second and a margin after its last request left, so no one-second window sees more than
    the cap, across every worker process: that is the limit.
    Temporal's matching service releases the queue's tasks at ``queue_rate_for`` (twice the
    cap, the queue's rate whatever the number of workers), so most of a burst's backlog waits
    in Temporal, not in worker threads, while the pacer always has a request waiting for its
    next turn. Its token bucket starts full, and its rate is split between partitions: neither
    matters, the pacer spaces whatever it releases. At the pacer's own rate the two layers in
    series lost up to a third of the cap (``PAYMENTS_QUEUE_RATE_OVER_CAP``)."""
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
    return Worker(
        client,
        task_queue=task_queue,
        activities=provider,
        activity_executor=ThreadPoolExecutor(max_workers=activity_threads),
        max_concurrent_activities=activity_threads,
        max_task_queue_activities_per_second=queue_rate_for(charge_rate_per_s),
        graceful_shutdown_timeout=timedelta(seconds=graceful_shutdown_s),
        interceptors=[KeepAlive()],
        build_id=build_id,
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


# ---- deliveries: customer mails and events for the business ---------------------------------


def build_delivery_activities(
    settings: Settings, session_factory: sessionmaker[Session], clock: Clock
) -> DeliveryActivities:
    """The delivery activities for ``settings``: the SMTP server (none when
    ``BILLING_SMTP_HOST`` is unset: notices then wait in the outbox) and the endpoint rules."""
    mailer = None
    if settings.smtp_host:
        mailer = SmtpMailer(
            SmtpConfig(
                host=settings.smtp_host,
                port=settings.smtp_port,
                tls=settings.smtp_tls,
                user=settings.smtp_user,
                password=settings.smtp_password,
                timeout_s=settings.smtp_timeout_s,
            )
        )
    return DeliveryActivities(
        session_factory,
        clock,
        mailer=mailer,
        mail=MailSettings(
            from_address=settings.mail_from,
            card_update_url=settings.mail_card_update_url,
            authentication_url=settings.mail_authentication_url,
            business_contact=settings.events_contact_email,
        ),
        post_timeout_s=settings.event_delivery_timeout_s,
        allow_insecure_endpoints=settings.endpoints_allow_insecure(),
    )


def build_delivery_worker(
    client: Client,
    activities: DeliveryActivities,
    *,
    task_queue: str,
    activity_threads: int = 16,
    graceful_shutdown_s: float = 0.0,
    workflow_runner: WorkflowRunner | None = None,
) -> Worker:
    """The delivery worker: the dispatcher and the mail and event delivery workflows with
    their activities, on their own task queue, so a slow mail server or endpoint never takes
    the billing activities' threads."""
    return Worker(
        client,
        task_queue=task_queue,
        workflows=[DeliveryDispatcherWorkflow, NotificationDeliveryWorkflow, EventStreamWorkflow],
        activities=activities.all(),
        activity_executor=ThreadPoolExecutor(max_workers=activity_threads),
        max_concurrent_activities=activity_threads,
        workflow_runner=workflow_runner or SandboxedWorkflowRunner(),
        graceful_shutdown_timeout=timedelta(seconds=graceful_shutdown_s),
        interceptors=[KeepAlive()],
    )


async def ensure_delivery_dispatcher(
    client: Client, *, task_queue: str, dispatcher: DispatcherInput | None = None
) -> str:
    """Make sure the delivery dispatcher runs on ``task_queue`` (one per queue; every worker
    process may call this). Returns its id."""
    workflow_id = dispatcher_workflow_id(task_queue)
    await client.start_workflow(
        DeliveryDispatcherWorkflow.run,
        dispatcher or DispatcherInput(task_queue=task_queue),
        id=workflow_id,
        task_queue=task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
    )
    return workflow_id


class DispatcherWaker:
    """Wakes the delivery dispatcher right after a commit wrote a notice or an event
    delivery, so it is sent within a moment instead of at the next poll (the poll stays as
    the safety net: a lost wake-up only costs up to one interval).

    Called from any thread (the committing activity's or request's); the signal is sent from
    ``loop`` as a signal-with-start (a dispatcher that is not running is started, one that
    is gets ``wake``). Wake-ups coalesce and are spaced: a call after a quiet spell sends at
    once; calls while one is being sent, or within ``min_interval_s`` of the last one sent,
    make one more, sent when that spacing has passed. So a burst of commits (a receipt per
    paid cycle on billing day) costs the dispatcher at most one wake-up per ``min_interval_s``,
    and every call is followed by a wake-up sent after it. Best effort: a failure is logged
    and dropped."""

    def __init__(
        self,
        client: Client,
        *,
        dispatcher: DispatcherInput,
        loop: asyncio.AbstractEventLoop | None = None,
        min_interval_s: float = DEFAULT_DELIVERY_WAKE_MIN_INTERVAL_S,
    ) -> None:
        self._client = client
        self._dispatcher = dispatcher
        self._loop = loop or asyncio.get_running_loop()
        self._min_interval_s = min_interval_s
        self._sending: asyncio.Task[None] | None = None
        self._again = False
        #: When the last wake-up was sent (the loop's clock), None before the first.
        self._last_sent: float | None = None
        #: Wake-ups sent (signals that reached Temporal), for tests and the benchmark.
        self.sent = 0
        #: Stops the wake-ups (set by ``wake_dispatcher_on_commit``).
        self.detach: Callable[[], None] = lambda: None

    def __call__(self) -> None:
        # A closed loop (the process is stopping) drops it.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._request)

    def _request(self) -> None:
        if self._sending is not None and not self._sending.done():
            self._again = True
            return
        self._sending = self._loop.create_task(self._send())

    async def _send(self) -> None:
        while True:
            if self._last_sent is not None:
                wait = self._last_sent + self._min_interval_s - self._loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
            # Calls from here on need a wake-up after this one; earlier ones are covered.
            self._again = False
            try:
                await self._client.start_workflow(
                    DeliveryDispatcherWorkflow.run,
                    self._dispatcher,
                    id=dispatcher_workflow_id(self._dispatcher.task_queue),
                    task_queue=self._dispatcher.task_queue,
                    start_signal="wake",
                )
                self.sent += 1
            except Exception:
                log.warning("could not wake the delivery dispatcher", exc_info=True)
            self._last_sent = self._loop.time()
            if not self._again:
                return


def wake_dispatcher_on_commit(
    session_factory: sessionmaker[Session],
    client: Client,
    *,
    dispatcher: DispatcherInput,
    min_interval_s: float = DEFAULT_DELIVERY_WAKE_MIN_INTERVAL_S,
) -> DispatcherWaker:
    """Wake the delivery dispatcher after every commit through ``session_factory`` that wrote
    a notice or an event delivery, at most once per ``min_interval_s`` (see
    ``DispatcherWaker``). Call from the running event loop."""
    waker = DispatcherWaker(client, dispatcher=dispatcher, min_interval_s=min_interval_s)
    waker.detach = on_delivery_commit(session_factory, waker)
    return waker
