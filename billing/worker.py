"""Builds the Temporal worker: the subscription workflow plus the billing activities, with
dependencies (database, payment gateway, clock) constructed from Settings."""

from __future__ import annotations

import hashlib
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import Client
from temporalio.worker import Worker, WorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from activities.billing import AfterChargeHook, BillingActivities
from activities.stripe_gateway import StripeGateway, make_stripe_client
from billing.clock import Clock, SystemClock
from billing.payments import PaymentGateway
from billing.settings import Settings
from db.engine import make_engine, make_session_factory
from workflows.subscription import SubscriptionWorkflow


@dataclass
class Dependencies:
    session_factory: sessionmaker[Session]
    gateway: PaymentGateway
    clock: Clock
    #: TEST ONLY fault injection; None unless BILLING_CHAOS_CRASH_AFTER_CHARGE_PERCENT is set.
    after_charge_hook: AfterChargeHook | None = None


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


def build_dependencies(settings: Settings, *, clock: Clock | None = None) -> Dependencies:
    engine = make_engine(settings.database_url)
    client = make_stripe_client(
        api_key=settings.stripe_secret(),
        api_base=settings.stripe_api_base,
        max_network_retries=settings.stripe_max_network_retries,
    )
    return Dependencies(
        session_factory=make_session_factory(engine),
        # localstripe rejects `description` on PaymentIntents; real Stripe gets it.
        gateway=StripeGateway(client, send_description=settings.stripe_api_key is not None),
        clock=clock or SystemClock(),
        # Settings refuse a non-zero percentage in production.
        after_charge_hook=crash_after_charge_hook(settings.chaos_crash_after_charge_percent),
    )


def build_worker(
    client: Client,
    deps: Dependencies,
    *,
    task_queue: str,
    activity_threads: int = 16,
    workflow_runner: WorkflowRunner | None = None,
) -> Worker:
    """``workflow_runner``: the sandbox by default; simulations pass
    ``UnsandboxedWorkflowRunner()`` to skip re-creating the sandbox for every run (the
    sandboxed test suite and the replay test keep guarding determinism)."""
    activities = BillingActivities(
        deps.session_factory, deps.gateway, deps.clock, after_charge_hook=deps.after_charge_hook
    )
    return Worker(
        client,
        task_queue=task_queue,
        workflows=[SubscriptionWorkflow],
        activities=activities.all(),
        activity_executor=ThreadPoolExecutor(max_workers=activity_threads),
        max_concurrent_activities=activity_threads,
        workflow_runner=workflow_runner or SandboxedWorkflowRunner(),
    )
