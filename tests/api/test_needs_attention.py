"""Finding 3's surfaces: a subscription whose workflow parks it (needs_attention) is visible
through the API, the CLI and the worker's Prometheus metrics, with the reason; it keeps
accepting changes; `resume-billing` (API and CLI) re-runs the failed step once its cause is
fixed, and is refused (409) on a subscription that is not parked.

The failure is a settlement whose amount is not the invoice's: real Stripe can report one
(a charge captured for another amount), localstripe cannot, so a gateway double reports it
while ``wrong_amount`` is set; every other call goes to localstripe through the real SDK."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from billing.api import create_app
from billing.contracts import SubscriptionView
from billing.invoices import InvoiceStatus
from billing.payments import ChargeOutcome, PaymentGateway, SettlementDetails
from billing.settings import Settings
from billing.subscription import SubscriptionStatus
from billing.testing.cards import SUCCEEDS
from billing.testing.harness import BillingHarness, start_time_skipping_environment
from billing.testing.localstripe import LocalStripe
from billing.worker import PARKED_COUNTER, metrics_runtime
from tests.api.support import Api, api_settings, eventually
from tests.conftest import BOTH_BACKENDS

BILLING = str(Path(sys.executable).parent / "billing")


@dataclasses.dataclass
class WrongSettlementAmount:
    """The real gateway, except that while ``wrong_amount`` is set the provider reports the
    charge one minor unit above what was asked: settle_invoice refuses to mark the invoice
    paid with it (ChangeRefused, non-retryable), which parks the subscription."""

    inner: PaymentGateway
    wrong_amount: threading.Event = dataclasses.field(default_factory=threading.Event)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def settlement_details(
        self, *, payment_intent_id: str, charge_id: str | None
    ) -> SettlementDetails:
        details = self.inner.settlement_details(
            payment_intent_id=payment_intent_id, charge_id=charge_id
        )
        if self.wrong_amount.is_set():
            return dataclasses.replace(details, amount_minor=details.amount_minor + 1)
        return details

    def charge(self, **kwargs: Any) -> ChargeOutcome:
        return self._wrong(self.inner.charge(**kwargs))

    def confirm_payment_intent(self, **kwargs: Any) -> ChargeOutcome:
        return self._wrong(self.inner.confirm_payment_intent(**kwargs))

    def _wrong(self, outcome: ChargeOutcome) -> ChargeOutcome:
        """The settlement a charge's answer carries (expanded) is off by one minor unit too."""
        if not self.wrong_amount.is_set() or outcome.settlement is None:
            return outcome
        wrong = dataclasses.replace(
            outcome.settlement, amount_minor=outcome.settlement.amount_minor + 1
        )
        return dataclasses.replace(outcome, settlement=wrong)


def wrapping(double: WrongSettlementAmount) -> Any:
    def wrap(inner: PaymentGateway) -> PaymentGateway:
        double.inner = inner
        return double  # type: ignore[return-value]

    return wrap


@pytest.fixture
def gateway() -> WrongSettlementAmount:
    return WrongSettlementAmount(None)  # type: ignore[arg-type]


@pytest.fixture
async def harness(
    temporal_env: WorkflowEnvironment,
    localstripe: LocalStripe,
    database_url: str,
    gateway: WrongSettlementAmount,
) -> AsyncIterator[BillingHarness]:
    async with BillingHarness(
        temporal_env,
        database_url=database_url,
        stripe_api_base=localstripe.url,
        wrap_gateway=wrapping(gateway),
    ) as h:
        yield h


def parked(view: SubscriptionView) -> bool:
    return view.status == SubscriptionStatus.NEEDS_ATTENTION


async def parked_signup(api: Api, gateway: WrongSettlementAmount) -> str:
    """A basic-monthly signup (billed at once) whose first settlement does not match."""
    gateway.wrong_amount.set()
    body = await api.signed_up("basic-monthly", card=SUCCEEDS)
    await api.harness.wait_for(body["id"], parked)
    sub_id: str = body["id"]
    return sub_id


async def read(api: Api, sub_id: str) -> dict[str, Any]:
    response = await api.request("GET", f"/v1/subscriptions/{sub_id}", scope="finance")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def post(
    api: Api, sub_id: str, action: str, body: dict[str, Any] | None = None, scope: str = "admin"
) -> tuple[int, dict[str, Any]]:
    kwargs: dict[str, Any] = {} if body is None else {"json": body}
    response = await api.request(
        "POST", f"/v1/subscriptions/{sub_id}/{action}", scope=scope, **kwargs
    )
    return response.status_code, response.json()


