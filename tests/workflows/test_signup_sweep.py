"""Every pending signup ends started or cleaned up (issue 11, finding 8).

A signup records its subscription ``pending`` and then starts the workflow. A process that dies
between the two, or a start that fails ambiguously (it may have started), leaves the row; the
sweeper starts it (idempotent by workflow id) and it bills. Only a definite refusal removes a
row at once, with the card it attached unless another live subscription of the customer may
charge it. The real workflow, localstripe and both databases."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from click.testing import Result
from sqlalchemy import select, update
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode
from typer.testing import CliRunner

from billing import cli
from billing.invoices import InvoiceStatus
from billing.signup import CustomerDetails, SignupRequest
from billing.signup_sweep import PendingSignupSweepInput
from billing.subscription import SubscriptionStatus
from billing.testing.cards import SUCCEEDS
from billing.testing.harness import BillingHarness
from billing.testing.localstripe import LocalStripe
from billing.worker import ensure_signup_sweeper
from db import models
from tests.conftest import BOTH_BACKENDS


class Crash(BaseException):
    """The process dies here: nothing after it runs (not an Exception, so no handler sees it)."""


class FlakyTemporal:
    """The harness's Temporal client, except that the next subscription-workflow start fails:
    ``crash`` (dies before the start), ``after_start`` (starts, then the answer is lost:
    DEADLINE_EXCEEDED), ``unavailable`` (UNAVAILABLE without starting) or ``refused``
    (INVALID_ARGUMENT: definitely not started)."""

    def __init__(self, client: Client, mode: str) -> None:
        self._client = client
        self.mode: str | None = mode

    async def start_workflow(self, *args: Any, **kwargs: Any) -> Any:
        mode, self.mode = self.mode, None
        match mode:
            case "crash":
                raise Crash
            case "unavailable":
                raise RPCError("connection refused", RPCStatusCode.UNAVAILABLE, b"")
            case "refused":
                raise RPCError("bad request", RPCStatusCode.INVALID_ARGUMENT, b"")
            case "after_start":
                await self._client.start_workflow(*args, **kwargs)
                raise RPCError("deadline exceeded", RPCStatusCode.DEADLINE_EXCEEDED, b"")
            case "after_start_nowhere":
                # Started where no worker listens, so it never reports in.
                await self._client.start_workflow(*args, **{**kwargs, "task_queue": "nowhere"})
                raise RPCError("deadline exceeded", RPCStatusCode.DEADLINE_EXCEEDED, b"")
        return await self._client.start_workflow(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def flaky(harness: BillingHarness, mode: str) -> None:
    harness.signups.temporal = FlakyTemporal(harness.client, mode)  # type: ignore[assignment]


def request(card: str | None, *, key: str | None = None, **customer: Any) -> SignupRequest:
    return SignupRequest(
        plan_code="basic-monthly",
        customer=CustomerDetails(**{"external_id": "sweep-1", **customer}),
        payment_method_id=card,
        idempotency_key=key,
    )


def subscription_row(harness: BillingHarness, subscription_id: str) -> Any:
    with harness.session_factory() as session:
        return session.get(models.SubscriptionRow, subscription_id)


def pending_ids(harness: BillingHarness) -> list[str]:
    with harness.session_factory() as session:
        return list(
            session.scalars(
                select(models.SubscriptionRow.id).where(
                    models.SubscriptionRow.status == SubscriptionStatus.PENDING
                )
            )
        )


async def first_run_id(harness: BillingHarness, subscription_id: str) -> str:
    """The first run of the subscription's execution chain: another start would make a new
    chain (the time-skipping server cannot list executions)."""
    history = await harness.handle(subscription_id).fetch_history()
    started = history.events[0].workflow_execution_started_event_attributes
    return started.first_execution_run_id or started.original_execution_run_id


async def assert_bills(harness: BillingHarness, subscription_id: str) -> None:
    await harness.track(subscription_id)
    view = await harness.wait_for(
        subscription_id, lambda v: v.invoices_issued == 1 and v.open_invoice is None
    )
    assert view.status == SubscriptionStatus.ACTIVE
    invoices = harness.snapshot(subscription_id).invoices
    assert [i.status for i in invoices] == [InvoiceStatus.PAID]


@BOTH_BACKENDS
async def test_a_crash_between_commit_and_start_is_started_by_the_sweeper(
    harness: BillingHarness,
) -> None:
    card = await harness.to_thread_card(SUCCEEDS)
    await harness.now()
    flaky(harness, "crash")
    with pytest.raises(Crash):
        await harness.signups.start_subscription(request(card))
    (sub_id,) = pending_ids(harness)

    # Within the grace period the sweeper leaves it alone (the signup may still be starting).
    assert (await harness.signups.sweep_pending(older_than=timedelta(minutes=2))).started == []
    await harness.advance(timedelta(minutes=3))
    # Two sweeps at once: both find it pending, one starts it, the other finds it started.
    reports = await asyncio.gather(harness.signups.sweep_pending(), harness.signups.sweep_pending())
    assert [r.started for r in reports] == [[sub_id], [sub_id]]
    assert all(not r.failed and not r.cleaned_up for r in reports)
    run = await first_run_id(harness, sub_id)

    await assert_bills(harness, sub_id)
    assert await first_run_id(harness, sub_id) == run
    # Once it has reported in, a sweep finds nothing to do.
    await harness.advance(timedelta(minutes=3))
    again = await harness.signups.sweep_pending()
    assert (again.started, again.cleaned_up, again.failed) == ([], [], [])


@BOTH_BACKENDS
@pytest.mark.parametrize("key", [None, "sweep-key-1"])
async def test_an_ambiguous_start_keeps_the_row_and_the_sweeper_resolves_it(
    harness: BillingHarness, key: str | None
) -> None:
    card = await harness.to_thread_card(SUCCEEDS)
    await harness.now()
    flaky(harness, "after_start")

    result = await harness.signups.start_subscription(request(card, key=key))

    # It did start, but the signup cannot know: the row stays, said pending.
    assert result.created and not result.workflow_started
    assert result.status == SubscriptionStatus.PENDING
    assert subscription_row(harness, result.subscription_id) is not None
    run = await first_run_id(harness, result.subscription_id)
    await assert_bills(harness, result.subscription_id)
    await harness.advance(timedelta(minutes=3))
    report = await harness.signups.sweep_pending()
    assert report.failed == [] and report.cleaned_up == []
    assert await first_run_id(harness, result.subscription_id) == run


@BOTH_BACKENDS
async def test_an_unavailable_service_leaves_a_pending_signup_the_sweeper_starts(
    harness: BillingHarness,
) -> None:
    card = await harness.to_thread_card(SUCCEEDS)
    await harness.now()
    flaky(harness, "unavailable")

    result = await harness.signups.start_subscription(request(card))

    assert not result.workflow_started
    assert pending_ids(harness) == [result.subscription_id]
    await harness.advance(timedelta(minutes=3))
    assert (await harness.signups.sweep_pending()).started == [result.subscription_id]
    await assert_bills(harness, result.subscription_id)


@BOTH_BACKENDS
async def test_a_refused_start_removes_the_signup_and_detaches_its_card(
    harness: BillingHarness,
) -> None:
    card = await harness.to_thread_card(SUCCEEDS)
    await harness.now()
    flaky(harness, "refused")

    with pytest.raises(RPCError):
        await harness.signups.start_subscription(request(card))

    assert pending_ids(harness) == []
    method = await asyncio.to_thread(harness.stripe.v1.payment_methods.retrieve, card)
    assert method.customer is None
    with harness.session_factory() as session:
        customer = session.scalars(select(models.CustomerRow)).one()
    assert customer.default_payment_method_id is None
    assert customer.signup_lease_token is None


async def test_a_refused_start_keeps_a_card_another_subscription_uses(
    harness: BillingHarness,
) -> None:
    card = await harness.to_thread_card(SUCCEEDS)
    await harness.now()
    first = await harness.signups.start_subscription(request(card))
    await assert_bills(harness, first.subscription_id)
    flaky(harness, "refused")

    with pytest.raises(RPCError):
        await harness.signups.start_subscription(request(card))

    # The first subscription charges that card: it stays attached and the default.
    method = await asyncio.to_thread(harness.stripe.v1.payment_methods.retrieve, card)
    assert method.customer is not None
    with harness.session_factory() as session:
        customer = session.scalars(select(models.CustomerRow)).one()
        subscriptions = list(session.scalars(select(models.SubscriptionRow.id)))
    assert customer.default_payment_method_id == card
    assert subscriptions == [first.subscription_id]


async def test_a_signup_that_can_never_start_is_cleaned_up(harness: BillingHarness) -> None:
    card = await harness.to_thread_card(SUCCEEDS)
    await harness.now()
    first = await harness.signups.start_subscription(request(card))
    await assert_bills(harness, first.subscription_id)
    # A second subscription on the customer's card on file, lost before its start...
    flaky(harness, "crash")
    with pytest.raises(Crash):
        await harness.signups.start_subscription(request(None))
    (pending,) = pending_ids(harness)
    # ... and then the customer has no card any more (removed by an operator).
    with harness.session_factory.begin() as session:
        session.execute(update(models.CustomerRow).values(default_payment_method_id=None))
    await harness.advance(timedelta(minutes=3))

    report = await harness.signups.sweep_pending()

    assert report.cleaned_up == [pending] and report.started == []
    assert subscription_row(harness, pending) is None
    assert subscription_row(harness, first.subscription_id) is not None
    # It attached no card of its own: the first subscription's card is left alone.
    method = await asyncio.to_thread(harness.stripe.v1.payment_methods.retrieve, card)
    assert method.customer is not None
    again = await harness.signups.sweep_pending()
    assert (again.started, again.cleaned_up, again.failed) == ([], [], [])


async def test_a_workflow_that_closed_without_reporting_in_is_left_for_a_person(
    harness: BillingHarness,
) -> None:
    card = await harness.to_thread_card(SUCCEEDS)
    await harness.now()
    flaky(harness, "after_start_nowhere")
    result = await harness.signups.start_subscription(request(card))
    assert not result.workflow_started
    await harness.handle(result.subscription_id).terminate("operator")
    # (No time skipping here: the test server stalls on the never-polled queue.)
    await asyncio.sleep(0.01)
    await harness.now()

    report = await harness.signups.sweep_pending(older_than=timedelta(0))

    # Not "started" (it never will), and not removed (its execution may have done things).
    assert report.started == [] and report.cleaned_up == []
    assert report.failed == [
        (result.subscription_id, "its workflow closed without reporting in; see its history")
    ]
    assert pending_ids(harness) == [result.subscription_id]


async def test_the_worker_runs_the_sweeper_workflow(harness: BillingHarness) -> None:
    card = await harness.to_thread_card(SUCCEEDS)
    await harness.now()
    flaky(harness, "crash")
    with pytest.raises(Crash):
        await harness.signups.start_subscription(request(card))
    (sub_id,) = pending_ids(harness)

    sweeper_id = await ensure_signup_sweeper(
        harness.client,
        task_queue=harness.task_queue,
        sweep=PendingSignupSweepInput(interval_s=60, grace_s=120, sweeps_per_run=3),
    )
    # A second worker process asks again: the same sweeper.
    assert await ensure_signup_sweeper(harness.client, task_queue=harness.task_queue) == sweeper_id
    try:
        # Sweeps at 0, 1 and 2 minutes: the one past the grace period starts it; then the
        # sweeper continues as new and keeps going.
        await harness.advance(timedelta(minutes=5))
        await assert_bills(harness, sub_id)
        description = await harness.client.get_workflow_handle(sweeper_id).describe()
        assert description.status is not None and description.status.name == "RUNNING"
    finally:
        await harness.client.get_workflow_handle(sweeper_id).terminate("test finished")


async def test_billing_signups_sweep_starts_a_pending_signup(
    harness: BillingHarness, localstripe: LocalStripe
) -> None:
    card = await harness.to_thread_card(SUCCEEDS)
    await harness.now()
    flaky(harness, "crash")
    with pytest.raises(Crash):
        await harness.signups.start_subscription(request(card))
    (sub_id,) = pending_ids(harness)
    env = {
        "BILLING_TEMPORAL_ADDRESS": harness.client.service_client.config.target_host,
        "BILLING_TEMPORAL_CONNECT_TIMEOUT_S": "0",
        "BILLING_DATABASE_URL": harness.database_url,
        "BILLING_STRIPE_API_BASE": localstripe.url,
        "BILLING_TASK_QUEUE": harness.task_queue,
        "BILLING_PAYMENTS_TASK_QUEUE": harness.payments_task_queue,
    }

    def sweep() -> Result:
        return CliRunner().invoke(cli.app, ["signups", "sweep", "--grace-seconds", "0"], env=env)

    first = await asyncio.to_thread(sweep)
    assert first.exit_code == 0, first.output
    assert f"started   {sub_id}" in first.output
    assert "1 started, 0 cleaned up, 0 left" in first.output
    await assert_bills(harness, sub_id)

    second = await asyncio.to_thread(sweep)
    assert second.exit_code == 0, second.output
    assert "0 started, 0 cleaned up, 0 left" in second.output
