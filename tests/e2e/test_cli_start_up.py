"""Long-running commands started before Temporal (a deploy that starts everything at once)
wait for it, printing each failed attempt, and give up with a clear error, not a traceback,
after BILLING_TEMPORAL_CONNECT_TIMEOUT_S. One-off commands fail at once, just as clearly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from billing.devstack import spawn_temporal_dev_server
from billing.settings import Settings
from billing.testing.database import temporary_database

BILLING = str(Path(sys.executable).parent / "billing")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def sqlite_url() -> Iterator[str]:
    with temporary_database("sqlite") as url:
        yield url


def environment(address: str, database_url: str, **more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
    env.update(
        BILLING_TEMPORAL_ADDRESS=address,
        BILLING_DATABASE_URL=database_url,
        BILLING_TASK_QUEUE=f"start-up-{os.getpid()}",
        COLUMNS="250",
        **more,
    )
    return env


def wait_for_text(path: Path, text: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not seen in {timeout_s:g} s; output:\n{path.read_text()}")


def test_the_worker_waits_for_temporal_and_then_runs(tmp_path: Path, sqlite_url: str) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    health = f"127.0.0.1:{free_port()}"
    out, err = tmp_path / "worker.out", tmp_path / "worker.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        worker = subprocess.Popen(
            [BILLING, "worker"],
            env=environment(address, sqlite_url, BILLING_WORKER_HEALTH_ADDRESS=health),
            stdout=stdout,
            stderr=stderr,
        )
    server = None
    try:
        wait_for_text(err, f"Temporal at {address} is not reachable; retrying", 30)
        assert worker.poll() is None
        settings = Settings(temporal_address=address, temporal_ui_port=free_port())
        server = spawn_temporal_dev_server(settings, db_filename=None, log=tmp_path / "t.log")
        # The backoff grows to at most 30 s between attempts; the first few are short.
        wait_for_text(out, "worker running", 60)
        # Its health port (BILLING_WORKER_HEALTH_ADDRESS): alive, and ready once both answer.
        wait_for_text(out, f"health on http://{health}/healthz", 10)
        assert httpx.get(f"http://{health}/healthz", timeout=5).json() == {"status": "ok"}
        ready = httpx.get(f"http://{health}/readyz", timeout=10)
        assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
        if server is not None:
            server.stop()
    assert "Traceback" not in err.read_text()


def test_the_worker_gives_up_after_the_connect_timeout_with_a_clear_error(
    sqlite_url: str,
) -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    done = subprocess.run(
        [BILLING, "worker"],
        env=environment(address, sqlite_url, BILLING_TEMPORAL_CONNECT_TIMEOUT_S="2"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert f"no Temporal server at {address} (BILLING_TEMPORAL_ADDRESS)" in done.stderr
    assert "retrying" in done.stderr and "Traceback" not in done.stderr
    assert time.monotonic() - started < 30


def test_one_off_commands_do_not_wait_and_say_what_is_wrong(sqlite_url: str) -> None:
    address = f"127.0.0.1:{free_port()}"
    env = environment(address, sqlite_url)
    # `show` falls back to the database, which does not know this subscription.
    show = subprocess.run(
        [BILLING, "subscriptions", "show", "sub_missing"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert show.returncode == 1, show.stderr
    assert "subscription 'sub_missing' not found" in show.stderr
    cancel = subprocess.run(
        [BILLING, "subscriptions", "cancel", "sub_missing"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cancel.returncode == 1
    assert f"no Temporal server at {address}" in cancel.stderr
    for done in (show, cancel):
        assert "Traceback" not in done.stderr and "retrying" not in done.stderr
