"""Prometheus metrics of the API at ``GET /metrics`` (text exposition format, no API key:
scrape it from a private network, as the worker's).

- ``billing_api_request_duration_seconds`` (histogram): every request, labelled by method,
  route template (``/v1/invoices/{id}``, never the raw path, so ids cannot explode the series;
  ``unmatched`` for a path no route serves) and status code.
- Business figures read from the database at scrape time (at most once per
  ``BUSINESS_METRICS_TTL_S``, so a busy scraper costs the database little), the same whichever
  replica is scraped: charge attempts by status and outcome (the decline class), dunning
  recoveries, invoices by status, webhook events by outcome, notices sent and pending,
  subscriptions by status (``needs_attention`` among them).

Each app has its own registry, so several apps in one process (tests) never share series.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from db.engine import unit_of_work
from db.repositories import metrics as metrics_repo

log = logging.getLogger(__name__)

METRICS_PATH = "/metrics"
REQUEST_DURATION = "billing_api_request_duration_seconds"
#: Seconds a scrape's database figures are reused.
BUSINESS_METRICS_TTL_S = 15.0
#: Latency buckets, seconds: the reports' target is 200 ms at p99.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0)


class BusinessCollector(Collector):
    """Figures from the database, cached for ``ttl_s``. A database that does not answer gives
    ``billing_business_metrics_up 0`` and no other business series, never a failed scrape."""

    def __init__(self, session_factory: sessionmaker[Session], *, ttl_s: float) -> None:
        self._session_factory = session_factory
        self._ttl_s = ttl_s
        self._lock = threading.Lock()
        self._cached: list[Metric] = []
        self._read_at = float("-inf")

    def describe(self) -> Iterable[Metric]:
        # Nothing: otherwise registering would read (and cache) the database at start-up.
        return []

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            if time.monotonic() - self._read_at >= self._ttl_s:
                try:
                    self._cached = self._read()
                except Exception:
                    log.warning("reading business metrics failed", exc_info=True)
                    up = GaugeMetricFamily(
                        "billing_business_metrics_up", "1 when the database figures were read"
                    )
                    up.add_metric([], 0)
                    return [up]
                self._read_at = time.monotonic()
            return list(self._cached)

    def _read(self) -> list[Metric]:
        with unit_of_work(self._session_factory) as session:
            attempts = metrics_repo.charge_attempts_by_outcome(session)
            recoveries = metrics_repo.dunning_recoveries(session)
            invoices = metrics_repo.invoices_by_status(session)
            webhooks = metrics_repo.webhook_events_by_outcome(session)
            notices = metrics_repo.notifications_by_state(session)
            subscriptions = metrics_repo.subscriptions_by_status(session)
        up = GaugeMetricFamily(
            "billing_business_metrics_up", "1 when the database figures were read"
        )
        up.add_metric([], 1)
        charges = CounterMetricFamily(
            "billing_charge_attempts",
            "charge attempts recorded, by status and outcome (outcome: paid, soft_decline, "
            "hard_decline, authentication_required; empty while pending)",
            labels=["status", "outcome"],
        )
        for (status, outcome), n in sorted(attempts.items()):
            charges.add_metric([status, outcome], n)
        recovered = CounterMetricFamily(
            "billing_dunning_recoveries", "invoices paid by an attempt after the first"
        )
        recovered.add_metric([], recoveries)
        by_status = GaugeMetricFamily("billing_invoices", "invoices by status", labels=["status"])
        for status, n in sorted(invoices.items()):
            by_status.add_metric([status], n)
        events = CounterMetricFamily(
            "billing_webhook_events",
            "provider webhook events accepted, by outcome",
            labels=["outcome"],
        )
        for outcome, n in sorted(webhooks.items()):
            events.add_metric([outcome], n)
        outbox = GaugeMetricFamily(
            "billing_notifications", "notices in the outbox, sent or pending", labels=["state"]
        )
        for state, n in sorted(notices.items()):
            outbox.add_metric([state], n)
        subs = GaugeMetricFamily(
            "billing_subscriptions", "subscriptions by status", labels=["status"]
        )
        for status, n in sorted(subscriptions.items()):
            subs.add_metric([status], n)
        return [up, charges, recovered, by_status, events, outbox, subs]


class ApiMetrics:
    """One app's registry: the request histogram and the business collector."""

    def __init__(self, session_factory: sessionmaker[Session], *, ttl_s: float) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.request_duration = Histogram(
            REQUEST_DURATION,
            "HTTP request latency, seconds, by method, route template and status code",
            labelnames=["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(BusinessCollector(session_factory, ttl_s=ttl_s))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class RequestTimer:
    """ASGI middleware: observe each HTTP request's duration, once its response has started
    (a streamed CSV is timed to its first bytes; its status is known then)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: dict[str, Any] = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.request_duration.labels(
                scope.get("method", ""), _route_template(scope), str(status["code"])
            ).observe(time.perf_counter() - started)


router = APIRouter(tags=["operations"])


@router.get(
    METRICS_PATH,
    summary="Prometheus metrics (no API key; scrape from a private network)",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Exposition text."}},
)
async def metrics(request: Request) -> Response:
    api_metrics = request.app.state.metrics
    assert isinstance(api_metrics, ApiMetrics)
    body = await asyncio.to_thread(api_metrics.exposition)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
