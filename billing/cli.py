"""The `billing` command line."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import logging
import os
import secrets
import signal
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer
import uvicorn
from pydantic import SecretStr
from rich.console import Console
from rich.table import Table
from rich.text import Text
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.runtime import Runtime
from temporalio.service import RPCError
from temporalio.worker import Worker

from billing.cli_events import event_endpoints_app
from billing.contracts import SubscriptionMessage, SubscriptionView
from billing.reports_cli import reports_app
from billing.settings import ApiKey, Settings
from billing.simulate.command import simulate

if TYPE_CHECKING:
    from billing.delivery import DispatcherInput
    from billing.signup import SweepReport

app = typer.Typer(help="Recurring billing on Temporal.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)

DEMO_IDEMPOTENCY_KEY = "billing-dev-demo-subscription"


@app.command()
def migrate() -> None:
    """Migrate the configured database to the latest schema."""
    from db.migrate import upgrade

    settings = Settings()
    upgrade(settings.database_url)
    console.print(f"[green]database migrated[/green] ({_safe_url(settings.database_url)})")
    if settings.environment == "dev":
        # Only in dev: a production catalog holds only the plans the business created
        # (`billing plans create FILE`), never demo prices a customer could sign up to.
        from billing.plans import DEMO_PLANS
        from db.engine import unit_of_work
        from db.repositories import plans as plans_repo

        with unit_of_work(_session_factory(settings)) as session:
            for plan in DEMO_PLANS:
                if plans_repo.get_plan(session, plan.code) is None:
                    plans_repo.upsert_plan(session, plan)
        console.print(f"demo plans loaded (environment dev): {len(DEMO_PLANS)}")


@app.command()
def worker() -> None:
    """Run a worker against the configured Temporal server and database."""
    settings = Settings()
    settings.check_production_secrets()
    asyncio.run(_run_worker(settings))


@app.command()
def api() -> None:
    """Run the HTTP API (uvicorn) against the configured Temporal server and database."""
    settings = Settings()
    settings.check_production_secrets()
    asyncio.run(_run_api_only(settings))


async def _run_api_only(settings: Settings) -> None:
    from billing.worker import build_dependencies

    stop = _stop_event()
    client = await _connect_at_start_up(settings, stop)
    if client is None:
        return
    deps = build_dependencies(settings)
    await _serve_api(settings, deps, client, stop=stop)


async def _connect_at_start_up(
    settings: Settings, stop: asyncio.Event, *, runtime: Runtime | None = None
) -> Client | None:
    """A long-running command's client: Temporal may still be starting (a deploy that starts
    everything at once), so it is retried for ``temporal_connect_timeout_s``."""
    try:
        return await _connect(
            settings,
            retry_for_s=settings.temporal_connect_timeout_s,
            stop=stop,
            runtime=runtime,
        )
    except TemporalUnreachable as error:
        err_console.print(f"[red]error:[/red] {error}")
        sys.stdout.flush()
        sys.stderr.flush()
        # Nothing has started to clean up. A normal exit would finalize the interpreter while
        # the Temporal core's threads (from the failed connects) may still call into Python,
        # which aborts the process (PyGILState_Release) about one time in four.
        os._exit(1)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handling: the command's stop event owns Ctrl-C, so the
    worker, the API and the child processes stop together and in order."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _serve_api(
    settings: Settings,
    deps: object,
    client: Client,
    *,
    stop: asyncio.Event,
    ready: asyncio.Event | None = None,
) -> None:
    """Serve the API until ``stop`` is set; uvicorn runs in this event loop."""
    from billing.api.app import create_app, wake_dispatcher_on_commits
    from billing.api.webhooks import router as webhook_router
    from billing.worker import Dependencies

    assert isinstance(deps, Dependencies)
    application = create_app(
        settings, deps=deps, temporal=client, clock=deps.clock, include_routers=[webhook_router]
    )
    # The API's own commits that queue events (a redelivery, a credit note, a settlement
    # webhook) wake the dispatcher, as the worker's do (in ``billing dev`` the worker shares
    # this session factory, so its commits do too).
    waker = wake_dispatcher_on_commits(
        application,
        _dispatcher_input(settings),
        min_interval_s=settings.delivery_wake_min_interval_s,
    )
    config = uvicorn.Config(
        application,
        host=settings.api_host,
        port=settings.api_port,
        log_level="warning",
        lifespan="off",
    )
    server = _EmbeddedServer(config)
    try:
        serving = asyncio.create_task(server.serve())
        while not server.started and not serving.done():
            await asyncio.sleep(0.05)
        if serving.done():
            await serving  # raises why it could not start (e.g. the port is taken)
        if ready is not None:
            ready.set()
        await stop.wait()
        server.should_exit = True
        await serving
    finally:
        waker.detach()


@app.command()
def dev(
    demo: bool = typer.Option(True, help="Start (or resume) a demo subscription."),
) -> None:
    """The embedded local stack in one command: Temporal dev server (persistent), localstripe,
    SQLite with demo plans, the worker and a demo subscription. Ctrl-C stops everything."""
    from billing.devstack import (
        DevStackError,
        check_port_free,
        dev_lock,
        localstripe_server,
        mail_sink,
        migrate_and_seed,
        temporal_dev_server,
    )

    settings = Settings()
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        try:
            # One `billing dev` per state folder: a second one says what runs, and where.
            stack.enter_context(
                dev_lock(
                    settings,
                    API=f"http://{settings.api_host}:{settings.api_port}",
                    Temporal=settings.temporal_address,
                    **{"Temporal UI": f"http://127.0.0.1:{settings.temporal_ui_port}"},
                    Stripe=f"http://127.0.0.1:{settings.localstripe_port}"
                    if settings.stripe_api_key is None
                    else "api.stripe.com",
                )
            )
            check_port_free(settings.api_host, settings.api_port, setting="BILLING_API_PORT")
            console.print("starting Temporal dev server ...")
            stack.enter_context(temporal_dev_server(settings))
            stripe_url = stack.enter_context(localstripe_server(settings))
            mail_folder = None
            if settings.smtp_host is None:
                # No mail server configured: a local sink keeps every mail as a .eml file.
                sink_port, mail_folder = stack.enter_context(mail_sink(settings))
                settings = settings.model_copy(
                    update={"smtp_host": "127.0.0.1", "smtp_port": sink_port, "smtp_tls": "none"}
                )
        except DevStackError as error:
            _fail(str(error), code=1)
        if stripe_url is not None:
            settings = settings.model_copy(update={"stripe_api_base": stripe_url})
        if not settings.api_keys:
            settings = settings.model_copy(update={"api_keys": dev_api_keys(settings.state_dir)})
        if stripe_url is not None and settings.stripe_webhook_secret is None:
            settings = settings.model_copy(
                update={"stripe_webhook_secret": SecretStr(dev_webhook_secret(settings.state_dir))}
            )
        migrate_and_seed(settings)
        table = Table(title="billing dev", show_header=False)
        table.add_row("Temporal", settings.temporal_address)
        table.add_row("Temporal UI", f"http://127.0.0.1:{settings.temporal_ui_port}")
        table.add_row("Stripe", stripe_url or "api.stripe.com (configured key)")
        table.add_row("Database", _safe_url(settings.database_url))
        table.add_row("State folder", str(settings.state_dir.resolve()))
        table.add_row(
            "Mails",
            f"{mail_folder} (.eml files)"
            if mail_folder is not None
            else f"SMTP {settings.smtp_host}:{settings.smtp_port}",
        )
        api_url = f"http://{settings.api_host}:{settings.api_port}"
        table.add_row("API", api_url)
        table.add_row("API docs", f"{api_url}/docs")
        table.add_row("Dashboard", f"{api_url}/dashboard (sign in with the finance key)")
        for api_key in settings.api_keys:
            table.add_row(f"API key ({api_key.scope})", api_key.key.get_secret_value())
        console.print(table)
        # Stripe's test token (localstripe accepts it too); a live key needs a real pm_ id.
        example_pm = "pm_card_visa"
        signup_key = next(
            (k.key.get_secret_value() for k in settings.api_keys if k.scope == "signup"), "KEY"
        )
        console.print(
            "Sign up a customer (a test card is made for you when localstripe runs):\n"
            f"  curl -s -X POST {api_url}/v1/subscriptions \\\n"
            f"    -H 'Authorization: Bearer {signup_key}' -H 'Content-Type: application/json' \\\n"
            "    -H 'Idempotency-Key: signup-1' \\\n"
            """    -d '{"plan": "basic-monthly", "customer": {"external_id": "cust-1", """
            """"email": "ada@example.com", "timezone": "Europe/London"}, """
            f""""payment_method_id": "{example_pm}"}}'""",
            # Never wrap: the command must survive copy and paste.
            soft_wrap=True,
            markup=False,
            highlight=False,
        )
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_run_dev(settings, demo=demo))
        console.print("stopping ...")
    console.print("[green]stopped cleanly[/green]")


