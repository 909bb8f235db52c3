"""Fixtures for the Stripe webhook tests: a real uvicorn server in a background thread serving
a minimal app with the webhook router, registered at a localstripe process of its own, so
localstripe's signed deliveries reach it over HTTP.

The app holds exactly what the API's app factory stores on ``app.state``: ``settings``,
``deps`` (the harness's Dependencies) and ``temporal`` (the harness's client).

Import the fixtures into a test module (``from tests.api.webhook_fixtures import
webhook_stack_fixture``, and so on); they are registered under their short names
(``webhook_stack``), so a test's parameter does not shadow the imported function.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import stripe
import uvicorn
from fastapi import FastAPI, Request, Response
from pydantic import SecretStr
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from billing.api.webhooks import WEBHOOK_PATH, webhook_router
from billing.records import WebhookEventRecord
from billing.settings import Settings
from billing.testing.harness import LOCALSTRIPE_API_KEY, BillingHarness
from billing.testing.localstripe import LocalStripe
from db.engine import unit_of_work
from db.repositories import webhook_events as webhook_events_repo

WEBHOOK_SECRET = "whsec_billing_webhook_tests_0123456789"
TOLERANCE_SECONDS = 300
#: The localstripe webhook endpoint id these tests (re-)register.
LOCALSTRIPE_ENDPOINT_ID = "billing-webhook-tests"
#: A path on the test server that records deliveries and answers 200 without processing
#: them: a way to hold a genuine localstripe-signed event and post it (or variants) later.
CAPTURE_PATH = "/capture"


def webhook_settings(
    secret: str | None = WEBHOOK_SECRET, *, task_queue: str = "billing"
) -> Settings:
    """``task_queue``: the harness's, where workflows the webhook starts must run."""
    return Settings(
        _env_file=None,
        environment="test",
        task_queue=task_queue,
        stripe_webhook_secret=None if secret is None else SecretStr(secret),
        stripe_webhook_tolerance_seconds=TOLERANCE_SECONDS,
    )


def make_webhook_app(settings: Settings, deps: Any, temporal: Client | None) -> FastAPI:
    """The smallest app the router runs in: the three ``app.state`` entries plus the router,
    and a capture route for the tests."""
    app = FastAPI()
    app.state.settings = settings
    app.state.deps = deps
    app.state.temporal = temporal
    app.include_router(webhook_router())

    @app.post(CAPTURE_PATH)
    async def capture(request: Request) -> Response:
        await request.body()
        return Response(status_code=200)

    return app


