"""Report and dashboard latency on a large book in PostgreSQL.

Used by ``scripts/bench.py`` (phase ``reports``, through the running ``billing api``), and on
its own (``.venv/bin/python scripts/bench_reports.py --invoices 1000000``): a fresh database
``bench_<random>`` (dropped afterwards), the book bulk-loaded by ``bench.bulk_load_invoices``
(customers with one monthly USD subscription each, 20 invoices a customer; 90 % paid, 5 %
open, 3 % uncollectible, 2 % void) plus what reports read besides invoices:

- status changes: every subscription ``pending -> active`` when created; one in ten canceled
  in its 15th month; one in thirty paused in its 6th month and resumed in its 8th;
- charge attempts: the first attempt of every invoice; one paid invoice in ten failed first
  (soft decline) and was paid by attempt 2; open and uncollectible ones failed (one in three
  hard); payments for paid invoices (fee 2.9 % + 30).

Each report is asked ``--repeat`` times one at a time, in process through the ASGI app (the
standalone run: route, query, JSON) or over HTTP (bench.py), and p50/p99 are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_signup import percentile

#: Report requests timed, with the book's months (bulk invoices start in January 2020).
REPORT_REQUESTS: dict[str, tuple[str, dict[str, str]]] = {
    "mrr": ("/v1/reports/mrr", {"from": "2020-09", "to": "2021-08"}),
    # The months the whole book was created in (every subscription moves in them), and three
    # years around the book.
    "mrr_creation": ("/v1/reports/mrr", {"from": "2020-01", "to": "2020-12"}),
    "mrr_36_months": ("/v1/reports/mrr", {"from": "2019-06", "to": "2022-05"}),
    "ar_aging": ("/v1/reports/ar-aging", {"as_of": "2021-09-15T00:00:00Z"}),
    "dunning": ("/v1/reports/dunning", {"from": "2020-09", "to": "2021-08"}),
    "collections": ("/v1/reports/collections", {"from": "2020-09", "to": "2021-08"}),
    "dashboard_overview": ("/dashboard", {}),
    "dashboard_invoices": ("/dashboard/invoices", {"status": "open"}),
}

FACTS = [
    # Status history: created -> active; some canceled; some paused and resumed.
    """
    INSERT INTO subscription_status_changes (subscription_id, from_status, to_status, changed_at)
    SELECT id, 'pending', 'active', created_at FROM subscriptions WHERE id LIKE 'sub_bulk_%'
    """,
    """
    INSERT INTO subscription_status_changes (subscription_id, from_status, to_status, changed_at)
    SELECT id, 'active', 'canceled', anchor_at + interval '14 months'
    FROM subscriptions WHERE id LIKE 'sub_bulk_%' AND substr(id, 10)::int % 10 = 0
    """,
    """
    INSERT INTO subscription_status_changes (subscription_id, from_status, to_status, changed_at)
    SELECT id, s.f, s.t, anchor_at + s.after
    FROM subscriptions,
        (VALUES ('active', 'paused', interval '5 months'),
                ('paused', 'active', interval '7 months')) AS s(f, t, after)
    WHERE id LIKE 'sub_bulk_%' AND substr(id, 10)::int % 30 = 7
    """,
    # First attempts: paid ones mostly paid at once, one in ten after a soft decline.
    """
    INSERT INTO payment_attempts (id, invoice_id, attempt_number, idempotency_key, amount_minor,
        currency, status, outcome, decline_code, reason, created_at, completed_at)
    SELECT 'pa_' || i.id || '_1', i.id, 1, i.id || '-attempt-1', i.amount_due_minor, i.currency,
        CASE WHEN paid_first THEN 'succeeded' ELSE 'failed' END,
        CASE WHEN paid_first THEN 'paid'
             WHEN i.status = 'uncollectible' AND length(i.id) % 3 = 0 THEN 'hard_decline'
             ELSE 'soft_decline' END,
        CASE WHEN paid_first THEN NULL ELSE 'insufficient_funds' END,
        'scheduled', i.finalized_at, i.finalized_at
    FROM (
        SELECT *, status = 'paid' AND hashtext(id) % 10 <> 0 AS paid_first
        FROM invoices WHERE id LIKE 'in_bulk_%' AND status <> 'void'
    ) AS i
    """,
    """
    INSERT INTO payment_attempts (id, invoice_id, attempt_number, idempotency_key, amount_minor,
        currency, status, outcome, reason, created_at, completed_at)
    SELECT 'pa_' || id || '_2', id, 2, id || '-attempt-2', amount_due_minor, currency,
        'succeeded', 'paid', 'retry', finalized_at + interval '3 days',
        finalized_at + interval '3 days'
    FROM invoices
    WHERE id LIKE 'in_bulk_%' AND status = 'paid' AND hashtext(id) % 10 = 0
    """,
    """
    INSERT INTO payments (id, invoice_id, attempt_id, stripe_payment_intent_id,
        stripe_charge_id, amount_minor, currency, fee_minor, net_minor,
        settlement_amount_minor, settlement_currency, settled_at)
    SELECT 'py_' || i.id, i.id, a.id, 'pi_' || i.id, 'ch_' || i.id, i.amount_due_minor,
        i.currency, i.amount_due_minor * 29 / 1000 + 30,
        i.amount_due_minor - (i.amount_due_minor * 29 / 1000 + 30), i.amount_due_minor,
        i.currency, a.completed_at
    FROM invoices i JOIN payment_attempts a ON a.invoice_id = i.id AND a.outcome = 'paid'
    WHERE i.id LIKE 'in_bulk_%'
    """,
]


def load_report_facts(engine: Any) -> float:
    """Add status changes, attempts and payments to a bulk-loaded book. Seconds taken."""
    started = time.perf_counter()
    with engine.begin() as connection:
        for statement in FACTS:
            connection.execute(text(statement))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(
            text("VACUUM ANALYZE subscription_status_changes, payment_attempts, payments")
        )
    return time.perf_counter() - started


async def dashboard_cookie(http: httpx.AsyncClient, key: str) -> dict[str, str]:
    """Sign in to the dashboard as a browser does; the session cookie."""
    form = await http.get("/dashboard/login")
    token = form.text.split('name="login_token" value="', 1)[1].split('"', 1)[0]
    signed = await http.post(
        "/dashboard/login",
        data={"api_key": key, "login_token": token},
        cookies=dict(form.cookies),
    )
    if signed.status_code != 303:
        raise SystemExit(f"dashboard sign-in failed: {signed.status_code}")
    return {"billing_dashboard_session": signed.cookies["billing_dashboard_session"]}


async def time_reports(
    http: httpx.AsyncClient,
    key: str,
    repeat: int,
    log: Callable[[str], None],
    *,
    only: list[str] | None = None,
) -> dict[str, Any]:
    """p50/p99 of each report request (or those in ``only``), asked ``repeat`` times one at a
    time."""
    headers = {"Authorization": f"Bearer {key}"}
    cookies = await dashboard_cookie(http, key)
    figures: dict[str, Any] = {}
    for name, (path, params) in REPORT_REQUESTS.items():
        if only and name not in only:
            continue
        latencies = []
        for _ in range(repeat):
            started = time.perf_counter()
            if path.startswith("/dashboard"):
                response = await http.get(path, params=params, cookies=cookies)
            else:
                response = await http.get(path, params=params, headers=headers)
            latencies.append((time.perf_counter() - started) * 1000)
            if response.status_code != 200:
                raise SystemExit(f"{path} failed: {response.status_code} {response.text[:300]}")
        figures[f"report_{name}_p50_ms"] = round(percentile(latencies, 50), 1)
        figures[f"report_{name}_p99_ms"] = round(percentile(latencies, 99), 1)
        log(f"reports: {name} p50 {figures[f'report_{name}_p50_ms']} ms")
    return figures


@contextmanager
def _kept_database(name: str) -> Iterator[tuple[str, bool]]:
    """The URL of database ``name`` on the bench's PostgreSQL server, created if absent, never
    dropped; and whether it was just created (and so still needs migrating and loading)."""
    from billing.testing.database import DEFAULT_ADMIN_URL
    from db.engine import normalize_url

    admin = normalize_url(DEFAULT_ADMIN_URL)
    admin_engine = create_engine(admin, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with admin_engine.connect() as connection:
            exists = connection.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}
            ).first()
            if exists is None:
                connection.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin_engine.dispose()
    yield admin.set(database=name).render_as_string(hide_password=False), exists is None


async def _standalone(
    invoices: int, repeat: int, keep: str | None, only: list[str] | None
) -> dict[str, Any]:
    from bench import Stack, bulk_load_invoices
    from pydantic import SecretStr
    from temporalio.client import Client

    from billing.api import create_app
    from billing.devstack import migrate_and_seed
    from billing.settings import ApiKey, Settings
    from billing.testing.database import temporary_database
    from billing.worker import build_dependencies

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    key = "bench-finance-key-0123456789abcdef"
    database = (
        _kept_database(keep)
        if keep
        else _fresh(temporary_database("postgres", migrate=False, name_prefix="bench_"))
    )
    with database as (url, new):
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            database_url=url,
            api_keys=[ApiKey(name="bench", scope="finance", key=SecretStr(key))],
        )
        stack = Stack(Path("."), "127.0.0.1:1", url)
        try:
            if new:
                migrate_and_seed(settings)
                load_s = bulk_load_invoices(stack, invoices)
                facts_s = load_report_facts(stack.engine)
                log(f"reports: loaded in {load_s:.1f} s + {facts_s:.1f} s")
            else:
                # A kept book is used as it is, at whatever revision it is (so the same book
                # can be timed by two versions of the code, before and after a migration).
                log(f"reports: reusing the book in {keep}")
            with stack.engine.connect() as connection:
                [(in_db,)] = connection.execute(text("SELECT count(*) FROM invoices"))
                revision = connection.execute(
                    text("SELECT version_num FROM alembic_version")
                ).scalar()
            log(f"reports: {in_db} invoices, revision {revision}")
            # Reports never call Temporal: a client that connects lazily to nothing will do.
            temporal = await Client.connect("127.0.0.1:1", lazy=True)
            app = create_app(settings, deps=build_dependencies(settings), temporal=temporal)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:
                figures = await time_reports(http, key, repeat, log, only=only)
            return {"invoices_in_db": in_db, "revision": revision, **figures}
        finally:
            stack.close()


@contextmanager
def _fresh(database: AbstractContextManager[str]) -> Iterator[tuple[str, bool]]:
    with database as url:
        yield url, True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--invoices", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument(
        "--keep",
        metavar="NAME",
        help="build the book in database NAME and keep it (no drop); when NAME exists, time "
        "the book in it as it is (not migrated, not loaded)",
    )
    parser.add_argument(
        "--only",
        metavar="REPORT",
        action="append",
        choices=sorted(REPORT_REQUESTS),
        help="time only this report (repeatable); default: all",
    )
    args = parser.parse_args()
    run: Awaitable[dict[str, Any]] = _standalone(args.invoices, args.repeat, args.keep, args.only)
    print(json.dumps(asyncio.run(run), indent=2))


if __name__ == "__main__":
    main()
