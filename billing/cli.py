"""The `billing` command line."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from datetime import UTC, datetime

import typer
from rich.console import Console
from rich.table import Table
from temporalio.client import Client

from billing.contracts import SubscriptionMessage, SubscriptionView
from billing.settings import Settings

app = typer.Typer(help="Recurring billing on Temporal.", no_args_is_help=True)
console = Console()

DEMO_IDEMPOTENCY_KEY = "billing-dev-demo-subscription"


@app.command()
def migrate() -> None:
    """Migrate the configured database to the latest schema."""
    from db.migrate import upgrade

    settings = Settings()
    upgrade(settings.database_url)
    console.print(f"[green]database migrated[/green] ({_safe_url(settings.database_url)})")


@app.command()
def worker() -> None:
    """Run a worker against the configured Temporal server and database."""
    settings = Settings()
    settings.check_production_secrets()
    asyncio.run(_run_worker(settings))


@app.command()
def dev(
    demo: bool = typer.Option(True, help="Start (or resume) a demo subscription."),
) -> None:
    """The embedded local stack in one command: Temporal dev server (persistent), localstripe,
    SQLite with demo plans, the worker and a demo subscription. Ctrl-C stops everything."""
    from billing.devstack import localstripe_server, migrate_and_seed, temporal_dev_server

    settings = Settings()
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        console.print("starting Temporal dev server ...")
        stack.enter_context(temporal_dev_server(settings))
        stripe_url = stack.enter_context(localstripe_server(settings))
        if stripe_url is not None:
            settings = settings.model_copy(update={"stripe_api_base": stripe_url})
        migrate_and_seed(settings)
        table = Table(title="billing dev", show_header=False)
        table.add_row("Temporal", settings.temporal_address)
        table.add_row("Temporal UI", f"http://127.0.0.1:{settings.temporal_ui_port}")
        table.add_row("Stripe", stripe_url or "api.stripe.com (configured key)")
        table.add_row("Database", _safe_url(settings.database_url))
        table.add_row("State folder", str(settings.state_dir.resolve()))
        console.print(table)
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_run_dev(settings, demo=demo))
        console.print("stopping ...")
    console.print("[green]stopped cleanly[/green]")


async def _run_worker(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    from billing.worker import build_dependencies, build_worker

    client = await Client.connect(settings.temporal_address, namespace=settings.temporal_namespace)
    deps = build_dependencies(settings)
    w = build_worker(
        client, deps, task_queue=settings.task_queue, activity_threads=settings.activity_threads
    )
    stop = stop or _stop_event()
    async with w:
        console.print(f"[green]worker running[/green] on task queue {settings.task_queue!r}")
        await stop.wait()


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    return stop


async def _run_dev(settings: Settings, *, demo: bool) -> None:
    from billing.worker import build_dependencies, build_worker

    client = await Client.connect(settings.temporal_address, namespace=settings.temporal_namespace)
    deps = build_dependencies(settings)
    w = build_worker(
        client, deps, task_queue=settings.task_queue, activity_threads=settings.activity_threads
    )
    stop = _stop_event()
    async with w:
        console.print(f"[green]worker running[/green] on task queue {settings.task_queue!r}")
        if demo:
            subscription_id = await _start_demo(settings, client, deps)
            view = await _query(client, subscription_id)
            _print_view(view)
        console.print("Ctrl-C to stop.")
        await stop.wait()


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
    console.print(table)


def _fmt(instant: datetime | None) -> str:
    return instant.astimezone(UTC).isoformat() if instant else "-"


def _safe_url(url: str) -> str:
    """The URL without its password, for printing."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
