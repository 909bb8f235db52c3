"""Signup latency on the local stack, one client.

Starts `billing dev --no-demo` on a fresh state folder and free ports (Temporal dev server,
localstripe, SQLite, worker, API), then sends N signups one after another, each followed by
two baseline requests measured in the same run on the same machine:

- ``401``: a request refused by auth (HTTP stack and middleware only);
- ``read``: ``GET /v1/invoices?limit=1`` (auth, one database read).

    .venv/bin/python scripts/bench_signup.py [--signups 200] [--warmup 10]

Prints p50/p90/p99/max in milliseconds for each.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def report(name: str, samples: list[float]) -> None:
    ms = [s * 1000 for s in samples]
    print(
        f"{name:<8} n={len(ms):<4} p50 {statistics.median(ms):7.1f} ms   "
        f"p90 {percentile(ms, 90):7.1f} ms   p99 {percentile(ms, 99):7.1f} ms   "
        f"max {max(ms):7.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="signup latency on the local stack")
    parser.add_argument("--signups", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()

    state = Path(tempfile.mkdtemp(prefix="billing-bench-"))
    api_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
    env.update(
        BILLING_STATE_DIR=str(state),
        BILLING_DATABASE_URL=f"sqlite:///{state}/billing.db",
        BILLING_TEMPORAL_ADDRESS=f"127.0.0.1:{free_port()}",
        BILLING_TEMPORAL_UI_PORT=str(free_port()),
        BILLING_LOCALSTRIPE_PORT=str(free_port()),
        BILLING_API_PORT=str(api_port),
    )
    log = (state / "dev.log").open("wb")
    billing = str(Path(sys.executable).parent / "billing")
    dev = subprocess.Popen([billing, "dev", "--no-demo"], env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 90
        while "API running" not in (state / "dev.log").read_text(errors="replace"):
            if dev.poll() is not None or time.monotonic() > deadline:
                sys.exit("billing dev did not start:\n" + (state / "dev.log").read_text())
            time.sleep(0.2)
        keys = {k["scope"]: k["key"] for k in json.loads((state / "dev-api-keys.json").read_text())}
        signup_headers = {"Authorization": f"Bearer {keys['signup']}"}
        finance_headers = {"Authorization": f"Bearer {keys['finance']}"}
        samples: dict[str, list[float]] = {"signup": [], "401": [], "read": []}
        with httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=30) as client:
            for n in range(args.warmup + args.signups):
                body = {
                    "plan": "basic-monthly",
                    "customer": {"external_id": f"bench-{uuid.uuid4().hex}"},
                    "payment_method_id": "pm_card_visa",
                }
                headers = {**signup_headers, "Idempotency-Key": uuid.uuid4().hex}
                t0 = time.perf_counter()
                response = client.post("/v1/subscriptions", json=body, headers=headers)
                t1 = time.perf_counter()
                if response.status_code != 201:
                    sys.exit(f"signup failed: {response.status_code} {response.text}")
                client.get("/v1/invoices")  # 401: no key
                t2 = time.perf_counter()
                client.get("/v1/invoices", params={"limit": 1}, headers=finance_headers)
                t3 = time.perf_counter()
                if n >= args.warmup:
                    samples["signup"].append(t1 - t0)
                    samples["401"].append(t2 - t1)
                    samples["read"].append(t3 - t2)
        print(f"local stack (billing dev, SQLite, localstripe), one client, {args.signups} signups")
        for name, values in samples.items():
            report(name, values)
    finally:
        dev.send_signal(signal.SIGINT)
        try:
            dev.wait(timeout=60)
        except subprocess.TimeoutExpired:
            dev.kill()
        log.close()


if __name__ == "__main__":
    main()
