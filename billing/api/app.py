"""The HTTP API's app factory.

``create_app`` wires the routers, the error shape, the body-size limit and API-key auth onto
the given dependencies, so the same factory serves production (``billing api``), the dev
stack and tests (a time-skipping harness). OpenAPI docs are at ``/docs``: Swagger UI from
files shipped in the package (``fastapi-offline``'s copy of swagger-ui-dist), so it works
without the internet. Operations: ``/healthz``, ``/readyz``, ``/metrics``. Finance:
``/v1/reports/...`` and the web dashboard at ``/dashboard``.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles
from temporalio.client import Client

from billing.api import (
    access_log,
    credit_notes,
    customers,
    documents,
    events,
    health,
    invoices,
    metrics,
    payouts,
    plans,
    reports,
    subscriptions,
)
from billing.api.auth import KeyRing
from billing.api.errors import install_error_handlers
from billing.api.webhooks import WEBHOOK_MAX_BODY_BYTES, WEBHOOK_PATH
from billing.clock import Clock
from billing.dashboard import app as dashboard
from billing.delivery import DispatcherInput
from billing.settings import DEFAULT_DELIVERY_WAKE_MIN_INTERVAL_S, Settings
from billing.signup import SignupService
from billing.worker import Dependencies, DispatcherWaker, wake_dispatcher_on_commit

API_VERSION = "1"
DOCS_PATH = "/docs"
DOCS_STATIC_PATH = "/docs/static"


def swagger_ui_dir() -> Path:
    """Swagger UI's files (swagger-ui-bundle.js, swagger-ui.css, favicon.png), shipped in the
    ``fastapi-offline`` package."""
    return Path(str(files("fastapi_offline") / "static"))


def _install_docs(app: FastAPI) -> None:
    app.mount(DOCS_STATIC_PATH, StaticFiles(directory=swagger_ui_dir()), name="docs-static")
    oauth2_redirect = f"{DOCS_PATH}/oauth2-redirect"

    @app.get(DOCS_PATH, include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="billing API",
            oauth2_redirect_url=oauth2_redirect,
            swagger_js_url=f"{DOCS_STATIC_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_STATIC_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_STATIC_PATH}/favicon.png",
        )

    @app.get(oauth2_redirect, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()


def create_app(
    settings: Settings,
    *,
    deps: Dependencies,
    temporal: Client,
    clock: Clock | None = None,
    include_routers: Sequence[APIRouter] = (),
) -> FastAPI:
    """The API on ``deps`` (database, payment gateway) and ``temporal``.

    ``clock`` defaults to ``deps.clock``; ``include_routers`` are added as they are (e.g. the
    Stripe webhooks router). Handlers find ``settings``, ``deps``, ``temporal``, ``clock`` and
    ``signups`` on ``app.state`` (see ``billing.api.dependencies``).
    """
    app = FastAPI(
        title="billing",
        version=API_VERSION,
        summary="Recurring billing: subscriptions, changes and finance reads.",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    access_log.install()
    clock = clock or deps.clock
    app.state.settings = settings
    app.state.deps = deps
    app.state.temporal = temporal
    app.state.clock = clock
    app.state.keyring = KeyRing.from_settings(settings)
    app.state.signups = SignupService(
        deps.session_factory,
        deps.gateway,
        temporal,
        task_queue=settings.task_queue,
        payments_task_queue=settings.payments_queue(),
        clock=clock,
    )
    install_error_handlers(
        app,
        max_body_bytes=settings.api_max_body_bytes,
        path_limits={
            WEBHOOK_PATH: max(WEBHOOK_MAX_BODY_BYTES, settings.api_max_body_bytes),
        },
    )
    app.state.metrics = metrics.ApiMetrics(
        deps.session_factory, ttl_s=metrics.BUSINESS_METRICS_TTL_S
    )
    app.add_middleware(metrics.RequestTimer, metrics=app.state.metrics)
    _install_docs(app)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(subscriptions.router)
    # The PDF route before the invoice read, whose {id} would otherwise match "in_x.pdf".
    app.include_router(documents.router)
    app.include_router(invoices.router)
    app.include_router(plans.router)
    app.include_router(customers.router)
    app.include_router(events.router)
    app.include_router(reports.router)
    dashboard.install(app)
    app.include_router(credit_notes.router)
    app.include_router(payouts.router)
    app.include_router(payouts.admin_router)
    for router in include_routers:
        app.include_router(router)
    return app


def wake_dispatcher_on_commits(
    app: FastAPI,
    dispatcher: DispatcherInput,
    *,
    min_interval_s: float = DEFAULT_DELIVERY_WAKE_MIN_INTERVAL_S,
) -> DispatcherWaker:
    """Wake the delivery dispatcher after every commit of this app's requests that wrote an
    event delivery or a notice (a manual redelivery, a credit note, a settlement webhook's
    refund or dispute), as the worker's own commits do, so it leaves within a moment instead
    of at the dispatcher's next poll (which stays the safety net). Call from the running event
    loop that serves the app; ``.detach()`` stops it."""
    deps: Dependencies = app.state.deps
    temporal: Client = app.state.temporal
    return wake_dispatcher_on_commit(
        deps.session_factory, temporal, dispatcher=dispatcher, min_interval_s=min_interval_s
    )
