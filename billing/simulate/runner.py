"""Run a scenario on Temporal's time-skipping test server with the real subscription workflow
and activities (``BillingHarness``): localstripe for payments, a throwaway SQLite database.

How time moves:
- the server's clock starts at the current real time and only moves forward, so the runner
  advances it to the scenario's start before the customer signs up (a start in the past is
  refused, naming the earliest allowed start);
- signup happens *at* the start: the signup service gets a clock fixed there, so trial ends
  and default anchors are exact;
- an action at minute M is applied at M + 30 s, after whatever the subscriptions themselves
  do at M (renewals and retries fire a few milliseconds after their minute); actions at the
  same instant apply in the order listed;
- time is only ever moved with ``env.sleep`` (never by awaiting several workflow results
  at once, which can crash the test server); the server does not skip time while an activity
  or workflow task is in flight, so each step ends with every subscription at rest.

What the timeline reports comes from the records, never from the test clock: invoices,
attempts, notices and status changes (each at the instant the workflow decided it) from the
database.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import logging
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

import stripe
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowUpdateFailedError
from temporalio.runtime import (
    LogForwardingConfig,
    LoggingConfig,
    Runtime,
    TelemetryConfig,
    TelemetryFilter,
)
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from billing.clock import FixedClock
from billing.contracts import (
    CancelInput,
    CancelResult,
    ChangePlanInput,
    ChangePlanResult,
    PauseInput,
    PauseResult,
    ResumeInput,
    ResumeResult,
    SubscriptionMessage,
    UpdatePaymentMethodInput,
    UpdatePaymentMethodResult,
)
from billing.errors import BillingError, PaymentMethodRejected
from billing.invoices import InvoiceStatus
from billing.plans import DEMO_PLANS, Plan
from billing.records import AttemptStatus, InvoiceLineRecord
from billing.signup import CustomerDetails, SignupRequest
from billing.simulate.instants import ceil_minute, format_instant, to_minute
from billing.simulate.provider import BankReports, ReportingGateway, WebhookEndpoint, find_event
from billing.simulate.scenario import (
    CARD_ACTIONS,
    HARD_DECLINE_ACTIONS,
    Action,
    ActionKind,
    CardBehaviour,
    Scenario,
    ScenarioError,
)
from billing.simulate.timeline import (
    ActionRecord,
    Attempt,
    BalanceMovement,
    Invoice,
    Line,
    Notice,
    StatusChange,
    SubscriptionTimeline,
    Timeline,
    totals_of,
)
from billing.testing.cards import (
    DECLINES_AFTER_ATTACH,
    LOST,
    REQUIRES_AUTHENTICATION,
    STOLEN,
    SUCCEEDS,
)
from billing.testing.database import temporary_database
from billing.testing.harness import (
    BillingHarness,
    BillingSnapshot,
    start_time_skipping_environment,
)
from billing.testing.localstripe import LocalStripe
from db.engine import unit_of_work
from db.repositories import balances as balances_repo
from db.repositories import customers as customers_repo
from db.repositories import invoices as invoices_repo

_T = TypeVar("_T", StatusChange, Notice, ActionRecord)

#: Called with the simulated instant as the simulation moves forward.
ProgressCallback = Callable[[datetime], None]

CARD_NUMBERS: dict[CardBehaviour, str] = {
    CardBehaviour.SUCCEEDS: SUCCEEDS,
    CardBehaviour.DECLINES: DECLINES_AFTER_ATTACH,
    CardBehaviour.REQUIRES_AUTHENTICATION: REQUIRES_AUTHENTICATION,
    CardBehaviour.STOLEN: STOLEN,
    CardBehaviour.LOST: LOST,
}

_AT_THE_BANK = {
    CardBehaviour.DECLINES: "the bank declines every charge from now on",
    CardBehaviour.REQUIRES_AUTHENTICATION: "the bank asks for authentication on every charge",
    CardBehaviour.SUCCEEDS: "the bank accepts charges again",
}

#: Actions at minute M apply at M + this: after everything due at M has run.
ACTION_OFFSET = timedelta(seconds=30)
#: The longest single time skip (see Simulation._advance_to): a year for one subscription,
#: shorter for several, never under a month.
MAX_STEP = timedelta(days=366)
MIN_STEP = timedelta(days=31)
#: Callback ``run_scenario`` awaits with the finished simulation before it tears the stack
#: down, e.g. to compare the records with the provider's (``Simulation.harness``).
InspectCallback = Callable[["Simulation", Timeline], Awaitable[None]]

#: Real seconds to wait for the subscriptions to come to rest before giving up.
SETTLE_TIMEOUT_SECONDS = 120.0

# Aware instants as the engine writes them in messages (isoformat, with milliseconds).
_ISO_INSTANT_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:\d{2})")


class SimulationError(RuntimeError):
    """The simulation could not run to its horizon (not a problem with the scenario)."""


async def run_scenario(
    scenario: Scenario,
    *,
    stripe_api_base: str | None = None,
    database_url: str | None = None,
    test_server_path: str | None = None,
    progress: ProgressCallback | None = None,
    inspect: InspectCallback | None = None,
) -> Timeline:
    """Run ``scenario`` from its start to its horizon and return the timeline.

    Starts its own time-skipping test server (its clock must be at or before the start).
    ``stripe_api_base``: a running localstripe to use (else one is started);
    ``database_url``: a migrated database to use (else a throwaway SQLite one).
    ``inspect``: awaited with the simulation and its timeline while the stack still runs.
    Raises ScenarioError for a scenario the engine refuses (e.g. a start in the past).
    """
    async with contextlib.AsyncExitStack() as stack:
        stack.enter_context(_callers_objects_frozen())
        local_stripe: asyncio.Future[LocalStripe] | None = None
        if stripe_api_base is None:
            # localstripe takes a few tenths of a second to import and answer: it starts in a
            # thread while the test server and the database start.
            server = LocalStripe()
            stack.callback(server.stop)
            local_stripe = asyncio.ensure_future(asyncio.to_thread(server.start))
            stack.push_async_callback(_finished, local_stripe)
        throwaway = database_url is None
        if database_url is None:
            database_url = stack.enter_context(temporary_database("sqlite"))
        env = await start_time_skipping_environment(test_server_path, runtime=quiet_runtime())
        stack.push_async_callback(env.shutdown)
        if local_stripe is not None:
            stripe_api_base = (await local_stripe).url
        assert stripe_api_base is not None
        # The bank's reports (stolen, lost) are answers localstripe cannot give: a wrapper of
        # the gateway gives them, which needs the payments worker in this process.
        reports = BankReports()
        reporting = any(a.kind in HARD_DECLINE_ACTIONS for a in scenario.timeline)
        harness = await stack.enter_async_context(
            BillingHarness(
                env,
                database_url=database_url,
                stripe_api_base=stripe_api_base,
                plans=_plans_for(scenario),
                # A simulation is a throwaway run: no sandbox re-created per workflow run and
                # no fsync per commit (about half the worker's time per billed period).
                sandboxed=False,
                throwaway_database=throwaway,
                # Many subscriptions keep one process's interpreter busy: the charges then run
                # in a second process, on the other core. One subscription is a single chain
                # of steps, which a second process would not shorten.
                payments_processes=1 if len(scenario.subscriptions) > 1 and not reporting else 0,
                wrap_gateway=(lambda inner: ReportingGateway(inner, reports))
                if reporting
                else None,
            )
        )
        simulation = Simulation(harness, scenario, progress=progress, reports=reports)
        stack.push_async_callback(simulation.close)
        timeline = await simulation.run()
        if inspect is not None:
            await inspect(simulation, timeline)
        return timeline


@contextlib.contextmanager
def _callers_objects_frozen() -> Iterator[None]:
    """Leave what the calling process holds (every imported module, a test session's objects)
    out of the garbage collector's full passes while the simulation runs: each would walk all
    of it (0.15 s of CPU in ten simulated years run in a test or benchmark process, 3 %).
    ``gc.freeze`` only changes which objects a pass looks at; unless the caller had frozen
    some already (``billing simulate`` does, for good), they are thawed afterwards, so cyclic
    garbage among them is still collected later."""
    thaw = gc.get_freeze_count() == 0
    gc.freeze()
    try:
        yield
    finally:
        if thaw:
            gc.unfreeze()


async def _finished(future: asyncio.Future[Any]) -> None:
    """Wait for ``future`` to end, whatever its outcome (its error, if any, is raised where
    it is awaited first); a cancellation of the caller still propagates."""
    await asyncio.wait([future])


@functools.cache
def quiet_runtime() -> Runtime:
    """A Temporal runtime whose core logs errors only, through Python logging.

    By default the SDK core prints its warnings (e.g. about the test server's version) on
    stdout, where they would corrupt the ``--json`` document.
    """
    return Runtime(
        telemetry=TelemetryConfig(
            logging=LoggingConfig(
                filter=TelemetryFilter(core_level="ERROR", other_level="ERROR"),
                forwarding=LogForwardingConfig(logger=logging.getLogger("temporalio.core")),
            )
        )
    )


def _plans_for(scenario: Scenario) -> list[Plan]:
    """The demo plans, with the scenario's own plans (and dunning override) in their place."""
    plans = {p.code: p for p in DEMO_PLANS}
    plans.update({p.code: p for p in scenario.plans()})
    return list(plans.values())


@dataclass
class _Live:
    """A subscription the simulation started."""

    name: str
    index: int
    subscription_id: str
    workflow_id: str


@dataclass
class _RawAction:
    action: Action
    subscription: str | None
    outcome: str
    detail: str = ""
    #: Invoice ids mentioned by the detail, to show by their timeline numbers.
    invoice_ids: list[str] = field(default_factory=list)
    #: A webhook delivery: its instant and name ("webhook"), instead of the action's.
    at: datetime | None = None
    name: str | None = None


@dataclass
class _Delivery:
    """A provider event the simulation delivers to the webhook endpoint at ``at``."""

    at: datetime
    #: Tiebreak: deliveries due at the same minute go in the order they were scheduled.
    order: int
    event: dict[str, Any]
    #: The action that caused it (its instant is the event's ``created``).
    cause: Action
    again: bool = False


class Simulation:
    """One scenario on one harness (whose server clock must not be past the start)."""

    def __init__(
        self,
        harness: BillingHarness,
        scenario: Scenario,
        *,
        progress: ProgressCallback | None = None,
        reports: BankReports | None = None,
    ) -> None:
        self.harness = harness
        self.reports = reports if reports is not None else BankReports()
        self.webhooks = WebhookEndpoint(harness.deps, harness.client)
        self.deliveries: list[_Delivery] = []
        #: Provider events already scheduled for delivery (ids), so each is found once.
        self._events_seen: set[str] = set()
        self.env: WorkflowEnvironment = harness.env
        self.client: Client = harness.client
        self.scenario = scenario
        self.progress = progress
        self.customer_id: str | None = None
        self.live: list[_Live] = []
        self.actions: list[_RawAction] = []
        self.step = max(MIN_STEP, MAX_STEP / max(1, len(scenario.subscriptions)))

    async def run(self) -> Timeline:
        s = self.scenario
        now = await self.harness.now()
        if s.start < now:
            raise ScenarioError(
                ("start",),
                f"{format_instant(s.start)} is in the past for the time-skipping test server, "
                "whose clock starts at the current time and only moves forward; the earliest "
                f"allowed start is {format_instant(ceil_minute(now))}. Move the scenario's "
                "instants later",
            )
        # Nothing runs yet: one jump to the start.
        await self.harness.advance_to(s.start)
        await self._sign_up()
        await self._settle()
        actions = list(s.timeline)
        while actions or self.deliveries:
            delivery = min(self.deliveries, key=lambda d: (d.at, d.order), default=None)
            # A webhook due at an action's minute is delivered after that minute's actions.
            if delivery is not None and (not actions or delivery.at < actions[0].at):
                self.deliveries.remove(delivery)
                if delivery.at > s.horizon:
                    continue  # delivered after the simulation ends
                await self._advance_to(delivery.at + ACTION_OFFSET)
                await self._settle()
                await self._deliver(delivery)
                await self._settle()
                continue
            action = actions.pop(0)
            await self._advance_to(action.at + ACTION_OFFSET)
            await self._settle()
            await self._apply(action)
            await self._settle()
        await self._advance_to(s.horizon + ACTION_OFFSET)
        await self._settle()
        if self.progress is not None:
            self.progress(s.horizon)
        return await self._timeline()

    async def close(self) -> None:
        await self.webhooks.close()

    # ------------------------------------------------------------------------ time --------

    async def _advance_to(self, instant: datetime) -> None:
        """Skip time to ``instant`` in steps of at most ``self.step``.

        Steps keep each ``unlock_time_skipping_with_sleep`` call short in real time: one call
        covering a year of 100 busy subscriptions was seen to die with an HTTP/2 error. So a
        step covers about a year of billing across all subscriptions (a year for one, a month
        for twelve or more). Each step costs a few milliseconds of its own: in the ten-year
        run, monthly steps took 0.4 s longer than yearly ones (scripts/bench_simulate.py).
        Steps also move the progress bar, and change nothing else (nothing is applied
        between them).
        """
        now = await self.harness.now()
        while now < instant:
            now = await self.harness.advance_to(min(instant, now + self.step))
            if self.progress is not None:
                self.progress(max(self.scenario.start, min(now, self.scenario.horizon)))

    async def _settle(self) -> None:
        """Wait (in real time, the clock held) until no subscription has work in flight."""
        try:
            await self.harness.wait_until_at_rest(
                [live.subscription_id for live in self.live], timeout=SETTLE_TIMEOUT_SECONDS
            )
        except TimeoutError as error:
            raise SimulationError(f"{error}; see the worker's log") from None

    # ------------------------------------------------------------------------ signup ------

    async def _sign_up(self) -> None:
        s = self.scenario
        h = self.harness
        payment_method_id = await h.to_thread_card(CARD_NUMBERS[s.card])
        # Signup happens at the scenario's start, not a few milliseconds after it: trial ends
        # and default anchors are then exactly where the scenario says.
        h.signups.clock = FixedClock(s.start)
        try:
            for index, spec in enumerate(s.subscriptions):
                request = SignupRequest(
                    plan_code=spec.plan.code,
                    customer=CustomerDetails(
                        external_id="simulated-customer",
                        email="customer@example.com",
                        name="Simulated Customer",
                        timezone=s.timezone,
                    ),
                    payment_method_id=payment_method_id if self.customer_id is None else None,
                    customer_id=self.customer_id,
                    billing_anchor_at=spec.anchor_at,
                    trial_days=spec.trial_days,
                    quantity=spec.quantity,
                )
                try:
                    result = await h.signups.start_subscription(request)
                except BillingError as error:
                    field_name = {"billing_anchor_at": "anchor", "trial_days": "trial_days"}.get(
                        error.field or ""
                    )
                    path: tuple[str | int, ...] = ("subscriptions", index)
                    if field_name:
                        path = (*path, field_name)
                    raise ScenarioError(path, f"signup refused: {error.message}") from None
                await h.track(result.subscription_id)
                self.customer_id = result.customer_id
                self.live.append(
                    _Live(spec.name, index, result.subscription_id, result.workflow_id)
                )
        finally:
            h.signups.clock = h.clock

    # ------------------------------------------------------------------------ actions -----

    def _targets(self, action: Action) -> list[_Live]:
        if action.subscription is not None:
            return [live for live in self.live if live.name == action.subscription]
        return list(self.live)

    async def _apply(self, action: Action) -> None:
        h = self.harness
        if action.kind in HARD_DECLINE_ACTIONS:
            assert self.customer_id is not None
            code = HARD_DECLINE_ACTIONS[action.kind]
            # The card on file becomes one localstripe declines; the gateway wrapper reports
            # its declines with the bank's code (see billing.simulate.provider).
            pm = await h.to_thread_switch_card(self.customer_id, DECLINES_AFTER_ATTACH)
            self.reports.codes[pm] = code
            self.actions.append(
                _RawAction(action, None, "applied", f"every charge is declined ({code})")
            )
            return
        if action.kind == ActionKind.AUTHENTICATE:
            await self._authenticate(action)
            return
        if action.kind == ActionKind.CHANGE_CARD_AT_PROVIDER:
            await self._change_card_at_provider(action)
            return
        if action.kind in CARD_ACTIONS:
            assert self.customer_id is not None
            behaviour = CARD_ACTIONS[action.kind]
            await h.to_thread_switch_card(self.customer_id, CARD_NUMBERS[behaviour])
            self.actions.append(_RawAction(action, None, "applied", _AT_THE_BANK[behaviour]))
            return
        if action.kind == ActionKind.UPDATE_CARD:
            targets = self._targets(action)
            if action.subscription is None:
                # "The customer updates the card": given once, on a subscription that has not
                # ended; the product takes it to the customer's other subscriptions itself.
                targets = [t for t in targets if not await self._has_ended(t)][:1]
                if not targets:
                    self.actions.append(
                        _RawAction(action, None, "refused", "every subscription has ended")
                    )
                    return
            payment_method_id = await h.to_thread_card(CARD_NUMBERS[action.card])
            for target in targets:
                await self._update(
                    action,
                    target,
                    SubscriptionMessage.UPDATE_PAYMENT_METHOD,
                    UpdatePaymentMethodInput(payment_method_id=payment_method_id),
                    UpdatePaymentMethodResult,
                )
            return
        [target] = self._targets(action)
        match action.kind:
            case ActionKind.CANCEL:
                await self._update(
                    action,
                    target,
                    SubscriptionMessage.CANCEL,
                    CancelInput(at_period_end=action.at_period_end, reason=action.reason),
                    CancelResult,
                )
            case ActionKind.PAUSE:
                await self._update(
                    action,
                    target,
                    SubscriptionMessage.PAUSE,
                    PauseInput(action.reason),
                    PauseResult,
                )
            case ActionKind.RESUME:
                await self._update(
                    action,
                    target,
                    SubscriptionMessage.RESUME,
                    ResumeInput(action.reason),
                    ResumeResult,
                )
            case ActionKind.CHANGE_PLAN | ActionKind.CHANGE_QUANTITY:
                await self._update(
                    action,
                    target,
                    SubscriptionMessage.CHANGE_PLAN,
                    ChangePlanInput(
                        plan=action.plan,
                        quantity=action.quantity,
                        effective=action.effective,
                        proration=action.proration,
                    ),
                    ChangePlanResult,
                )
            case _:  # pragma: no cover - every kind is handled above
                raise AssertionError(f"unhandled action {action.kind}")

    async def _update(
        self, action: Action, target: _Live, name: str, arg: object, result_type: type
    ) -> None:
        try:
            result = await self.harness.update(target.subscription_id, name, arg, result_type)
        except WorkflowUpdateFailedError as error:
            cause = error.cause
            reason = getattr(cause, "message", None) or str(cause or error)
            self.actions.append(_RawAction(action, target.name, "refused", reason))
            return
        except RPCError:
            if not await self._has_ended(target):
                raise
            self.actions.append(
                _RawAction(action, target.name, "refused", f"subscription {target.name} has ended")
            )
            return
        self.actions.append(self._applied(action, target, result))

    def _applied(self, action: Action, target: _Live, result: Any) -> _RawAction:
        record = _RawAction(action, target.name, "applied")
        if isinstance(result, CancelResult):
            ends = format_instant(to_minute(result.ends_at)) if result.ends_at else "-"
            verb = "ends" if result.cancel_at_period_end else "ended"
            record.detail = f"{verb} at {ends}"
            if result.voided_invoice_id:
                record.detail += "; open invoice {0} voided"
                record.invoice_ids.append(result.voided_invoice_id)
        elif isinstance(result, ResumeResult) and result.next_billing_at is not None:
            record.detail = f"next billing at {format_instant(result.next_billing_at)}"
        elif isinstance(result, ChangePlanResult):
            terms = f"{result.plan_code} x {result.quantity}"
            if result.pending:
                record.detail = f"{terms} from {format_instant(result.effective_at)} (pending)"
                return record
            amounts = " ".join(f"{line.amount_minor:+d}" for line in result.lines)
            record.detail = f"{terms} now"
            if result.invoice_id is not None:
                record.invoice_ids.append(result.invoice_id)
                record.detail += f"; lines {amounts or 'none'} on {{0}} ({result.invoice_status})"
            elif result.proration == "create_prorations":
                record.detail += f"; lines {amounts} carried to the next renewal"
            else:
                record.detail += "; nothing prorated"
            if result.voided_invoice_id is not None:
                record.invoice_ids.append(result.voided_invoice_id)
                record.detail += "; unpaid {1} voided and billed again with the change"
        elif isinstance(result, UpdatePaymentMethodResult):
            record.detail = f"new card ({action.card.value})"
            if result.retry_scheduled:
                record.detail += "; the open invoice is retried at once"
        return record

    # ------------------------------------------------------------------------ webhooks ----

    async def _authenticate(self, action: Action) -> None:
        """The customer passes (or fails) 3-D Secure on each payment waiting for it, at the
        provider; a success's payment_intent.succeeded goes to the webhook endpoint."""
        h = self.harness
        waiting: list[tuple[_Live, str]] = []
        for target in self._targets(action):
            snap = h.snapshot(target.subscription_id)
            for invoice in snap.invoices:
                attempts = snap.attempts[invoice.id]
                if invoice.status != InvoiceStatus.OPEN or not attempts:
                    continue
                last = attempts[-1]
                if last.status == AttemptStatus.REQUIRES_ACTION and last.stripe_payment_intent_id:
                    waiting.append((target, last.stripe_payment_intent_id))
        if not waiting:
            self.actions.append(
                _RawAction(
                    action, action.subscription, "refused", "no payment waits for authentication"
                )
            )
            return
        for target, intent_id in waiting:
            status = await asyncio.to_thread(self._authenticate_at_provider, intent_id, action)
            record = _RawAction(action, target.name, "applied" if status else "refused")
            if status is None:
                record.detail = "the payment no longer waits for authentication"
            elif not action.success:
                record.detail = f"authentication failed; the payment is {status}"
            else:
                record.detail = f"authenticated; the payment is {status}"
                event = await asyncio.to_thread(
                    find_event,
                    h.stripe,
                    "payment_intent.succeeded",
                    intent_id,
                    skip=self._events_seen,
                )
                if event is not None:
                    self._schedule(event, action)
            self.actions.append(record)

    def _authenticate_at_provider(self, intent_id: str, action: Action) -> str | None:
        """localstripe's 3-D Secure step (``POST /v1/payment_intents/{id}/_authenticate``,
        with the intent's client secret, as Stripe.js would). The intent's status afterwards,
        or None if it was no longer waiting for the customer."""
        client = self.harness.stripe
        intent = client.v1.payment_intents.retrieve(intent_id)
        if intent.status != "requires_action":
            return None
        client.raw_request(
            "post",
            f"/v1/payment_intents/{intent_id}/_authenticate",
            client_secret=intent.client_secret,
            success="true" if action.success else "false",
        )
        return str(client.v1.payment_intents.retrieve(intent_id).status)

    async def _change_card_at_provider(self, action: Action) -> None:
        """The customer makes a new card the default at the provider; its customer.updated
        goes to the webhook endpoint."""
        h = self.harness
        assert self.customer_id is not None
        try:
            pm = await h.to_thread_make_default_at_provider(
                self.customer_id, CARD_NUMBERS[action.card]
            )
        except (PaymentMethodRejected, stripe.StripeError):
            # The provider's message names random ids; the timeline stays stable without them.
            self.actions.append(
                _RawAction(
                    action,
                    None,
                    "refused",
                    f"the provider refused the {action.card.value} card at attach",
                )
            )
            return
        provider_customer_id = self._provider_customer_id()
        event = await asyncio.to_thread(
            find_event,
            h.stripe,
            "customer.updated",
            provider_customer_id,
            skip=self._events_seen,
            match=lambda obj: (
                (obj.get("invoice_settings") or {}).get("default_payment_method") == pm
            ),
        )
        self.actions.append(
            _RawAction(action, None, "applied", f"new default card ({action.card.value})")
        )
        if event is not None:
            self._schedule(event, action)

    def _provider_customer_id(self) -> str:
        assert self.customer_id is not None
        with unit_of_work(self.harness.session_factory) as session:
            customer = customers_repo.get_customer(session, self.customer_id)
        assert customer is not None and customer.stripe_customer_id is not None
        return customer.stripe_customer_id

    def _schedule(self, event: dict[str, Any], action: Action) -> None:
        self._events_seen.add(str(event["id"]))
        first = _Delivery(
            action.at + timedelta(minutes=action.webhook_delay_minutes),
            len(self.deliveries) + len(self.actions),
            event,
            action,
        )
        self.deliveries.append(first)
        if action.webhook_redelivery_minutes is not None:
            self.deliveries.append(
                dataclasses.replace(
                    first,
                    at=action.at + timedelta(minutes=action.webhook_redelivery_minutes),
                    order=first.order + 1,
                    again=True,
                )
            )

    async def _deliver(self, delivery: _Delivery) -> None:
        verdict = await self.webhooks.deliver(delivery.event, delivery.cause.at)
        again = ", again" if delivery.again else ""
        self.actions.append(
            _RawAction(
                delivery.cause,
                None,
                "delivered",
                f"{delivery.event['type']} of timeline[{delivery.cause.index}]{again}: {verdict}",
                at=delivery.at,
                name="webhook",
            )
        )

    async def _has_ended(self, target: _Live) -> bool:
        description = await self.client.get_workflow_handle(target.workflow_id).describe()
        return description.status != WorkflowExecutionStatus.RUNNING

    # ------------------------------------------------------------------------ records -----

    async def _timeline(self) -> Timeline:
        s = self.scenario
        snapshots = {live.name: self.harness.snapshot(live.subscription_id) for live in self.live}
        # Numbers from position: by period start, then by the scenario's subscription order.
        ordered = sorted(
            (
                (invoice.period_start, live.index, invoice.period_index, invoice.id)
                for live in self.live
                for invoice in snapshots[live.name].invoices
            ),
        )
        numbers = {key[3]: f"INV-{n:04d}" for n, key in enumerate(ordered, start=1)}
        sanitize = _Sanitizer(self.live, self.customer_id, snapshots, numbers)

        subscriptions: list[SubscriptionTimeline] = []
        # (exact instant, tiebreak) of every status change, notice and action, to give each
        # its place in one chronological order (the timeline itself is to the minute).
        occurred: list[tuple[datetime, tuple[int, int, int], Any]] = []
        with unit_of_work(self.harness.session_factory) as session:
            lines = invoices_repo.lines_by_invoice(session, list(numbers))
            entries = (
                balances_repo.list_entries(session, self.customer_id)
                if self.customer_id is not None
                else []
            )
        balance = tuple(
            BalanceMovement(
                at=to_minute(entry.created_at),
                kind=entry.kind.value,
                amount_minor=entry.amount_minor,
                currency=entry.currency,
                invoice=numbers.get(entry.invoice_id) if entry.invoice_id else None,
            )
            for entry in entries
            if to_minute(entry.created_at) <= s.horizon
        )
        for live in self.live:
            sub, exact = _subscription_timeline(
                live, snapshots[live.name], numbers, s.horizon, lines
            )
            subscriptions.append(sub)
            for n, (item, instant) in enumerate(exact):
                occurred.append((instant, (live.index, 0, n), item))
        actions = []
        for n, raw in enumerate(self.actions):
            at = raw.at or raw.action.at
            record = ActionRecord(
                at=at,
                action=raw.name or raw.action.kind.value,
                subscription=raw.subscription,
                outcome=raw.outcome,
                detail=sanitize(
                    raw.detail.format(*(numbers.get(i, "an invoice") for i in raw.invoice_ids))
                ),
            )
            actions.append(record)
            occurred.append((at + ACTION_OFFSET, (-1, 1, n), record))
        sequence = {id(item): n for n, (_, _, item) in enumerate(sorted(occurred, key=_order))}

        def placed(item: _T) -> _T:
            return dataclasses.replace(item, sequence=sequence[id(item)])

        subscriptions = [
            dataclasses.replace(
                sub,
                status_changes=tuple(placed(c) for c in sub.status_changes),
                notices=tuple(placed(n) for n in sub.notices),
            )
            for sub in subscriptions
        ]
        return Timeline(
            name=s.name,
            start=s.start,
            horizon=s.horizon,
            timezone=s.timezone,
            subscriptions=tuple(subscriptions),
            actions=tuple(placed(a) for a in actions),
            totals=totals_of([i for sub in subscriptions for i in sub.invoices]),
            balance=balance,
        )


def _subscription_timeline(
    live: _Live,
    snap: BillingSnapshot,
    numbers: dict[str, str],
    horizon: datetime,
    lines: Mapping[str, Sequence[InvoiceLineRecord]] | None = None,
) -> tuple[SubscriptionTimeline, list[tuple[StatusChange | Notice, datetime]]]:
    """The subscription's part of the timeline, and the exact instant of each status change
    and notice in it."""
    record = snap.subscription
    invoices = tuple(
        Invoice(
            number=numbers[invoice.id],
            period_start=invoice.period_start,
            period_end=invoice.period_end,
            amount_due_minor=invoice.amount_due_minor,
            amount_paid_minor=invoice.amount_paid_minor,
            currency=invoice.currency,
            status=invoice.status.value,
            closed_reason=invoice.status_reason,
            attempts=tuple(
                Attempt(
                    number=a.attempt_number,
                    at=to_minute(a.created_at),
                    reason=a.reason,
                    outcome=a.status.value,
                    decline_code=a.decline_code,
                )
                for a in snap.attempts[invoice.id]
            ),
            lines=tuple(
                Line(
                    kind=line.kind.value,
                    description=line.description,
                    amount_minor=line.amount_minor,
                    period_start=line.period_start,
                    period_end=line.period_end,
                )
                for line in (lines or {}).get(invoice.id, ())
            ),
            credit_applied_minor=invoice.credit_applied_minor,
        )
        for invoice in snap.invoices
    )
    exact: list[tuple[StatusChange | Notice, datetime]] = []
    status_changes: list[StatusChange] = []
    for change in snap.status_changes:
        if to_minute(change.changed_at) <= horizon:
            status_changes.append(
                StatusChange(to_minute(change.changed_at), change.to_status.value)
            )
            exact.append((status_changes[-1], change.changed_at))
    notices = []
    for n in snap.notifications:
        if to_minute(n.created_at) <= horizon:
            notices.append(
                Notice(
                    at=to_minute(n.created_at),
                    kind=n.kind,
                    invoice=numbers.get(n.invoice_id) if n.invoice_id else None,
                )
            )
            exact.append((notices[-1], n.created_at))
    return SubscriptionTimeline(
        name=live.name,
        plan_code=record.plan_code,
        amount_minor=record.amount_minor,
        currency=record.currency,
        interval=record.interval.value,
        interval_count=record.interval_count,
        anchor=record.anchor_at,
        trial_end=record.trial_end_at,
        status=record.status.value,
        ended_at=to_minute(record.ended_at) if record.ended_at else None,
        invoices=invoices,
        status_changes=tuple(status_changes),
        notices=tuple(notices),
    ), exact


def _order(
    entry: tuple[datetime, tuple[int, int, int], Any],
) -> tuple[datetime, tuple[int, int, int]]:
    return entry[0], entry[1]


class _Sanitizer:
    """Makes the engine's messages stable: random ids become the scenario's names and
    timeline numbers, and instants lose their milliseconds (to the minute)."""

    def __init__(
        self,
        live: Sequence[_Live],
        customer_id: str | None,
        snapshots: dict[str, BillingSnapshot],
        numbers: dict[str, str],
    ) -> None:
        self.replacements: list[tuple[str, str]] = []
        for entry in live:
            self.replacements.append((entry.subscription_id, entry.name))
            for invoice in snapshots[entry.name].invoices:
                self.replacements.append((invoice.number, numbers[invoice.id]))
                self.replacements.append((invoice.id, numbers[invoice.id]))
        if customer_id:
            self.replacements.append((customer_id, "the customer"))

    def __call__(self, text: str) -> str:
        for old, new in self.replacements:
            text = text.replace(old, new)
        return _ISO_INSTANT_RE.sub(
            lambda m: format_instant(to_minute(datetime.fromisoformat(m.group(0)))), text
        )


__all__ = ["InspectCallback", "ProgressCallback", "Simulation", "SimulationError", "run_scenario"]