async def _run_worker(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    from billing.worker import (
        SHUTDOWN_MARGIN_S,
        MetricsAddressInUse,
        build_dependencies,
        build_worker,
        ensure_refund_sweeper,
        ensure_signup_sweeper,
        metrics_runtime,
        report_needs_attention,
        run_workers_until,
        workflow_runner_for,
    )

    stop = stop or _worker_stop_event()
    try:
        runtime = metrics_runtime(settings)
    except MetricsAddressInUse as error:
        _fail(str(error), code=1)
    client = await _connect_at_start_up(settings, stop, runtime=runtime)
    if client is None:
        return
    # Every Stripe request of the worker takes its turn under the cap shared by all workers.
    deps = build_dependencies(settings, pace_provider=True)
    graceful_s = settings.worker_graceful_shutdown_s
    w = build_worker(
        client,
        deps,
        task_queue=settings.task_queue,
        workflow_runner=workflow_runner_for(settings),
        activity_threads=settings.activity_threads,
        max_cached_workflows=settings.worker_max_cached_workflows,
        graceful_shutdown_s=graceful_s,
        payments_task_queue=settings.payments_queue(),
        max_concurrent_workflow_tasks=settings.worker_max_concurrent_workflow_tasks,
    )
    payments = _payments_worker(settings, client, deps)
    delivery = _delivery_worker(settings, client, deps)
    # The sweeper is a workflow on this task queue: started once (idempotent by id), run by
    # this worker as soon as it polls.
    await ensure_signup_sweeper(client, task_queue=settings.task_queue)
    dispatcher = await _ensure_dispatcher(settings, client)
    # A commit that writes a notice or an event wakes the dispatcher (the poll stays as the
    # safety net), so a mail leaves within a moment, not at the next look.
    from billing.worker import wake_dispatcher_on_commit

    wake_dispatcher_on_commit(
        deps.session_factory,
        client,
        dispatcher=dispatcher,
        min_interval_s=settings.delivery_wake_min_interval_s,
    )
    await ensure_refund_sweeper(client, task_queue=settings.task_queue)
    await _ensure_settlement_schedule(settings, client)
    console.print(
        f"[green]worker running[/green] on task queues {settings.task_queue!r} and "
        f"{settings.payments_queue()!r} (provider calls, at most "
        f"{settings.charge_rate_per_s:g}/s)"
    )
    health = None
    if settings.worker_health_address is not None:
        from billing.health import serve_worker_health

        health_started = asyncio.Event()
        health = asyncio.create_task(
            serve_worker_health(
                settings.worker_health_address,
                deps.session_factory,
                client,
                stop=stop,
                started=health_started,
            )
        )
        await asyncio.wait(
            [asyncio.ensure_future(health_started.wait()), health],
            return_when=asyncio.FIRST_COMPLETED,
        )
        if health.done():
            _fail(
                f"cannot serve health on {settings.worker_health_address} "
                "(BILLING_WORKER_HEALTH_ADDRESS): the address is taken or invalid",
                code=1,
            )
        console.print(f"health on http://{settings.worker_health_address}/healthz and /readyz")
    reporter = None
    if runtime is not None:
        console.print(f"metrics on http://{settings.worker_metrics_address}/metrics")
        reporter = asyncio.create_task(
            report_needs_attention(
                runtime, deps.session_factory, every_s=settings.worker_metrics_refresh_s, stop=stop
            )
        )
    clean = await run_workers_until(stop, [w, payments, delivery], graceful_shutdown_s=graceful_s)
    if health is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(health, timeout=2)
    if reporter is not None:
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
    if not clean:
        err_console.print(
            f"[yellow]worker stopped with activities still running[/yellow] after "
            f"{graceful_s + SHUTDOWN_MARGIN_S:g} s (BILLING_WORKER_GRACEFUL_SHUTDOWN_S = "
            f"{graceful_s:g} s, plus {SHUTDOWN_MARGIN_S:g} s for cancellations): they are "
            "abandoned, and Temporal runs them again after their timeout"
        )
        sys.stdout.flush()
        sys.stderr.flush()
        # A normal exit would join the activity threads, which is what never ends.
        os._exit(1)


def _payments_worker(settings: Settings, client: Client, deps: object) -> Worker:
    """The rate-capped worker for provider calls; every worker process runs it next to the
    billing worker."""
    from billing.worker import Dependencies, build_payments_worker

    assert isinstance(deps, Dependencies)
    return build_payments_worker(
        client,
        deps,
        task_queue=settings.payments_queue(),
        charge_rate_per_s=settings.charge_rate_per_s,
        activity_threads=settings.activity_threads,
    )


def _delivery_worker(settings: Settings, client: Client, deps: object) -> Worker:
    """The worker for customer mails and events to the business (its own task queue)."""
    from billing.worker import Dependencies, build_delivery_activities, build_delivery_worker

    assert isinstance(deps, Dependencies)
    return build_delivery_worker(
        client,
        build_delivery_activities(settings, deps.session_factory, deps.clock),
        task_queue=settings.delivery_queue(),
        activity_threads=settings.activity_threads,
        graceful_shutdown_s=settings.worker_graceful_shutdown_s,
    )


async def _ensure_settlement_schedule(settings: Settings, client: Client) -> None:
    """The daily settlement Schedule, made sure of by every worker. A Temporal server without
    Schedules (the time-skipping test server) does not stop the worker from billing: it is
    told, and the sync can be run by hand (``billing payouts sync``)."""
    from temporalio.service import RPCError, RPCStatusCode

    from billing.worker import ensure_settlement_schedule

    try:
        await ensure_settlement_schedule(
            client, task_queue=settings.task_queue, payments_task_queue=settings.payments_queue()
        )
    except RPCError as error:
        if error.status != RPCStatusCode.UNIMPLEMENTED:
            raise
        err_console.print(
            "[yellow]this Temporal server has no Schedules[/yellow]: the daily settlement "
            "sync and charge reconciliation will not run by themselves; run "
            "`billing payouts sync` instead"
        )


def _dispatcher_input(settings: Settings) -> DispatcherInput:
    from billing.delivery import DispatcherInput

    return DispatcherInput(
        task_queue=settings.delivery_queue(), interval_s=settings.delivery_poll_interval_s
    )


async def _ensure_dispatcher(settings: Settings, client: Client) -> DispatcherInput:
    from billing.worker import ensure_delivery_dispatcher

    dispatcher = _dispatcher_input(settings)
    await ensure_delivery_dispatcher(
        client, task_queue=dispatcher.task_queue, dispatcher=dispatcher
    )
    return dispatcher


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    return stop


def _worker_stop_event() -> asyncio.Event:
    """The worker's stop event: the first SIGINT or SIGTERM stops it within its graceful
    timeout; a second one ends the process at once (running activities are abandoned, and
    Temporal runs them again after their timeout)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            err_console.print("second stop signal: exiting now")
            sys.stderr.flush()
            os._exit(1)
        err_console.print("stopping: waiting for running activities ...")
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, on_signal)
    return stop


async def _run_dev(settings: Settings, *, demo: bool) -> None:
    from billing.worker import (
        build_dependencies,
        build_worker,
        connect_temporal,
        ensure_refund_sweeper,
        ensure_signup_sweeper,
        workflow_runner_for,
    )

    client = await connect_temporal(settings)
    deps = build_dependencies(settings)
    w = build_worker(
        client,
        deps,
        task_queue=settings.task_queue,
        workflow_runner=workflow_runner_for(settings),
        activity_threads=settings.activity_threads,
        max_cached_workflows=settings.worker_max_cached_workflows,
        payments_task_queue=settings.payments_queue(),
        max_concurrent_workflow_tasks=settings.worker_max_concurrent_workflow_tasks,
    )
    stop = _stop_event()
    async with (
        w,
        _payments_worker(settings, client, deps),
        _delivery_worker(settings, client, deps),
    ):
        await ensure_signup_sweeper(client, task_queue=settings.task_queue)
        await _ensure_dispatcher(settings, client)
        await ensure_refund_sweeper(client, task_queue=settings.task_queue)
        await _ensure_settlement_schedule(settings, client)
        console.print(f"[green]worker running[/green] on task queue {settings.task_queue!r}")
        api_ready = asyncio.Event()
        api_task = asyncio.create_task(
            _serve_api(settings, deps, client, stop=stop, ready=api_ready)
        )
        if demo:
            subscription_id = await _start_demo(settings, client, deps)
            view = await _query(client, subscription_id)
            _print_view(view)
        await asyncio.wait(
            [asyncio.ensure_future(api_ready.wait()), api_task],
            return_when=asyncio.FIRST_COMPLETED,
        )
        if api_task.done():
            await api_task  # the API could not start: say why
        if settings.stripe_api_key is None and settings.stripe_api_base:
            await asyncio.to_thread(_register_localstripe_webhook, settings)
        console.print("[green]API running[/green]. Ctrl-C to stop.")
        await stop.wait()
        await api_task


async def _start_demo(settings: Settings, client: Client, deps: object) -> str:
    from billing.signup import CustomerDetails, SignupRequest, SignupService
    from billing.worker import Dependencies

    assert isinstance(deps, Dependencies)
    existing = await asyncio.to_thread(_existing_demo, deps)
    if existing is not None:
        console.print(f"demo subscription resumed: [bold]{existing}[/bold]")
        return existing
    payment_method_id = await asyncio.to_thread(_demo_payment_method, settings)
    service = SignupService(
        deps.session_factory,
        deps.gateway,
        client,
        task_queue=settings.task_queue,
        payments_task_queue=settings.payments_queue(),
        clock=deps.clock,
    )
    result = await service.start_subscription(
        SignupRequest(
            plan_code="basic-monthly",
            customer=CustomerDetails(
                external_id="demo-customer",
                email="demo@example.com",
                name="Demo Customer",
                timezone="Europe/Paris",
            ),
            payment_method_id=payment_method_id,
            idempotency_key=DEMO_IDEMPOTENCY_KEY,
        )
    )
    verb = "started" if result.created else "resumed"
    console.print(f"demo subscription {verb}: [bold]{result.subscription_id}[/bold]")
    # The first invoice is charged at once; give the workflow a moment to settle it.
    for _ in range(50):
        view = await _query(client, result.subscription_id)
        if view.invoices_issued and view.open_invoice is None:
            break
        await asyncio.sleep(0.2)
    return result.subscription_id


def dev_api_keys(state_dir: Path) -> list[ApiKey]:
    """API keys for the local stack: made once per state folder and kept there, so a second
    `billing dev` accepts the same keys."""
    path = state_dir / "dev-api-keys.json"
    if path.exists():
        return [ApiKey.model_validate(k) for k in json.loads(path.read_text())]
    keys = [
        {"name": f"dev-{scope}", "scope": scope, "key": f"dev_{scope}_{secrets.token_urlsafe(24)}"}
        for scope in ("signup", "finance", "admin")
    ]
    path.write_text(json.dumps(keys, indent=2))
    path.chmod(0o600)
    return [ApiKey.model_validate(k) for k in keys]


def dev_webhook_secret(state_dir: Path) -> str:
    """The local stack's webhook signing secret, made once per state folder."""
    path = state_dir / "dev-webhook-secret"
    if not path.exists():
        path.write_text(f"whsec_dev_{secrets.token_urlsafe(24)}")
        path.chmod(0o600)
    return path.read_text().strip()


def _register_localstripe_webhook(settings: Settings) -> None:
    """Point localstripe's signed webhooks at our endpoint (re-registering replaces it)."""
    import httpx

    assert settings.stripe_api_base is not None and settings.stripe_webhook_secret is not None
    response = httpx.post(
        f"{settings.stripe_api_base}/_config/webhooks/billing-dev",
        data={
            "url": f"http://{settings.api_host}:{settings.api_port}/v1/webhooks/stripe",
            "secret": settings.stripe_webhook_secret.get_secret_value(),
        },
        timeout=10,
    )
    response.raise_for_status()


def _existing_demo(deps: object) -> str | None:
    """The demo subscription a previous `billing dev` started in this state folder."""
    from billing.worker import Dependencies
    from db.engine import unit_of_work
    from db.repositories import subscriptions as subscriptions_repo

    assert isinstance(deps, Dependencies)
    with unit_of_work(deps.session_factory) as session:
        record = subscriptions_repo.get_subscription_by_signup_key(session, DEMO_IDEMPOTENCY_KEY)
    return record.id if record is not None else None


def _demo_payment_method(settings: Settings) -> str | None:
    if settings.stripe_api_key is not None:
        return "pm_card_visa"  # real Stripe test mode token
    from activities.stripe_gateway import make_stripe_client
    from billing.testing.cards import SUCCEEDS, create_card_payment_method

    client = make_stripe_client(api_key=settings.stripe_secret(), api_base=settings.stripe_api_base)
    return create_card_payment_method(client, SUCCEEDS)


async def _query(client: Client, subscription_id: str) -> SubscriptionView:
    handle = client.get_workflow_handle(f"subscription-{subscription_id}")
    view: SubscriptionView = await handle.query(
        SubscriptionMessage.GET_STATE, result_type=SubscriptionView
    )
    return view


def _print_view(view: SubscriptionView) -> None:
    table = Table(title=f"subscription {view.subscription_id}", show_header=False)
    table.add_row("status", view.status.value)
    table.add_row("plan", f"{view.plan_code} ({view.amount_minor} {view.currency} minor units)")
    table.add_row(
        "current period", f"{_fmt(view.current_period_start)} → {_fmt(view.current_period_end)}"
    )
    table.add_row("next billing", _fmt(view.next_billing_at))
    table.add_row("invoices issued", str(view.invoices_issued))
    table.add_row("open invoice", view.open_invoice.number if view.open_invoice else "none")
    if view.attention_reason is not None:
        # Parked: say what failed and how to resume, where an operator looks first.
        # Text, not markup: the reason is the provider's or database's words, brackets and all.
        table.add_row("attention step", Text(view.attention_step or "-"))
        table.add_row("attention reason", Text(view.attention_reason))
        table.add_row("attention since", _fmt(view.attention_since))
    console.print(table)
    if view.attention_reason is not None:
        console.print(_resume_hint(view.subscription_id))


def _resume_hint(subscription_id: str) -> str:
    return (
        f"billing waits for an operator: fix the cause, then run "
        f"`billing subscriptions resume-billing {subscription_id} --reason '...'`"
    )


def _fmt(instant: datetime | None) -> str:
    return instant.astimezone(UTC).isoformat() if instant else "-"


def _safe_url(url: str) -> str:
    """The URL without its password, for printing."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


# ---- finance and support commands -----------------------------------------------------------

# `billing simulate SCENARIO`: years of billing in seconds on the time-skipping server.
app.command()(simulate)

invoices_app = typer.Typer(help="Invoices, as finance sees them.", no_args_is_help=True)
subscriptions_app = typer.Typer(help="Subscriptions: live state and changes.", no_args_is_help=True)
app.add_typer(invoices_app, name="invoices")
app.add_typer(subscriptions_app, name="subscriptions")
signups_app = typer.Typer(
    help="Signups: sweep the ones whose workflow never started.", no_args_is_help=True
)
app.add_typer(signups_app, name="signups")
app.add_typer(event_endpoints_app, name="event-endpoints")
# The revenue reports (billing/reports_cli.py).
app.add_typer(reports_app, name="reports")
plans_app = typer.Typer(help="The plan catalog.", no_args_is_help=True)
app.add_typer(plans_app, name="plans")
customers_app = typer.Typer(help="Customers, with card and credit balance.", no_args_is_help=True)
app.add_typer(customers_app, name="customers")


class TemporalUnreachable(Exception):
    """No Temporal server answered at the configured address."""


#: Waits between connection attempts at start-up: doubling from the first to the last.
CONNECT_BACKOFF_S = (1.0, 30.0)


async def _connect(
    settings: Settings,
    *,
    retry_for_s: float = 0.0,
    stop: asyncio.Event | None = None,
    runtime: Runtime | None = None,
) -> Client | None:
    """A client of the configured Temporal server. Unreachable: retried with backoff for up to
    ``retry_for_s`` seconds (each failure printed, so a wrong address shows at once), then
    TemporalUnreachable naming the address and the last error. None if ``stop`` is set while
    waiting (Ctrl-C during start-up)."""
    from billing.worker import connect_temporal

    loop = asyncio.get_running_loop()
    deadline = loop.time() + retry_for_s
    wait, longest = CONNECT_BACKOFF_S
    while True:
        try:
            return await connect_temporal(settings, runtime=runtime)
        except RuntimeError as error:
            # The SDK reports a failed connection as a RuntimeError ("Failed client connect").
            reason = str(error)
        left = deadline - loop.time()
        if left <= 0:
            raise TemporalUnreachable(
                f"no Temporal server at {settings.temporal_address} "
                f"(BILLING_TEMPORAL_ADDRESS): {reason}"
            )
        pause = min(wait, left)
        err_console.print(
            f"[yellow]Temporal at {settings.temporal_address} is not reachable; retrying in "
            f"{pause:g} s[/yellow] ({reason})"
        )
        if stop is None:
            await asyncio.sleep(pause)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)
            if stop.is_set():
                return None
        wait = min(wait * 2, longest)


async def _connect_or_fail(settings: Settings) -> Client:
    """A client for a one-off command: no retries; a clear error instead of a traceback."""
    try:
        client = await _connect(settings)
    except TemporalUnreachable as error:
        _fail(str(error), code=1)
    assert client is not None
    return client


def _check_id(value: str, argument: str) -> None:
    """Our id as a command-line argument, under the API's text rule (exit 2 if it is not)."""
    from billing.errors import InvalidInput
    from billing.text import OUR_ID

    try:
        OUR_ID.check(value, field=argument)
    except InvalidInput as invalid:
        _fail(invalid.message)


def _fail(message: str, code: int = 2) -> NoReturn:
    err_console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def _session_factory(settings: Settings) -> sessionmaker[Session]:
    from db.engine import make_engine, make_session_factory

    return make_session_factory(make_engine(settings.database_url))


@invoices_app.command("list")
def invoices_list(
    status: list[str] = typer.Option(
        [], "--status", help="draft, open, paid, void, uncollectible; repeatable"
    ),
    customer_id: str | None = typer.Option(None, "--customer-id"),
    subscription_id: str | None = typer.Option(None, "--subscription-id"),
    currency: str | None = typer.Option(None, "--currency"),
    issued_from: str | None = typer.Option(None, "--issued-from", help="ISO 8601 with a zone"),
    issued_to: str | None = typer.Option(None, "--issued-to"),
    period_from: str | None = typer.Option(None, "--period-from"),
    period_to: str | None = typer.Option(None, "--period-to"),
    limit: int = typer.Option(50, "--limit", help="rows per page (1-200); ignored with --csv"),
    cursor: str | None = typer.Option(None, "--cursor", help="next_cursor of the previous page"),
    csv_output: bool = typer.Option(False, "--csv", help="every matching invoice as CSV on stdout"),
    lines: bool = typer.Option(
        False, "--lines", help="with --csv: one row per invoice line (GET /v1/invoice-lines.csv)"
    ),
) -> None:
    """List invoices with the same filters as GET /v1/invoices."""
    from billing.errors import BillingError
    from billing.finance import (
        INVOICE_CSV_COLUMNS,
        INVOICE_LINE_CSV_COLUMNS,
        InvoiceCursor,
        InvoiceFilter,
        amount_display,
        format_instant,
        invoice_csv_row,
        invoice_line_csv_rows,
    )
    from db.engine import unit_of_work
    from db.repositories import finance

    settings = Settings()
    try:
        invoice_filter = InvoiceFilter.parse(
            statuses=status,
            customer_id=customer_id,
            subscription_id=subscription_id,
            currency=currency,
            issued_from=issued_from,
            issued_to=issued_to,
            period_from=period_from,
            period_to=period_to,
        )
        after = InvoiceCursor.decode(cursor) if cursor else None
        factory = _session_factory(settings)
        if lines and not csv_output:
            _fail("--lines goes with --csv (the table shows one row per invoice)")
        if csv_output:
            writer = csv.writer(sys.stdout, lineterminator="\n")
            if lines:
                writer.writerow(INVOICE_LINE_CSV_COLUMNS)
                for item in finance.iter_invoices(factory, invoice_filter, with_lines=True):
                    writer.writerows(invoice_line_csv_rows(item))
                return
            writer.writerow(INVOICE_CSV_COLUMNS)
            for item in finance.iter_invoices(factory, invoice_filter):
                writer.writerow(invoice_csv_row(item))
            return
        with unit_of_work(factory) as session:
            page = finance.list_invoices(session, invoice_filter, limit=limit, after=after)
    except BillingError as error:
        _fail(error.message)
    table = Table(title="invoices")
    for column in ("number", "status", "period start", "period end", "amount due", "paid", "id"):
        table.add_column(column)
    for item in page.items:
        i = item.invoice
        table.add_row(
            i.number,
            i.status.value,
            format_instant(i.period_start),
            format_instant(i.period_end),
            f"{i.amount_due_minor} {i.currency} ({amount_display(i.amount_due_minor, i.currency)})",
            str(i.amount_paid_minor),
            i.id,
        )
    console.print(table)
    if page.has_more:
        console.print(f"more: --cursor {page.next_cursor}")


@invoices_app.command("show")
def invoices_show(invoice_id: str) -> None:
    """One invoice with its payment attempts and payments."""
    from billing.finance import format_instant

    _check_id(invoice_id, "INVOICE_ID")
    from db.engine import unit_of_work
    from db.repositories import finance

    with unit_of_work(_session_factory(Settings())) as session:
        detail = finance.get_invoice_detail(session, invoice_id)
    if detail is None:
        _fail(f"invoice {invoice_id!r} not found", code=1)
    i = detail.invoice
    head = Table(title=f"invoice {i.number}", show_header=False)
    for label, value in (
        ("id", i.id),
        ("status", i.status.value),
        ("customer", i.customer_id),
        ("subscription", i.subscription_id),
        ("period", f"{format_instant(i.period_start)} → {format_instant(i.period_end)}"),
        ("amount due", f"{i.amount_due_minor} {i.currency} (minor units)"),
        ("amount paid", f"{i.amount_paid_minor} {i.currency}"),
        ("created", format_instant(i.created_at)),
        ("paid", format_instant(i.paid_at)),
    ):
        head.add_row(label, value)
    console.print(head)
    attempts = Table(title="payment attempts")
    for column in ("#", "status", "outcome", "decline code", "payment intent", "at"):
        attempts.add_column(column)
    for a in detail.attempts:
        attempts.add_row(
            str(a.attempt_number),
            a.status.value,
            a.outcome.value if a.outcome else "",
            a.decline_code or "",
            a.stripe_payment_intent_id or "",
            format_instant(a.created_at),
        )
    console.print(attempts)
    payments = Table(title="payments")
    for column in ("payment", "amount", "fee", "net", "charge", "settled"):
        payments.add_column(column)
    for p in detail.payments:
        payments.add_row(
            p.id,
            f"{p.amount_minor} {p.currency}",
            "" if p.fee_minor is None else f"{p.fee_minor} {p.settlement_currency or ''}",
            "" if p.net_minor is None else f"{p.net_minor} {p.settlement_currency or ''}",
            p.stripe_charge_id or "",
            format_instant(p.settled_at),
        )
    console.print(payments)


@subscriptions_app.command("show")
def subscriptions_show(subscription_id: str) -> None:
    """The subscription's live state from its workflow (the database if it is unreachable)."""
    _check_id(subscription_id, "SUBSCRIPTION_ID")
    settings = Settings()

    async def run() -> SubscriptionView | None:
        try:
            client = await _connect(settings)
        except TemporalUnreachable:
            return None  # the database below still knows the subscription
        assert client is not None
        try:
            return await _query(client, subscription_id)
        except RPCError:
            return None

    view = asyncio.run(run())
    if view is not None:
        _print_view(view)
        return
    from billing.api.schemas import AttentionOut, parked_since
    from db.engine import unit_of_work
    from db.repositories import subscriptions as subscriptions_repo

    with unit_of_work(_session_factory(settings)) as session:
        record = subscriptions_repo.get_subscription(session, subscription_id)
        history = subscriptions_repo.list_status_changes(session, subscription_id) if record else []
    if record is None:
        _fail(f"subscription {subscription_id!r} not found", code=1)
    console.print(f"{record.id}: {record.status.value} (from the database; workflow unreachable)")
    attention = AttentionOut.of_record(record, parked_since(history))
    if attention is not None:
        console.print(f"attention step: {attention.step or '-'}", markup=False, highlight=False)
        console.print(f"attention reason: {attention.reason}", markup=False, highlight=False)
        console.print(f"attention since: {_fmt(attention.since)}")
        console.print(_resume_hint(record.id))


@subscriptions_app.command("list")
def subscriptions_list(
    status: str | None = typer.Option(
        None, "--status", help="only this status, e.g. needs_attention (parked for an operator)"
    ),
    customer_id: str | None = typer.Option(None, "--customer-id", help="only this customer's"),
    plan: str | None = typer.Option(None, "--plan", help="only those on this plan code"),
    limit: int = typer.Option(50, "--limit", help="rows per page (1-200)"),
    cursor: str | None = typer.Option(None, "--cursor", help="the id printed after 'more:'"),
) -> None:
    """Subscriptions from the database, with what parked each one in needs_attention."""
    from billing.api.schemas import AttentionOut
    from billing.subscription import SubscriptionStatus
    from db.engine import unit_of_work
    from db.repositories import subscriptions as subscriptions_repo

    wanted: SubscriptionStatus | None = None
    if status is not None:
        try:
            wanted = SubscriptionStatus(status)
        except ValueError:
            known = ", ".join(s.value for s in SubscriptionStatus)
            _fail(f"unknown status {status!r}; known: {known}")
    if not 1 <= limit <= 200:
        _fail(f"--limit must be from 1 to 200 (got {limit})")
    with unit_of_work(_session_factory(Settings())) as session:
        records = subscriptions_repo.list_subscriptions(
            session,
            status=wanted,
            limit=limit + 1,
            after_id=cursor,
            customer_id=customer_id,
            plan_code=plan,
        )
        page = records[:limit]
        parked = subscriptions_repo.parked_at(
            session, [r.id for r in page if r.status == SubscriptionStatus.NEEDS_ATTENTION]
        )
    table = Table(title="subscriptions")
    # Ids never wrap: they stay copyable at 80 columns (the other columns fold).
    table.add_column("id", no_wrap=True, min_width=30)
    for column in ("status", "plan", "next billing", "attention since", "step", "reason"):
        table.add_column(column, overflow="fold")
    for record in page:
        attention = AttentionOut.of_record(record, parked.get(record.id))
        table.add_row(
            record.id,
            record.status.value,
            record.plan_code,
            _fmt(record.next_billing_at),
            _fmt(attention.since) if attention else "",
            Text(attention.step or "-") if attention else "",
            Text(attention.reason) if attention else "",
        )
    console.print(table)
    if len(records) > limit:
        console.print(f"more: --cursor {page[-1].id}")


@subscriptions_app.command("cancel")
def subscriptions_cancel(
    subscription_id: str,
    now: bool = typer.Option(False, "--now", help="cancel immediately and void an open invoice"),
    reason: str = typer.Option("", "--reason"),
) -> None:
    """Cancel at the end of the paid period (default) or immediately (--now)."""
    from billing.contracts import CancelInput, CancelResult
    from billing.errors import InvalidInput

    _check_id(subscription_id, "SUBSCRIPTION_ID")
    cancel = CancelInput(at_period_end=not now, reason=reason)
    try:
        # The same rule as the API and the workflow's validator, before anything is sent:
        # an argument with undecodable bytes arrives here as lone surrogates.
        cancel.check()
    except InvalidInput as invalid:
        where = "--reason" if invalid.field == "reason" else invalid.field
        _fail(f"{where}: {invalid.message}")
    settings = Settings()

    async def run() -> CancelResult:
        client = await _connect_or_fail(settings)
        handle = client.get_workflow_handle(f"subscription-{subscription_id}")
        result: CancelResult = await handle.execute_update(
            SubscriptionMessage.CANCEL, cancel, result_type=CancelResult
        )
        return result

    try:
        result = asyncio.run(run())
    except WorkflowUpdateFailedError as error:
        cause = error.cause
        _fail(getattr(cause, "message", None) or str(cause or error), code=1)
    except RPCError as error:
        _fail(f"subscription {subscription_id!r} cannot be changed: {error.message}", code=1)
    when = _fmt(result.ends_at)
    if result.cancel_at_period_end and result.status != "canceled":
        console.print(f"subscription {subscription_id} will end at {when}")
    else:
        voided = f"; voided invoice {result.voided_invoice_id}" if result.voided_invoice_id else ""
        console.print(f"subscription {subscription_id} canceled at {when}{voided}")


@signups_app.command("sweep")
def signups_sweep(
    grace_seconds: int = typer.Option(
        120,
        "--grace-seconds",
        min=0,
        help="leave signups younger than this alone (they may still be starting)",
    ),
) -> None:
    """Start the workflow of every signup still pending after the grace period, or clean up
    one that can never start (with the card it attached). The worker runs the same sweep
    every minute; this runs it once, now. Running it twice is harmless."""
    from datetime import timedelta

    from billing.signup import SignupService
    from billing.worker import build_dependencies

    settings = Settings()
    deps = build_dependencies(settings)

    async def run() -> SweepReport:
        client = await _connect_or_fail(settings)
        signups = SignupService(
            deps.session_factory,
            deps.gateway,
            client,
            task_queue=settings.task_queue,
            payments_task_queue=settings.payments_queue(),
            clock=deps.clock,
        )
        return await signups.sweep_pending(older_than=timedelta(seconds=grace_seconds))

    report = asyncio.run(run())
    for subscription_id in report.started:
        console.print(f"started   {subscription_id}")
    for subscription_id in report.cleaned_up:
        console.print(f"cleaned   {subscription_id} (could never start; its card was detached)")
    for subscription_id, reason in report.failed:
        err_console.print(f"[yellow]left[/yellow]      {subscription_id}: {reason}")
    console.print(
        f"pending signups: {len(report.started)} started, {len(report.cleaned_up)} cleaned up, "
        f"{len(report.failed)} left for the next sweep"
    )
    if report.failed:
        raise typer.Exit(1)


@subscriptions_app.command("resume-billing")
def subscriptions_resume_billing(
    subscription_id: str,
    reason: str = typer.Option(
        "", "--reason", help="what was fixed, for the audit log (e.g. a ticket number)"
    ),
) -> None:
    """Resume a subscription parked in needs_attention, once its cause is fixed: it returns
    to its previous status and the failed step runs again."""
    from billing.contracts import ResumeBillingInput, ResumeBillingResult

    settings = Settings()

    async def run() -> ResumeBillingResult:
        client = await _connect_or_fail(settings)
        handle = client.get_workflow_handle(f"subscription-{subscription_id}")
        result: ResumeBillingResult = await handle.execute_update(
            SubscriptionMessage.RESUME_BILLING,
            ResumeBillingInput(reason=reason),
            result_type=ResumeBillingResult,
        )
        return result

    try:
        result = asyncio.run(run())
    except WorkflowUpdateFailedError as error:
        cause = error.cause
        _fail(getattr(cause, "message", None) or str(cause or error), code=1)
    except RPCError as error:
        _fail(f"subscription {subscription_id!r} cannot be changed: {error.message}", code=1)
    console.print(
        f"subscription {subscription_id} is {result.status.value} again; "
        f"running again: {result.resumed_step}",
        markup=False,
        highlight=False,
    )


# ---- plans ---------------------------------------------------------------------------------


def _read_plans_file(path: Path) -> list[dict[str, object]]:
    """One plan object, a list of them, or ``{"plans": [...]}``, in YAML or JSON."""
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        _fail(f"cannot read {path}: {error.strerror}")
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        _fail(f"{path} is not valid YAML or JSON: {error}")
    if isinstance(loaded, dict) and set(loaded) == {"plans"}:
        loaded = loaded["plans"]
    if isinstance(loaded, dict):
        loaded = [loaded]
    if not isinstance(loaded, list) or not all(isinstance(p, dict) for p in loaded):
        _fail(f"{path} must hold a plan object, a list of plans, or {{plans: [...]}}")
    return loaded


def _plan_table(entries: list[object], title: str) -> Table:
    from billing.finance import amount_display
    from billing.records import CatalogPlan

    table = Table(title=title)
    table.add_column("code", no_wrap=True)
    for column in ("name", "price", "every", "trial", "status"):
        table.add_column(column, overflow="fold")
    for entry in entries:
        assert isinstance(entry, CatalogPlan)
        p = entry.plan
        table.add_row(
            p.code,
            Text(p.name),
            f"{p.amount_minor} {p.currency} ({amount_display(p.amount_minor, p.currency)})",
            f"{p.interval_count} {p.interval.value}",
            f"{p.trial_days} d" if p.trial_days else "",
            "active" if entry.active else "archived",
        )
    return table


@plans_app.command("create")
def plans_create(file: Path = typer.Argument(..., help="YAML or JSON: one plan or a list")) -> None:
    """Create plans from FILE. All or nothing: one bad plan writes none. A plan already in
    the catalog with the same terms is left as it is; other terms under its code are refused
    (prices are immutable: a new price is a new code)."""
    from billing import catalog
    from billing.errors import BillingError

    raws = _read_plans_file(file)
    try:
        created = catalog.create_plans(_session_factory(Settings()), raws)
    except BillingError as error:
        _fail(error.message)
    for item in created:
        word = "created  " if item.created else "unchanged"
        console.print(f"{word} {item.entry.plan.code}", markup=False, highlight=False)


@plans_app.command("list")
def plans_list(
    archived: bool | None = typer.Option(
        None, "--archived/--active", help="only archived, or only active, plans"
    ),
) -> None:
    """Every plan in the catalog."""
    from billing import catalog

    entries = catalog.list_plans(
        _session_factory(Settings()), active=None if archived is None else not archived
    )
    console.print(_plan_table(list(entries), "plans"))


@plans_app.command("archive")
def plans_archive(code: str) -> None:
    """Close a plan to new signups and changes; its subscribers keep billing."""
    from billing import catalog
    from billing.errors import BillingError

    try:
        entry = catalog.archive_plan(_session_factory(Settings()), code)
    except BillingError as error:
        _fail(error.message, code=1)
    console.print(f"plan {entry.plan.code} archived", markup=False, highlight=False)


# ---- subscription changes --------------------------------------------------------------------


def _run_update(subscription_id: str, name: str, arg: object, result_type: type) -> object:
    """Run a workflow Update; a refusal exits 1 with the workflow's reason."""
    settings = Settings()

    async def run() -> object:
        client = await _connect_or_fail(settings)
        handle = client.get_workflow_handle(f"subscription-{subscription_id}")
        return await handle.execute_update(name, arg, result_type=result_type)

    try:
        return asyncio.run(run())
    except WorkflowUpdateFailedError as error:
        cause = error.cause
        _fail(getattr(cause, "message", None) or str(cause or error), code=1)
    except RPCError as error:
        _fail(f"subscription {subscription_id!r} cannot be changed: {error.message}", code=1)


def _checked(arg: object) -> None:
    from billing.errors import InvalidInput

    try:
        arg.check()  # type: ignore[attr-defined]
    except InvalidInput as invalid:
        _fail(f"{invalid.field or 'input'}: {invalid.message}")


@subscriptions_app.command("pause")
def subscriptions_pause(subscription_id: str, reason: str = typer.Option("", "--reason")) -> None:
    """Pause billing (no invoices until resumed)."""
    from billing.contracts import PauseInput, PauseResult

    _check_id(subscription_id, "SUBSCRIPTION_ID")
    arg = PauseInput(reason)
    _checked(arg)
    result = _run_update(subscription_id, SubscriptionMessage.PAUSE, arg, PauseResult)
    assert isinstance(result, PauseResult)
    console.print(f"subscription {subscription_id} paused at {_fmt(result.paused_at)}")


@subscriptions_app.command("resume")
def subscriptions_resume(subscription_id: str, reason: str = typer.Option("", "--reason")) -> None:
    """Resume a paused subscription; it bills from the anchor's next date."""
    from billing.contracts import ResumeInput, ResumeResult

    _check_id(subscription_id, "SUBSCRIPTION_ID")
    arg = ResumeInput(reason)
    _checked(arg)
    result = _run_update(subscription_id, SubscriptionMessage.RESUME, arg, ResumeResult)
    assert isinstance(result, ResumeResult)
    console.print(
        f"subscription {subscription_id} is {result.status.value}; "
        f"next billing {_fmt(result.next_billing_at)}"
    )


@subscriptions_app.command("update-card")
def subscriptions_update_card(subscription_id: str, payment_method_id: str) -> None:
    """Attach PAYMENT_METHOD_ID ('pm_...') as the customer's card; an open invoice is retried."""
    from billing.contracts import UpdatePaymentMethodInput, UpdatePaymentMethodResult

    _check_id(subscription_id, "SUBSCRIPTION_ID")
    arg = UpdatePaymentMethodInput(payment_method_id=payment_method_id)
    _checked(arg)
    result = _run_update(
        subscription_id, SubscriptionMessage.UPDATE_PAYMENT_METHOD, arg, UpdatePaymentMethodResult
    )
    assert isinstance(result, UpdatePaymentMethodResult)
    card = " ".join(x for x in (result.card_brand, result.card_last4) if x)
    retry = "; the open invoice is retried now" if result.retry_scheduled else ""
    console.print(
        f"subscription {subscription_id}: card {result.payment_method_id} {card}{retry}",
        markup=False,
        highlight=False,
    )


@subscriptions_app.command("change-plan")
def subscriptions_change_plan(
    subscription_id: str,
    plan: str | None = typer.Option(None, "--plan", help="the new plan's code"),
    quantity: int | None = typer.Option(None, "--quantity", help="the new number of seats"),
    effective: str | None = typer.Option(
        None, "--effective", help="now or period_end (default: now for an upgrade)"
    ),
    proration: str | None = typer.Option(
        None, "--proration", help="always_invoice (default), create_prorations or none"
    ),
    preview: bool = typer.Option(
        False, "--preview", help="show the lines, priced at the service's time; change nothing"
    ),
) -> None:
    """Change the plan and/or the seats (see the README's proration rules)."""
    from billing.contracts import ChangePlanInput, ChangePlanResult, ChangePreview
    from billing.errors import BillingError, PlanArchived, UnknownPlan
    from billing.proration import ProrationLine
    from db.engine import unit_of_work
    from db.repositories import plans as plans_repo

    _check_id(subscription_id, "SUBSCRIPTION_ID")
    settings = Settings()
    new_plan = None
    try:
        if plan is not None:
            with unit_of_work(_session_factory(settings)) as session:
                entry = plans_repo.get_catalog_plan(session, plan)
            if entry is None:
                raise UnknownPlan(f"unknown plan {plan!r}; see `billing plans list`")
            if not entry.active:
                raise PlanArchived(f"plan {plan!r} is archived")
            new_plan = entry.plan
    except BillingError as error:
        _fail(error.message)
    arg = ChangePlanInput(
        plan=new_plan, quantity=quantity, effective=effective, proration=proration
    )
    _checked(arg)

    def show(lines: list[ProrationLine]) -> None:
        table = Table(title="lines")
        for column in ("description", "amount", "from", "to"):
            table.add_column(column, overflow="fold")
        for line in lines:
            table.add_row(
                Text(line.description),
                str(line.amount_minor),
                _fmt(line.period_start),
                _fmt(line.period_end),
            )
        console.print(table)

    if preview:

        async def ask() -> ChangePreview:
            # Priced by the workflow at its own time (the service's clock, which a simulation
            # or a time-skipping server moves), never at this machine's clock: the lines are
            # those the change would bill now.
            client = await _connect_or_fail(settings)
            handle = client.get_workflow_handle(f"subscription-{subscription_id}")
            answer: ChangePreview = await handle.execute_update(
                SubscriptionMessage.PREVIEW_CHANGE_NOW, arg, result_type=ChangePreview
            )
            return answer

        try:
            shown = asyncio.run(ask())
        except WorkflowUpdateFailedError as error:
            cause = error.cause
            _fail(getattr(cause, "message", None) or str(cause or error), code=1)
        except RPCError as error:
            _fail(f"subscription {subscription_id!r}: {error.message}", code=1)
        if shown.refused:
            _fail(shown.refused, code=1)
        show(shown.lines)
        console.print(
            f"{shown.effective} ({_fmt(shown.effective_at)}): {shown.plan_code} x "
            f"{shown.quantity}; subtotal {shown.subtotal_minor} {shown.currency}",
            markup=False,
            highlight=False,
        )
        return
    result = _run_update(subscription_id, SubscriptionMessage.CHANGE_PLAN, arg, ChangePlanResult)
    assert isinstance(result, ChangePlanResult)
    if result.pending:
        console.print(
            f"subscription {subscription_id}: {result.plan_code} x {result.quantity} from "
            f"{_fmt(result.effective_at)} (pending; change {result.change_id})",
            markup=False,
            highlight=False,
        )
        return
    show(result.lines)
    invoice = (
        f"; invoice {result.invoice_id} ({result.invoice_status}, {result.amount_due_minor} due)"
        if result.invoice_id
        else ""
    )
    console.print(
        f"subscription {subscription_id}: now {result.plan_code} x {result.quantity}{invoice}",
        markup=False,
        highlight=False,
    )


# ---- customers -------------------------------------------------------------------------------


@customers_app.command("list")
def customers_list(
    limit: int = typer.Option(50, "--limit", help="rows per page (1-200)"),
    cursor: str | None = typer.Option(None, "--cursor", help="the id printed after 'more:'"),
) -> None:
    """Customers by id."""
    from db.engine import unit_of_work
    from db.repositories import customers as customers_repo

    if not 1 <= limit <= 200:
        _fail(f"--limit must be from 1 to 200 (got {limit})")
    if cursor is not None:
        _check_id(cursor, "--cursor")
    with unit_of_work(_session_factory(Settings())) as session:
        records = customers_repo.list_customers(session, limit=limit + 1, after_id=cursor)
    page = records[:limit]
    table = Table(title="customers")
    table.add_column("id", no_wrap=True, min_width=30)
    for column in ("external id", "email", "zone"):
        table.add_column(column, overflow="fold")
    for c in page:
        table.add_row(c.id, Text(c.external_id or ""), Text(c.email or ""), c.timezone)
    console.print(table)
    if len(records) > limit:
        console.print(f"more: --cursor {page[-1].id}")


@customers_app.command("show")
def customers_show(customer_id: str) -> None:
    """A customer: card on file, credit balance, subscriptions."""
    from billing.finance import amount_display
    from db.engine import unit_of_work
    from db.repositories import balances as balances_repo
    from db.repositories import customers as customers_repo
    from db.repositories import subscriptions as subscriptions_repo

    _check_id(customer_id, "CUSTOMER_ID")
    with unit_of_work(_session_factory(Settings())) as session:
        customer = customers_repo.get_customer(session, customer_id)
        if customer is None:
            _fail(f"customer {customer_id!r} not found", code=1)
        subscriptions = subscriptions_repo.list_subscriptions_for_customer(session, customer_id)
        balances = balances_repo.credit_balances(session, customer_id)
    head = Table(title=f"customer {customer.id}", show_header=False)
    card = " ".join(x for x in (customer.default_card_brand, customer.default_card_last4) if x) or (
        "on file" if customer.default_payment_method_id else "none"
    )
    credit = ", ".join(
        f"{amount} {currency} ({amount_display(amount, currency)})"
        for currency, amount in balances.items()
    )
    for label, value in (
        ("external id", customer.external_id or ""),
        ("email", customer.email or ""),
        ("zone", customer.timezone),
        ("card", card),
        ("credit balance", credit or "0"),
    ):
        head.add_row(label, Text(value))
    console.print(head)
    table = Table(title="subscriptions")
    table.add_column("id", no_wrap=True, min_width=30)
    for column in ("status", "plan", "seats", "next billing"):
        table.add_column(column, overflow="fold")
    for sub in subscriptions:
        table.add_row(
            sub.id, sub.status.value, sub.plan_code, str(sub.quantity), _fmt(sub.next_billing_at)
        )
    console.print(table)


# Settlement commands (issue 13), in their own module.
from billing.cli_settlement import (  # noqa: E402
    credit_notes_app,
    payouts_app,
    reconciliation_app,
)

app.add_typer(credit_notes_app, name="credit-notes")
app.add_typer(payouts_app, name="payouts")
app.add_typer(reconciliation_app, name="reconciliation")


def main() -> None:
    """Run the command, then end the process without the interpreter's finalization.

    The Temporal SDK's Rust runtime keeps threads that can call into Python while CPython
    finalizes, which aborts the process (SIGABRT, "PyGILState_Release: thread state ... must be
    current when releasing"; temporalio/sdk-python#300), rarely, after a command or a worker
    that had already finished cleanly (seen once in CI: a worker stopped by SIGTERM exited -6).
    Everything a command owns is closed before it returns (servers stopped, engines disposed,
    child processes ended in ``finally`` blocks), so what is left is flushed and the process
    exits with the command's own code."""
    code: int
    try:
        app()
        code = 0
    except SystemExit as done:
        if done.code is None or isinstance(done.code, int):
            code = done.code or 0
        else:
            print(done.code, file=sys.stderr)
            code = 1
    _exit_now(code)


def _exit_now(code: int) -> NoReturn:
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    main()
