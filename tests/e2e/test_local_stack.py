"""`billing dev` is the newcomer's one command: on a fresh state folder it starts the
Temporal dev server, localstripe, SQLite, the worker and the API, serves a signup end to end,
stops cleanly on Ctrl-C, and a second start resumes the same state."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class DevStack:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.ports = {
            "temporal": free_port(),
            "ui": free_port(),
            "stripe": free_port(),
            "api": free_port(),
        }
        self.log = state_dir / "dev-stdout.log"
        self.process: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
        env.update(
            BILLING_STATE_DIR=str(self.state_dir),
            BILLING_DATABASE_URL=f"sqlite:///{self.state_dir}/billing.db",
            BILLING_TEMPORAL_ADDRESS=f"127.0.0.1:{self.ports['temporal']}",
            BILLING_TEMPORAL_UI_PORT=str(self.ports["ui"]),
            BILLING_LOCALSTRIPE_PORT=str(self.ports["stripe"]),
            BILLING_API_PORT=str(self.ports["api"]),
            COLUMNS="200",
        )
        return env

    def start(self) -> str:
        billing = str(Path(sys.executable).parent / "billing")
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [billing, "dev", "--no-demo"], env=self.env(), stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace")
            if "API running" in text and port_open(self.ports["api"]):
                return text
            if self.process.poll() is not None:
                pytest.fail(f"billing dev exited early ({self.process.returncode}):\n{text}")
            time.sleep(0.3)
        pytest.fail(f"billing dev did not come up in 90 s:\n{self.log.read_text()}")

    def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"billing dev did not stop on Ctrl-C:\n{self.log.read_text()}")

    def keys(self) -> dict[str, str]:
        data = json.loads((self.state_dir / "dev-api-keys.json").read_text())
        return {k["scope"]: k["key"] for k in data}


def wait_for_paid_invoice(client: httpx.Client, subscription_id: str, key: str) -> dict:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        response = client.get(
            "/v1/invoices",
            params={"subscription_id": subscription_id},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        if data and data[0]["status"] == "paid":
            return dict(data[0])
        time.sleep(0.3)
    pytest.fail(f"no paid invoice for {subscription_id} in 30 s")


def wait_for_webhook(database: Path, event_type: str) -> bool:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with contextlib.closing(sqlite3.connect(database)) as db:
            found = db.execute(
                "select count(*) from webhook_events where type = ?", (event_type,)
            ).fetchone()[0]
        if found:
            return True
        time.sleep(0.3)
    return False


def sign_in_to_dashboard(client: httpx.Client, key: str) -> dict[str, str]:
    """The session cookie a browser gets from the sign-in form."""
    form = client.get("/dashboard/login")
    token = form.text.split('name="login_token" value="', 1)[1].split('"', 1)[0]
    signed = client.post(
        "/dashboard/login", data={"api_key": key, "login_token": token}, cookies=form.cookies
    )
    assert signed.status_code == 303, signed.text
    return {"billing_dashboard_session": signed.cookies["billing_dashboard_session"]}


def test_billing_dev_serves_a_signup_end_to_end_and_stops_cleanly(tmp_path: Path) -> None:
    stack = DevStack(tmp_path / "state")
    stack.state_dir.mkdir()
    banner = stack.start()
    try:
        assert f"http://127.0.0.1:{stack.ports['api']}/docs" in banner
        assert "curl" in banner and "/v1/subscriptions" in banner
        keys = stack.keys()
        with httpx.Client(base_url=f"http://127.0.0.1:{stack.ports['api']}", timeout=30) as client:
            assert client.get("/docs").status_code == 200
            signup = client.post(
                "/v1/subscriptions",
                headers={"Authorization": f"Bearer {keys['signup']}", "Idempotency-Key": "e2e-1"},
                json={
                    "plan": "basic-monthly",
                    "customer": {"external_id": "ada", "email": "ada@example.com"},
                    "payment_method_id": "pm_card_visa",
                },
            )
            assert signup.status_code == 201, signup.text
            subscription_id = signup.json()["id"]
            invoice = wait_for_paid_invoice(client, subscription_id, keys["finance"])
            assert invoice["amount_due_minor"] == 900 and invoice["currency"] == "USD"
            # The dashboard URL the banner prints shows the invoices and the MRR.
            assert f"http://127.0.0.1:{stack.ports['api']}/dashboard" in banner
            dashboard = sign_in_to_dashboard(client, keys["finance"])
            overview = client.get("/dashboard", cookies=dashboard)
            assert overview.status_code == 200
            mrr = overview.text.split('id="mrr-USD">', 1)[1].split("<", 1)[0]
            # The demo subscription and this one, USD 9.00 a month each (once both are paid).
            assert mrr in ("USD 9.00", "USD 18.00"), mrr
            listing = client.get("/dashboard/invoices", cookies=dashboard)
            assert invoice["number"] in listing.text
        # localstripe's signed webhooks reach our endpoint and pass its signature check.
        assert wait_for_webhook(stack.state_dir / "billing.db", "customer.created")
    finally:
        code = stack.stop()
    assert code == 0, stack.log.read_text()
    assert "stopped cleanly" in stack.log.read_text()
    for name, port in stack.ports.items():
        assert not port_open(port), f"{name} still listening on {port} after Ctrl-C"

    # A second start resumes the same state: same keys, same subscription, still one invoice.
    stack.start()
    try:
        keys_again = stack.keys()
        assert keys_again == keys
        with httpx.Client(base_url=f"http://127.0.0.1:{stack.ports['api']}", timeout=30) as client:
            response = client.get(
                f"/v1/subscriptions/{subscription_id}",
                headers={"Authorization": f"Bearer {keys['finance']}"},
            )
            assert response.status_code == 200, response.text
            assert response.json()["status"] == "active"
            invoices = client.get(
                "/v1/invoices",
                params={"subscription_id": subscription_id},
                headers={"Authorization": f"Bearer {keys['finance']}"},
            ).json()["data"]
            assert [i["status"] for i in invoices] == ["paid"]
    finally:
        assert stack.stop() == 0


def test_a_second_billing_dev_on_the_same_state_folder_says_what_runs_and_where(
    tmp_path: Path,
) -> None:
    stack = DevStack(tmp_path / "state")
    stack.state_dir.mkdir()
    stack.start()
    try:
        assert stack.process is not None
        billing = str(Path(sys.executable).parent / "billing")
        second = subprocess.run(
            [billing, "dev", "--no-demo"],
            env=stack.env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        output = second.stdout + second.stderr
        assert second.returncode == 1, output
        assert "Traceback" not in output
        assert "billing dev is already running" in output
        assert f"pid {stack.process.pid}" in output
        assert str(stack.state_dir.resolve()) in output.replace("\n", "")
        assert f"http://127.0.0.1:{stack.ports['api']}" in output
        # The first one is untouched: still serving.
        assert stack.process.poll() is None and port_open(stack.ports["api"])
    finally:
        assert stack.stop() == 0
    # A crashed or stopped run leaves no lock behind: the next start works.
    stack.start()
    assert stack.stop() == 0


def test_billing_dev_refuses_an_api_port_another_program_holds(tmp_path: Path) -> None:
    stack = DevStack(tmp_path / "state")
    stack.state_dir.mkdir()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", stack.ports["api"]))
        squatter.listen()
        billing = str(Path(sys.executable).parent / "billing")
        result = subprocess.run(
            [billing, "dev", "--no-demo"], env=stack.env(), capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output
    assert f"127.0.0.1:{stack.ports['api']} is already in use" in output
    assert "BILLING_API_PORT" in output
    for name in ("temporal", "stripe"):
        assert not port_open(stack.ports[name]), f"{name} was started before the refusal"
