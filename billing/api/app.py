"""The HTTP API's app factory.

``create_app`` wires the routers, the error shape, the body-size limit and API-key auth onto
the given dependencies, so the same factory serves production (``billing api``), the dev
stack and tests (a time-skipping harness). OpenAPI docs are at ``/docs``.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import APIRouter, FastAPI
from temporalio.client import Client

from billing.api import access_log, credit_notes, invoices, payouts, subscriptions
from billing.api.auth import KeyRing
from billing.api.errors import install_error_handlers
from billing.api.webhooks import WEBHOOK_MAX_BODY_BYTES, WEBHOOK_PATH
from billing.clock import Clock
from billing.settings import Settings
from billing.signup import SignupService
from billing.worker import Dependencies

API_VERSION = "1"


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
        docs_url="/docs",
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
    app.include_router(subscriptions.router)
    app.include_router(invoices.router)
    app.include_router(credit_notes.router)
    app.include_router(payouts.router)
    for router in include_routers:
        app.include_router(router)
    return app