def cli(database_url: str, temporal_address: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The real `billing` command, configured only by its environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
    env.update(
        BILLING_DATABASE_URL=database_url,
        BILLING_TEMPORAL_ADDRESS=temporal_address,
        BILLING_TEMPORAL_CONNECT_TIMEOUT_S="0",
        COLUMNS="300",
    )
    return subprocess.run(
        [BILLING, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def server_address(harness: BillingHarness) -> str:
    return harness.client.service_client.config.target_host


def instant(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


@BOTH_BACKENDS
async def test_a_parked_subscription_shows_why_and_resume_billing_settles_it_once(
    api: Api, app: FastAPI, gateway: WrongSettlementAmount
) -> None:
    harness = api.harness
    sub_id = await parked_signup(api, gateway)
    await harness.wait_until_at_rest([sub_id])

    # The API, live: the status, the failed step and the provider's words.
    live = await read(api, sub_id)
    assert live["live"] is True
    assert live["status"] == "needs_attention"
    attention = live["attention"]
    assert attention["step"].startswith("charge invoice ")
    assert "ChangeRefused" in attention["reason"]
    assert "but invoice" in attention["reason"]
    assert instant(attention["since"]) is not None
    # The status log has the move, with the reason.
    moved = live["status_history"][-1]
    assert (moved["from_status"], moved["to_status"]) == ("active", "needs_attention")
    assert "but invoice" in moved["reason"]

    # The API from the database, when Temporal cannot be asked: the same attention.
    temporal = app.state.temporal
    app.state.temporal = await Client.connect("127.0.0.1:1", lazy=True)
    try:
        stored = await read(api, sub_id)
    finally:
        app.state.temporal = temporal
    assert stored["live"] is False
    assert stored["status"] == "needs_attention"
    assert stored["attention"]["step"] == attention["step"]
    assert stored["attention"]["reason"] == attention["reason"]
    assert instant(stored["attention"]["since"]) == instant(moved["changed_at"])

    # The list an operator starts from: the parked ones, with the same attention.
    listed = await api.request(
        "GET", "/v1/subscriptions", scope="finance", params={"status": "needs_attention"}
    )
    assert listed.status_code == 200, listed.text
    assert [(i["id"], i["attention"]) for i in listed.json()["items"]] == [
        (sub_id, stored["attention"])
    ]
    parked_list = await asyncio.to_thread(
        cli,
        harness.database_url,
        server_address(harness),
        "subscriptions",
        "list",
        "--status",
        "needs_attention",
    )
    assert parked_list.returncode == 0, parked_list.stderr + parked_list.stdout
    assert sub_id in parked_list.stdout and "but invoice" in parked_list.stdout

    # The CLI, live and from the database.
    shown = await asyncio.to_thread(
        cli, harness.database_url, server_address(harness), "subscriptions", "show", sub_id
    )
    assert shown.returncode == 0, shown.stderr + shown.stdout
    assert "needs_attention" in shown.stdout
    assert attention["step"] in shown.stdout
    assert "but invoice" in shown.stdout
    assert f"resume-billing {sub_id}" in shown.stdout
    offline = await asyncio.to_thread(
        cli, harness.database_url, "127.0.0.1:1", "subscriptions", "show", sub_id
    )
    assert offline.returncode == 0, offline.stderr + offline.stdout
    assert "needs_attention (from the database" in offline.stdout
    assert attention["step"] in offline.stdout
    assert "but invoice" in offline.stdout

    # Resuming before the cause is fixed parks it again, and nothing is paid twice.
    status, body = await post(api, sub_id, "resume-billing", {"reason": "try again"})
    assert status == 200, body
    again = await harness.wait_for(sub_id, parked)
    # What runs again is the settlement only: the charge is not repeated.
    assert again.attention_step is not None and again.attention_step.startswith("settle invoice")
    snap = harness.snapshot(sub_id)
    assert [i.status for i in snap.invoices] == [InvoiceStatus.OPEN]
    assert sum(len(p) for p in snap.payments.values()) == 0

    # Fixed: resume-billing through the CLI settles the invoice once.
    gateway.wrong_amount.clear()
    resumed = await asyncio.to_thread(
        cli,
        harness.database_url,
        server_address(harness),
        "subscriptions",
        "resume-billing",
        sub_id,
        "--reason",
        "amount corrected at the provider, OPS-12",
    )
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    assert "active again" in resumed.stdout
    assert "running again: settle invoice" in resumed.stdout
    view = await harness.wait_for(sub_id, lambda v: v.status == SubscriptionStatus.ACTIVE)
    assert view.open_invoice is None and view.attention_reason is None
    snap = harness.snapshot(sub_id)
    assert [i.status for i in snap.invoices] == [InvoiceStatus.PAID]
    assert [len(p) for p in snap.payments.values()] == [1]
    assert snap.subscription.attention_reason is None
    charges = await asyncio.to_thread(harness.provider_charges, sub_id)
    assert [c["status"] for c in charges] == ["succeeded"]
    assert [c["amount"] for c in charges] == [snap.invoices[0].amount_due_minor]
    after = await read(api, sub_id)
    assert after["status"] == "active" and after["attention"] is None
    listed = await api.request(
        "GET", "/v1/subscriptions", scope="finance", params={"status": "needs_attention"}
    )
    assert listed.json() == {"items": [], "next_cursor": None}
    assert after["status_history"][-1]["to_status"] == "active"

    # Not parked any more: refused with the reason, by the API and the CLI.
    status, body = await post(api, sub_id, "resume-billing", {"reason": "again"})
    assert status == 409, body
    assert body["error"]["type"] == "change_refused"
    assert "not needs_attention" in body["error"]["message"]
    refused = await asyncio.to_thread(
        cli,
        harness.database_url,
        server_address(harness),
        "subscriptions",
        "resume-billing",
        sub_id,
    )
    assert refused.returncode == 1
    assert "not needs_attention" in refused.stderr


async def test_a_parked_subscription_keeps_taking_cancels(
    api: Api, gateway: WrongSettlementAmount
) -> None:
    harness = api.harness
    at_period_end = await parked_signup(api, gateway)
    now = await parked_signup(api, gateway)

    # At period end: accepted; it stays parked (its invoice still needs the operator).
    status, body = await post(
        api, at_period_end, "cancel", {"at_period_end": True, "reason": "moving on"}
    )
    assert status == 200, body
    assert body["cancel_at_period_end"] is True
    view = await read(api, at_period_end)
    assert (view["status"], view["cancel_at_period_end"]) == ("needs_attention", True)
    assert view["attention"] is not None

    # Immediately, once the cause is fixed: the payment the provider holds is recorded (the
    # invoice is paid, not voided), and the subscription ends.
    gateway.wrong_amount.clear()
    status, body = await post(api, now, "cancel", {"at_period_end": False, "reason": "left"})
    assert status == 200, body
    assert body["status"] == "canceled"
    assert body["voided_invoice_id"] is None
    view = await read(api, now)
    assert (view["status"], view["attention"], view["cancel_reason"]) == ("canceled", None, "left")
    snap = harness.snapshot(now)
    assert [i.status for i in snap.invoices] == [InvoiceStatus.PAID]
    assert [len(p) for p in snap.payments.values()] == [1]
    charges = await asyncio.to_thread(harness.provider_charges, now)
    assert [c["status"] for c in charges] == ["succeeded"]


async def test_parallel_resume_billing_resumes_once_and_pays_once(
    api: Api, gateway: WrongSettlementAmount
) -> None:
    harness = api.harness
    sub_id = await parked_signup(api, gateway)
    gateway.wrong_amount.clear()

    answers = await asyncio.gather(
        *(post(api, sub_id, "resume-billing", {"reason": f"operator {n}"}) for n in range(10))
    )

    assert sorted(status for status, _ in answers) == [200] + [409] * 9, answers
    await harness.wait_for(sub_id, lambda v: v.status == SubscriptionStatus.ACTIVE)
    snap = harness.snapshot(sub_id)
    assert [i.status for i in snap.invoices] == [InvoiceStatus.PAID]
    assert [len(p) for p in snap.payments.values()] == [1]
    charges = await asyncio.to_thread(harness.provider_charges, sub_id)
    assert [c["status"] for c in charges] == ["succeeded"]
    # One move out of needs_attention in the status log.
    moves = [(c.from_status, c.to_status) for c in snap.status_changes]
    assert moves.count((SubscriptionStatus.NEEDS_ATTENTION, SubscriptionStatus.ACTIVE)) == 1


async def test_resume_billing_is_refused_on_a_healthy_subscription_and_checks_its_input(
    api: Api,
) -> None:
    body = await api.signed_up("basic-monthly", card=SUCCEEDS)
    sub_id = body["id"]
    await api.harness.wait_for(sub_id, lambda v: v.invoices_issued == 1 and not v.open_invoice)

    status, answer = await post(api, sub_id, "resume-billing", {"reason": "just in case"})
    assert status == 409, answer
    assert answer["error"]["type"] == "change_refused"
    assert "is active, not needs_attention" in answer["error"]["message"]
    status, answer = await post(api, sub_id, "resume-billing")  # no body: no reason
    assert status == 409, answer

    status, answer = await post(api, sub_id, "resume-billing", {"reason": "x"}, scope="finance")
    assert status == 403, answer
    status, answer = await post(api, sub_id, "resume-billing", {"why": "x"})
    assert status == 422, answer
    assert answer["error"]["field"] == "why"
    status, answer = await post(api, sub_id, "resume-billing", {"reason": "x" * 501})
    assert status == 422, answer
    status, answer = await post(api, "sub_missing", "resume-billing", {"reason": "x"})
    assert status == 404, answer

    for params, field in (
        ({"status": "parked"}, "status"),
        ({"state": "needs_attention"}, "state"),
        ({"limit": "0"}, "limit"),
        ({"cursor": "sub_1;drop"}, "cursor"),
    ):
        listed = await api.request("GET", "/v1/subscriptions", scope="finance", params=params)
        assert listed.status_code == 422, (params, listed.text)
        assert listed.json()["error"]["field"] == field, listed.text
    listed = await api.request("GET", "/v1/subscriptions", scope="finance", params={"limit": 1})
    assert [i["id"] for i in listed.json()["items"]] == [sub_id]
    assert listed.json()["items"][0]["attention"] is None

    operation = (await api.request("GET", "/openapi.json")).json()["paths"][
        "/v1/subscriptions/{id}/resume-billing"
    ]["post"]
    assert {"200", "404", "409", "422"} <= set(operation["responses"])


# ---- metrics -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def scrape(address: str) -> dict[str, float]:
    """``name{labels}`` -> value from a Prometheus text page."""
    text = httpx.get(f"http://{address}/metrics", timeout=5).text
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def sample(samples: dict[str, float], name: str) -> float | None:
    """The value of the one series of ``name`` (whatever its labels), None if absent."""
    found = [v for k, v in samples.items() if k == name or k.startswith(name + "{")]
    assert len(found) <= 1, found
    return found[0] if found else None


async def test_the_worker_serves_the_parked_counter_and_the_needs_attention_gauge(
    localstripe: LocalStripe, database_url: str, gateway: WrongSettlementAmount
) -> None:
    # The workflow's counter: served by the runtime of the worker that parked it.
    workflow_metrics = f"127.0.0.1:{free_port()}"
    runtime = metrics_runtime(
        Settings(_env_file=None, environment="test", worker_metrics_address=workflow_metrics)
    )
    assert runtime is not None
    env = await start_time_skipping_environment(runtime=runtime)
    worker: subprocess.Popen[str] | None = None
    try:
        async with BillingHarness(
            env,
            database_url=database_url,
            stripe_api_base=localstripe.url,
            wrap_gateway=wrapping(gateway),
        ) as harness:
            app = create_app(api_settings(harness), deps=harness.deps, temporal=harness.client)
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://billing.test"
            ) as http:
                api = Api(http, harness)
                sub_id = await parked_signup(api, gateway)
                counted = await asyncio.to_thread(scrape, workflow_metrics)
                parked_series = [k for k in counted if k.startswith(PARKED_COUNTER)]
                assert parked_series, sorted(counted)[:20]
                # Labelled by the step's first word, as the README's alert examples use it.
                assert any('step="charge"' in k for k in parked_series), parked_series
                assert sample(counted, f"{PARKED_COUNTER}_total") == 1

                # The gauge: the real `billing worker` command, configured by its environment,
                # counting what the database holds now.
                gauge_address = f"127.0.0.1:{free_port()}"
                env_vars = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
                env_vars.update(
                    BILLING_DATABASE_URL=database_url,
                    BILLING_TEMPORAL_ADDRESS=server_address(harness),
                    BILLING_TASK_QUEUE=f"{harness.task_queue}-metrics-only",
                    BILLING_STRIPE_API_BASE=localstripe.url,
                    BILLING_WORKER_METRICS_ADDRESS=gauge_address,
                    BILLING_WORKER_METRICS_REFRESH_S="0.2",
                )
                worker = subprocess.Popen(
                    [BILLING, "worker"],
                    env=env_vars,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )

                def gauge_is(value: float) -> bool:
                    assert worker is not None and worker.poll() is None, "worker exited"
                    try:
                        samples = scrape(gauge_address)
                    except httpx.HTTPError:
                        return False  # not listening yet
                    return sample(samples, "billing_subscriptions_needs_attention") == value

                await eventually(lambda: gauge_is(1), timeout=30)

                gateway.wrong_amount.clear()
                status, body = await post(api, sub_id, "resume-billing", {"reason": "fixed"})
                assert status == 200, body
                await harness.wait_for(sub_id, lambda v: v.status == SubscriptionStatus.ACTIVE)
                await eventually(lambda: gauge_is(0), timeout=30)
                # Counted once: resuming is not parking.
                counted = await asyncio.to_thread(scrape, workflow_metrics)
                assert sample(counted, f"{PARKED_COUNTER}_total") == 1
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            output, _ = worker.communicate(timeout=30)
            assert worker.returncode == 0, output
        await env.shutdown()


def test_a_metrics_address_that_is_not_host_port_is_refused_with_what_to_do() -> None:
    with pytest.raises(ValueError, match=r"must be HOST:PORT such as 127\.0\.0\.1:9464"):
        Settings(_env_file=None, worker_metrics_address="9464")
    assert Settings(_env_file=None, worker_metrics_address="").worker_metrics_address is None