@dataclass(frozen=True)
class Delivery:
    """One HTTP request the test server received, as sent."""

    path: str
    headers: dict[str, str]
    body: bytes
    status: int | None

    @property
    def event(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed

    @property
    def signature(self) -> str | None:
        return self.headers.get("stripe-signature")


class RecordingApp:
    """ASGI wrapper that keeps every HTTP request's raw body, headers and answer status."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._lock = threading.Lock()
        self._deliveries: list[Delivery] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        status: list[int] = []

        async def receive_and_keep() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
            return message

        async def send_and_keep(message: Any) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive_and_keep, send_and_keep)
        finally:
            headers = {
                k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]
            }
            with self._lock:
                self._deliveries.append(
                    Delivery(
                        scope["path"], headers, b"".join(chunks), status[0] if status else None
                    )
                )

    @property
    def deliveries(self) -> list[Delivery]:
        with self._lock:
            return list(self._deliveries)


class WebhookServer:
    """uvicorn serving ``app`` on a free 127.0.0.1 port, in a background thread."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.recorder = RecordingApp(app)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Bound here and handed to uvicorn: no window in which another process takes the port.
        self._socket.bind(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]
        self._server = uvicorn.Server(
            uvicorn.Config(self.recorder, log_level="warning", lifespan="off", access_log=False)
        )
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def deliveries(self) -> list[Delivery]:
        return self.recorder.deliveries

    def __enter__(self) -> WebhookServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()


def register_localstripe_webhook(
    localstripe: LocalStripe,
    url: str,
    *,
    secret: str = WEBHOOK_SECRET,
    events: list[str] | None = None,
) -> None:
    """``POST /_config/webhooks/{id}``: localstripe signs every later event with ``secret`` and
    posts it to ``url`` (one endpoint id, so this replaces the previous registration)."""
    form: dict[str, Any] = {"url": url, "secret": secret}
    if events is not None:
        form["events[]"] = events
    response = httpx.post(
        f"{localstripe.url}/_config/webhooks/{LOCALSTRIPE_ENDPOINT_ID}", data=form, timeout=10
    )
    response.raise_for_status()


def sign(body: bytes, *, secret: str = WEBHOOK_SECRET, timestamp: int | None = None) -> str:
    """A ``Stripe-Signature`` header for ``body``, made by the Stripe SDK's own helper."""
    header: str = stripe.WebhookSignature.generate_signature_header(
        body.decode("utf-8"), secret, timestamp=timestamp
    )
    return header


async def wait_until(
    condition: Callable[[], Awaitable[Any]] | Callable[[], Any],
    *,
    timeout: float = 10.0,
    what: str = "condition",
) -> Any:
    """Poll ``condition`` in real time until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.05)


@dataclass
class WebhookStack:
    """The pieces one webhook test drives."""

    harness: BillingHarness
    localstripe: LocalStripe
    server: WebhookServer
    app: FastAPI

    @property
    def endpoint_url(self) -> str:
        return self.server.url + WEBHOOK_PATH

    def listen(self, path: str = WEBHOOK_PATH) -> None:
        """Have localstripe deliver its events to ``path`` on the test server."""
        register_localstripe_webhook(self.localstripe, self.server.url + path)

    def events(self, event_type: str | None = None) -> list[WebhookEventRecord]:
        with unit_of_work(self.harness.session_factory) as session:
            return webhook_events_repo.list_webhook_events(session, event_type=event_type)

    def event(self, event_id: str) -> WebhookEventRecord | None:
        with unit_of_work(self.harness.session_factory) as session:
            return webhook_events_repo.get_webhook_event(session, event_id)

    def event_count(self) -> int:
        with unit_of_work(self.harness.session_factory) as session:
            return webhook_events_repo.count_webhook_events(session)

    def deliveries(
        self, event_type: str | None = None, *, path: str | None = WEBHOOK_PATH
    ) -> list[Delivery]:
        return [
            d
            for d in self.server.deliveries
            if (path is None or d.path == path)
            and (event_type is None or d.event.get("type") == event_type)
        ]

    async def post(
        self, body: bytes, signature: str | None, *, content_type: str = "application/json"
    ) -> httpx.Response:
        headers = {"Content-Type": content_type}
        if signature is not None:
            headers["Stripe-Signature"] = signature
        async with httpx.AsyncClient(timeout=30) as client:
            return await client.post(self.endpoint_url, content=body, headers=headers)

    def stripe_post(self, path: str, form: dict[str, str]) -> dict[str, Any]:
        """A raw POST to localstripe (its test-only routes, such as ``_authenticate``)."""
        response = httpx.post(
            f"{self.localstripe.url}{path}",
            data=form,
            headers={"Authorization": f"Bearer {LOCALSTRIPE_API_KEY}"},
            timeout=10,
        )
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result


@pytest.fixture(name="localstripe", scope="module")
def localstripe_fixture() -> Iterator[LocalStripe]:
    """A localstripe of this module's own: webhook endpoints are registered process-wide, so
    a shared one would send these tests other modules' events (and them, ours)."""
    with LocalStripe() as server:
        yield server


@pytest.fixture(name="webhook_harness")
async def webhook_harness_fixture(
    temporal_env: WorkflowEnvironment, localstripe: LocalStripe, database_url: str
) -> AsyncIterator[BillingHarness]:
    async with BillingHarness(
        temporal_env, database_url=database_url, stripe_api_base=localstripe.url
    ) as harness:
        yield harness


@pytest.fixture(name="webhook_stack")
def webhook_stack_fixture(
    webhook_harness: BillingHarness, localstripe: LocalStripe
) -> Iterator[WebhookStack]:
    """The webhook app on a real server, listening to localstripe's events."""
    app = make_webhook_app(
        webhook_settings(task_queue=webhook_harness.task_queue),
        webhook_harness.deps,
        webhook_harness.client,
    )
    with WebhookServer(app) as server:
        stack = WebhookStack(webhook_harness, localstripe, server, app)
        stack.listen()
        try:
            yield stack
        finally:
            # Nothing will listen on this port again: stop localstripe sending there.
            register_localstripe_webhook(
                localstripe, server.url + CAPTURE_PATH, events=["billing.tests.none"]
            )
