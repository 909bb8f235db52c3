"""What the report rollups' triggers cost the hot write path, on PostgreSQL.

The same writes, through the repositories as the activities make them, each in its own
transaction, with the report triggers switched three ways on one database (``ALTER TABLE ...
DISABLE TRIGGER``, in rounds so the load is shared): none; only migration 0019's
(``report_monthly_totals``); 0019's and 0021's (MRR counts and dunning); and 0023's too (MRR
per month). Writes:

- ``invoice``: an open invoice issued (``issue_invoice``);
- ``charge``: attempt 1 recorded pending, then paid, the invoice marked paid and its payment
  recorded (two transactions, as the charge activity does: before and after the provider);
- ``failed_charge``: attempt 1 recorded pending, then declined (a dunning row is written);
- ``status``: a subscription's status changed and logged (``update_subscription_state``), its
  first change (none logged before: 0023 refreshes its customer twice, on the update and on
  the logged change);
- ``status_again``: the same for a subscription whose first change is logged already (the
  usual case: one refresh);
- ``subscribe``: a subscription inserted (a signup), for a customer of its own;
- ``plan_change``: a subscription's terms changed (another unit amount and seats, synced and
  logged in ``subscription_terms_changes``, migration 0024: its customer refreshed on the
  update and on the logged change).

Every subscription has a customer of its own (0023 recomputes a customer's months whole).

Prints, per write and setting, the mean and p50/p99 milliseconds, and the trigger functions
called per write (``pg_stat_user_functions`` with ``track_functions = 'pl'``).

    .venv/bin/python scripts/bench_report_triggers.py --database-url URL --writes 300

Use a bench database (it writes rows and toggles triggers, and leaves them all enabled).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_signup import percentile

from billing.ids import new_id
from billing.invoices import InvoiceStatus
from billing.payments import ChargeOutcomeKind
from billing.records import AttemptStatus, PaymentAttemptRecord, PaymentRecord
from billing.subscription import SubscriptionStatus
from db.engine import make_engine, make_session_factory, unit_of_work
from db.repositories import attempts, invoices, payments, subscriptions
from tests.db.conftest import Factory

#: (table, trigger) of each setting's enabled report triggers.
TRIGGERS_0019 = [
    (table, f"report_monthly_totals_{table}_{event}")
    for table in ("invoices", "payments", "refunds")
    for event in ("insert", "update", "delete")
]
TRIGGERS_0021 = [
    *(("subscriptions", f"report_mrr_subscriptions_{e}") for e in ("insert", "update", "delete")),
    *(
        ("payment_attempts", f"report_dunning_payment_attempts_{e}")
        for e in ("insert", "update", "delete")
    ),
    ("invoices", "report_dunning_invoices_changed_update"),
]
TRIGGERS_0023 = [
    (table, f"report_mrr_{name}_changed_{e}")
    for table, name in (
        ("subscriptions", "subscriptions"),
        ("subscription_status_changes", "status_changes"),
    )
    for e in ("insert", "update", "delete")
]
#: 0024: the status-change trigger function on the terms log too (the refresh it calls is
#: 0024's computation once the database is at 0024).
TRIGGERS_0024 = [
    ("subscription_terms_changes", f"report_mrr_terms_changes_changed_{e}")
    for e in ("insert", "update", "delete")
]
ALL_TRIGGERS = TRIGGERS_0019 + TRIGGERS_0021 + TRIGGERS_0023 + TRIGGERS_0024
SETTINGS = {
    "no report triggers": [],
    "0019 (monthly totals)": TRIGGERS_0019,
    "0019 + 0021 (and MRR, dunning)": TRIGGERS_0019 + TRIGGERS_0021,
    "all (and MRR per month, 0023 + 0024)": ALL_TRIGGERS,
}


def switch(engine: Any, enabled: list[tuple[str, str]]) -> None:
    with engine.begin() as connection:
        for table, trigger in ALL_TRIGGERS:
            state = "ENABLE" if (table, trigger) in enabled else "DISABLE"
            connection.execute(text(f"ALTER TABLE {table} {state} TRIGGER {trigger}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--writes", type=int, default=300, help="per write kind and setting")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", action="append", help="a write kind (repeatable); all if none")
    parser.add_argument(
        "--settings",
        default=None,
        help="comma-separated setting numbers to run (1 none, 2 0019, 3 0019+0021, 4 all)",
    )
    args = parser.parse_args()
    engine = make_engine(args.database_url)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        # Per database, for the counters of trigger function calls (new connections).
        name = connection.execute(text("SELECT current_database()")).scalar_one()
        connection.execute(text(f"ALTER DATABASE \"{name}\" SET track_functions = 'pl'"))
    engine.dispose()
    # One connection: the backend that writes is the one whose counters are flushed and read.
    engine = make_engine(args.database_url, pool_size=1, max_overflow=0)
    factory = make_session_factory(engine)
    maker = Factory()
    at = datetime(2027, 3, 1, tzinfo=UTC)
    open_invoices: list[Any] = []

    def new_sub() -> Any:
        with unit_of_work(factory) as session:
            return maker.subscription(session, maker.customer(session), created_at=at)

    fresh_subs: list[Any] = []

    def invoice_write() -> None:
        sub = fresh_subs.pop()
        with unit_of_work(factory) as session:
            record = dataclasses.replace(
                maker.invoice_record(sub, 0, created_at=at, amount_due_minor=900),
                status=InvoiceStatus.OPEN,
                finalized_at=at,
            )
            open_invoices.append(invoices.issue_invoice(session, record)[0])

    def attempt(outcome: ChargeOutcomeKind) -> None:
        invoice = open_invoices.pop()
        with unit_of_work(factory) as session:  # before the provider is called
            record, _ = attempts.insert_pending_attempt(
                session,
                PaymentAttemptRecord(
                    id=new_id("pa"),
                    invoice_id=invoice.id,
                    attempt_number=1,
                    idempotency_key=f"{invoice.id}-attempt-1",
                    amount_minor=invoice.amount_due_minor,
                    currency=invoice.currency,
                    reason="scheduled",
                    created_at=at,
                ),
            )
        with unit_of_work(factory) as session:  # after it answered
            paid = outcome == ChargeOutcomeKind.PAID
            attempts.record_attempt_outcome(
                session,
                record.id,
                status=AttemptStatus.SUCCEEDED if paid else AttemptStatus.FAILED,
                outcome=outcome,
                decline_code=None if paid else "insufficient_funds",
                failure_message=None,
                payment_intent_id=f"pi_{record.id}",
                charge_id=f"ch_{record.id}",
                payment_method_id=None,
                completed_at=at,
            )
            if paid:
                invoices.transition_invoice(session, invoice.id, to=InvoiceStatus.PAID, at=at)
                payments.insert_payment(
                    session,
                    PaymentRecord(
                        id=new_id("py"),
                        invoice_id=invoice.id,
                        attempt_id=record.id,
                        stripe_payment_intent_id=f"pi_{record.id}",
                        stripe_charge_id=f"ch_{record.id}",
                        amount_minor=invoice.amount_due_minor,
                        currency=invoice.currency,
                        fee_minor=56,
                        net_minor=invoice.amount_due_minor - 56,
                        settlement_amount_minor=invoice.amount_due_minor,
                        settlement_currency=invoice.currency,
                        settled_at=at,
                    ),
                )

    status_subs: list[Any] = []

    def sync(sub: Any, status: SubscriptionStatus, terms: dict[str, object] | None) -> None:
        """The workflow's sync of ``sub``: its status and, for a plan change, its terms."""
        with unit_of_work(factory) as session:
            subscriptions.update_subscription_state(
                session,
                sub.id,
                status=status,
                current_period_start=None,
                current_period_end=None,
                next_billing_at=at + timedelta(days=30),
                cancel_at_period_end=False,
                canceled_at=None,
                ended_at=None,
                paused_at=None,
                cancel_reason=None,
                now=at,
                changed_at=at,
                terms=terms,
            )

    def status_write(sub: Any = None) -> None:
        sub = sub or status_subs.pop()
        active = sub.status == SubscriptionStatus.ACTIVE
        sync(sub, SubscriptionStatus.PAST_DUE if active else SubscriptionStatus.ACTIVE, None)

    def plan_change() -> None:
        sub = status_subs.pop()
        sync(
            sub,
            sub.status,
            {"amount_minor": sub.amount_minor + 1000, "quantity": sub.quantity + 1},
        )

    kinds: dict[str, Callable[[], None]] = {
        "invoice": invoice_write,
        "charge": lambda: attempt(ChargeOutcomeKind.PAID),
        "failed_charge": lambda: attempt(ChargeOutcomeKind.SOFT_DECLINE),
        "status": status_write,
        "status_again": status_write,
        "subscribe": new_sub,
        "plan_change": plan_change,
    }
    if args.only:
        kinds = {k: v for k, v in kinds.items() if k in args.only}
    timings: dict[tuple[str, str], list[float]] = {}
    calls: dict[tuple[str, str], dict[str, tuple[int, float]]] = {}
    try:
        chosen = list(SETTINGS.items())
        if args.settings:
            chosen = [chosen[int(n) - 1] for n in args.settings.split(",")]
        for _ in range(args.rounds):
            for setting, enabled in chosen:
                switch(engine, enabled)
                for kind, write in kinds.items():
                    # Setup outside the timing: invoices to charge, subscriptions to change.
                    fresh_subs[:] = [new_sub() for _ in range(args.writes)]
                    if kind in ("charge", "failed_charge"):
                        for _ in range(args.writes):
                            invoice_write()
                    if kind in ("status", "status_again", "plan_change"):
                        status_subs[:] = [new_sub() for _ in range(args.writes)]
                    if kind == "status_again":
                        # Each changed once already (logged), then back where it was.
                        for sub in status_subs:
                            status_write(sub)
                            status_write(
                                dataclasses.replace(sub, status=SubscriptionStatus.PAST_DUE)
                            )
                    with engine.connect() as connection:
                        before = _function_calls(connection)
                    for _ in range(args.writes):
                        started = time.perf_counter()
                        write()
                        timings.setdefault((setting, kind), []).append(
                            (time.perf_counter() - started) * 1000
                        )
                    with engine.connect() as connection:
                        after = _function_calls(connection)
                    total = calls.setdefault((setting, kind), {})
                    for name, (n, ms) in after.items():
                        was_n, was_ms = before.get(name, (0, 0.0))
                        n_ms = total.get(name, (0, 0.0))
                        total[name] = (n_ms[0] + n - was_n, n_ms[1] + ms - was_ms)
                    if kind == "invoice":
                        open_invoices.clear()
    finally:
        switch(engine, ALL_TRIGGERS)
    report = {}
    writes = args.writes * args.rounds
    for (setting, kind), values in timings.items():
        report[f"{kind} / {setting}"] = {
            "mean_ms": round(sum(values) / len(values), 2),
            "p50_ms": round(percentile(values, 50), 2),
            "p99_ms": round(percentile(values, 99), 2),
            # Per write: how many times each trigger function ran, and the milliseconds the
            # ones a write fires directly took in the server (report_dunning_refresh and
            # report_mrr_refresh run inside the trigger functions, which count them).
            "trigger_calls_per_write": {
                name: round(n / writes, 2) for name, (n, _) in calls[(setting, kind)].items() if n
            },
            "trigger_ms_per_write": round(
                sum(
                    ms
                    for name, (_, ms) in calls[(setting, kind)].items()
                    if name not in ("report_dunning_refresh", "report_mrr_refresh")
                )
                / writes,
                3,
            ),
        }
    print(json.dumps(report, indent=2))


def _function_calls(connection: Any) -> dict[str, tuple[int, float]]:
    """(calls, total ms) of each report trigger function so far in this database (the bench is
    alone on it): this backend's counters, flushed at the end of the transaction before."""
    connection.execute(text("SELECT pg_stat_force_next_flush()"))
    connection.commit()
    return {
        name: (int(calls), float(total))
        for name, calls, total in connection.execute(
            text(
                "SELECT funcname, calls, total_time FROM pg_stat_user_functions "
                "WHERE funcname LIKE 'report%'"
            )
        )
    }


if __name__ == "__main__":
    main()
