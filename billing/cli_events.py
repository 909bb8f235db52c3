"""``billing event-endpoints``: register, list, enable and disable the business's event
endpoints from the command line (the same rules as ``/v1/event-endpoints``)."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy.orm import Session, sessionmaker

from billing.settings import Settings

event_endpoints_app = typer.Typer(help="Endpoints that receive events (webhooks we send).")
console = Console()
err_console = Console(stderr=True)


def _fail(message: str, code: int = 2) -> NoReturn:
    err_console.print(f"[red]error:[/red] {message}", markup=True, highlight=False)
    raise typer.Exit(code)


def _session_factory(settings: Settings) -> sessionmaker[Session]:
    from db.engine import make_engine, make_session_factory

    return make_session_factory(make_engine(settings.database_url))


@event_endpoints_app.command("add")
def add(
    url: str = typer.Argument(..., help="https:// URL (http only with BILLING_ENVIRONMENT=dev)"),
    event: list[str] = typer.Option(
        ["*"], "--event", help="event type to send (repeatable); '*' for all"
    ),
    description: str | None = typer.Option(None, "--description"),
    contact_email: str | None = typer.Option(
        None,
        "--contact-email",
        help="told by e-mail if it is disabled after failing for 3 days "
        "(default: BILLING_EVENTS_CONTACT_EMAIL)",
    ),
) -> None:
    """Register an endpoint; prints its signing secret, which is shown only this once."""
    from billing.clock import SystemClock
    from billing.errors import BillingError
    from billing.event_endpoints import register_endpoint

    settings = Settings()
    try:
        endpoint = register_endpoint(
            _session_factory(settings),
            SystemClock(),
            url=url,
            event_types=event,
            description=description,
            allow_insecure=settings.endpoints_allow_insecure(),
            contact_email=contact_email,
        )
    except BillingError as error:
        _fail(error.message)
    console.print(f"endpoint {endpoint.id} for {endpoint.url}", markup=False, highlight=False)
    console.print(f"events: {', '.join(endpoint.event_types)}", markup=False)
    console.print(
        f"signing secret (shown once, store it now): {endpoint.secret}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


@event_endpoints_app.command("list")
def list_endpoints() -> None:
    """Every endpoint (secrets are never shown again)."""
    from db.engine import unit_of_work
    from db.repositories import events as events_repo

    settings = Settings()
    with unit_of_work(_session_factory(settings)) as session:
        endpoints = events_repo.list_endpoints(session)
    table = Table("id", "url", "events", "enabled", "disabled because")
    for e in endpoints:
        table.add_row(
            e.id,
            e.url,
            ", ".join(e.event_types),
            "yes" if e.enabled else "no",
            e.disabled_reason or "",
        )
    console.print(table)


def _set_enabled(endpoint_id: str, enabled: bool) -> None:
    from billing.clock import SystemClock
    from billing.errors import BillingError
    from billing.event_endpoints import set_endpoint_enabled
    from billing.text import OUR_ID

    settings = Settings()
    try:
        OUR_ID.check(endpoint_id, field="ENDPOINT_ID")
        endpoint = set_endpoint_enabled(
            _session_factory(settings), SystemClock(), endpoint_id, enabled=enabled
        )
    except BillingError as error:
        _fail(error.message)
    state = "enabled" if endpoint.enabled else "disabled"
    console.print(f"endpoint {endpoint.id} {state}", markup=False, highlight=False)


@event_endpoints_app.command("enable")
def enable(endpoint_id: str) -> None:
    """Enable an endpoint; its pending deliveries resume in order."""
    _set_enabled(endpoint_id, True)


@event_endpoints_app.command("disable")
def disable(endpoint_id: str) -> None:
    """Disable an endpoint; nothing is sent to it until it is enabled again."""
    _set_enabled(endpoint_id, False)
