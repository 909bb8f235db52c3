"""Liveness and readiness, for load balancers and orchestrators, on the API and the worker.

``/healthz``: the process is alive and its event loop answers (no dependency is asked, so a
database outage never gets every replica restarted at once). ``/readyz``: the database and
Temporal both answer within ``READY_TIMEOUT_S``; 503 with each check's outcome otherwise.
The worker serves both on ``BILLING_WORKER_HEALTH_ADDRESS`` (``serve_worker_health``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import uvicorn
from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from temporalio.client import Client

from db.engine import unit_of_work
from db.repositories import health as health_repo

log = logging.getLogger(__name__)

#: Each readiness check must answer within this many seconds.
READY_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One dependency's answer: ``ok``, how long it took (ms) and, on failure, why."""

    name: str
    ok: bool
    duration_ms: int
    error: str | None = None

    def as_json(self) -> dict[str, object]:
        body: dict[str, object] = {"ok": self.ok, "duration_ms": self.duration_ms}
        if self.error is not None:
            body["error"] = self.error
        return body


def _ping_database(session_factory: sessionmaker[Session]) -> bool:
    with unit_of_work(session_factory) as session:
        return health_repo.ping(session)


async def check_database(
    session_factory: sessionmaker[Session], *, timeout_s: float = READY_TIMEOUT_S
) -> CheckResult:
    started = time.monotonic()
    try:
        ok = await asyncio.wait_for(
            asyncio.to_thread(_ping_database, session_factory), timeout=timeout_s
        )
        error = None if ok else "SELECT 1 gave another answer"
    except TimeoutError:
        ok, error = False, f"no answer within {timeout_s:g} s"
    except Exception as failure:  # any driver error means "not ready"; the log has the detail
        log.warning("readiness: database check failed", exc_info=True)
        ok, error = False, type(failure).__name__
    return CheckResult("database", ok, int((time.monotonic() - started) * 1000), error)


async def check_temporal(client: Client, *, timeout_s: float = READY_TIMEOUT_S) -> CheckResult:
    started = time.monotonic()
    try:
        ok = await asyncio.wait_for(
            client.service_client.check_health(timeout=timedelta(seconds=timeout_s)),
            timeout=timeout_s + 0.5,
        )
        error = None if ok else "the frontend is not serving"
    except TimeoutError:
        ok, error = False, f"no answer within {timeout_s:g} s"
    except Exception as failure:
        log.warning("readiness: Temporal check failed", exc_info=True)
        ok, error = False, type(failure).__name__
    return CheckResult("temporal", ok, int((time.monotonic() - started) * 1000), error)


async def readiness(
    session_factory: sessionmaker[Session], client: Client, *, timeout_s: float = READY_TIMEOUT_S
) -> tuple[bool, dict[str, object]]:
    """Whether both dependencies answer, and the body ``/readyz`` sends: ``{"status": "ready"
    | "not_ready", "checks": {"database": {...}, "temporal": {...}}}``."""
    checks = await asyncio.gather(
        check_database(session_factory, timeout_s=timeout_s),
        check_temporal(client, timeout_s=timeout_s),
    )
    ready = all(c.ok for c in checks)
    return ready, {
        "status": "ready" if ready else "not_ready",
        "checks": {c.name: c.as_json() for c in checks},
    }


def liveness_body() -> dict[str, object]:
    return {"status": "ok"}


def worker_health_app(session_factory: sessionmaker[Session], client: Client) -> Starlette:
    """The worker's small HTTP app: ``GET /healthz`` and ``GET /readyz``."""

    async def healthz(_request: Request) -> JSONResponse:
        return JSONResponse(liveness_body())

    async def readyz(_request: Request) -> JSONResponse:
        ready, body = await readiness(session_factory, client)
        return JSONResponse(body, status_code=200 if ready else 503)

    return Starlette(routes=[Route("/healthz", healthz, methods=["GET"]), Route("/readyz", readyz)])


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (checked by Settings) as (host, port)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the worker's stop event owns them."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve_worker_health(
    address: str,
    session_factory: sessionmaker[Session],
    client: Client,
    *,
    stop: asyncio.Event,
    started: asyncio.Event | None = None,
) -> None:
    """Serve ``worker_health_app`` on ``address`` until ``stop`` is set. Raises (OSError) if the
    address cannot be bound."""
    host, port = split_address(address)
    config = uvicorn.Config(
        worker_health_app(session_factory, client),
        host=host,
        port=port,
        log_level="warning",
        lifespan="off",
        access_log=False,
    )
    server = _QuietServer(config)
    serving = asyncio.create_task(server.serve())
    while not server.started and not serving.done():
        await asyncio.sleep(0.05)
    if serving.done():
        await serving
        raise OSError(f"cannot serve worker health on {address}")
    if started is not None:
        started.set()
    await stop.wait()
    server.should_exit = True
    await serving
