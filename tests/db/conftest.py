"""Database fixtures: every test runs on SQLite and on PostgreSQL.

The PostgreSQL run is skipped when no server answers, except under ``CI=true``, where an
unreachable server fails the tests: CI must never pass by quietly not testing PostgreSQL.
Set ``BILLING_TEST_POSTGRES_URL`` to use a server other than the local default.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

import pytest
from sqlalchemy import Engine, delete, text
from sqlalchemy.orm import Session, sessionmaker

import db.models  # noqa: F401  (registers every table)
from billing.calendar import IntervalUnit
from billing.ids import invoice_id_for, new_id
from billing.invoices import InvoiceStatus, invoice_prefix_for
from billing.plans import Plan
from billing.records import (
    CustomerRecord,
    InvoiceRecord,
    PaymentAttemptRecord,
    PaymentRecord,
    SubscriptionRecord,
)
from billing.subscription import SubscriptionStatus
from billing.testing.database import DEFAULT_ADMIN_URL, postgres_available, temporary_database
from db.base import Base
from db.engine import make_engine, make_session_factory, unit_of_work
from db.models import REPORT_ROLLUPS
from db.repositories import attempts, customers, invoices, plans, subscriptions

POSTGRES_ADMIN_URL = os.environ.get("BILLING_TEST_POSTGRES_URL", DEFAULT_ADMIN_URL)

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]

#: A fixed instant for test data (aware UTC).
T0 = datetime(2026, 1, 31, 9, 30, tzinfo=UTC)


@cache
def _postgres_up() -> bool:
    return postgres_available(POSTGRES_ADMIN_URL)


def require_backend(backend: str) -> None:
    """Skip (or, under CI=true, fail) when the backend's server is not reachable."""
    if backend != "postgres" or _postgres_up():
        return
    message = (
        f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL}; start it with "
        "`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI=true: the PostgreSQL tests must run, not skip)")
    pytest.skip(message)


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    require_backend(name)
    return name


@pytest.fixture(scope="session")
def admin_url() -> str:
    """Where temporary PostgreSQL databases are created."""
    return POSTGRES_ADMIN_URL


@pytest.fixture(scope="session")
def database_url(backend: str, admin_url: str) -> Iterator[str]:
    """One migrated database per backend for the whole run; tests clean up their rows."""
    with temporary_database(backend, admin_url=admin_url) as url:  # type: ignore[arg-type]
        yield url


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def session_factory(engine: Engine) -> Iterator[sessionmaker[Session]]:
    factory = make_session_factory(engine)
    yield factory
    # Empty every table so the next test starts from nothing; children first, and the
    # report rollups last (deleting their sources writes to them through the triggers of
    # migrations 0019 and 0021, which the ledger's bypass may switch off).
    # The ledger is append-only by trigger (revision 0017): this cleanup, and only it, steps
    # around them.
    with unit_of_work(factory) as session:
        restore = without_append_only_triggers(session)
        for table in reversed(Base.metadata.sorted_tables):
            if table not in REPORT_ROLLUPS:
                session.execute(delete(table))
        for table in REPORT_ROLLUPS:
            session.execute(delete(table))
        for statement in restore:
            session.execute(text(statement))


def without_append_only_triggers(session: Session) -> list[str]:
    """Switch the ledger's append-only triggers off for this transaction (a test's cleanup);
    the statements that put them back (SQLite) are returned."""
    if session.get_bind().dialect.name == "postgresql":
        # Superuser only, and for this transaction only: row triggers do not fire.
        session.execute(text("SET LOCAL session_replication_role = replica"))
        return []
    rows = session.execute(
        text(
            "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' "
            "AND tbl_name = 'ledger_entries'"
        )
    ).all()
    for name, _ in rows:
        session.execute(text(f'DROP TRIGGER "{name}"'))
    return [sql for _, sql in rows]


@pytest.fixture
def session(session_factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session inside one open transaction, committed when the test ends."""
    with unit_of_work(session_factory) as session:
        yield session


# ---- test data ---------------------------------------------------------------------------


class Factory:
    """Builds valid records with plain defaults and stores them; keywords override fields.
    Every method takes the session to write with, so tests that need several sessions
    (concurrency) can use it too."""

    t0 = T0
    plan = Plan("pro-monthly", "Pro (monthly)", 2900, "USD", IntervalUnit.MONTH)

    def customer(self, session: Session, **overrides: Any) -> CustomerRecord:
        customer_id = str(overrides.pop("id", new_id("cus")))
        values: dict[str, Any] = {
            "id": customer_id,
            "invoice_prefix": invoice_prefix_for(customer_id),
            "timezone": "Europe/Berlin",
            "email": "ada@example.com",
            "name": "Ada Lovelace",
            "created_at": T0,
            "updated_at": T0,
            **overrides,
        }
        record, created = customers.insert_customer(session, CustomerRecord(**values))
        assert created
        return record

    def subscription(
        self, session: Session, customer: CustomerRecord | None = None, **overrides: Any
    ) -> SubscriptionRecord:
        customer = customer or self.customer(session)
        if plans.get_plan(session, self.plan.code) is None:
            plans.upsert_plan(session, self.plan, now=T0)
        subscription_id = str(overrides.pop("id", new_id("sub")))
        values: dict[str, Any] = {
            "id": subscription_id,
            "customer_id": customer.id,
            "plan_code": self.plan.code,
            "status": SubscriptionStatus.ACTIVE,
            "amount_minor": self.plan.amount_minor,
            "currency": self.plan.currency,
            "interval": self.plan.interval,
            "interval_count": self.plan.interval_count,
            "timezone": customer.timezone,
            "anchor_at": T0,
            "workflow_id": f"subscription-{subscription_id}",
            "created_at": T0,
            "updated_at": T0,
            **overrides,
        }
        record, created = subscriptions.insert_subscription(session, SubscriptionRecord(**values))
        assert created
        return record

    def invoice_record(
        self, subscription: SubscriptionRecord, period_index: int = 0, **overrides: Any
    ) -> InvoiceRecord:
        """An unsaved draft invoice for the subscription's ``period_index``-th period."""
        start = subscription.anchor_at + timedelta(days=30 * period_index)
        values: dict[str, Any] = {
            "id": invoice_id_for(subscription.id, start),
            "number": "",
            "subscription_id": subscription.id,
            "customer_id": subscription.customer_id,
            "period_index": period_index,
            "period_start": start,
            "period_end": start + timedelta(days=30),
            "amount_due_minor": subscription.amount_minor,
            "currency": subscription.currency,
            "status": InvoiceStatus.DRAFT,
            "description": "Pro (monthly)",
            "created_at": start,
            **overrides,
        }
        return InvoiceRecord(**values)

    def invoice(
        self,
        session: Session,
        subscription: SubscriptionRecord | None = None,
        period_index: int = 0,
        **overrides: Any,
    ) -> InvoiceRecord:
        subscription = subscription or self.subscription(session)
        record, created = invoices.issue_invoice(
            session, self.invoice_record(subscription, period_index, **overrides)
        )
        assert created
        return record

    def attempt_record(
        self, invoice: InvoiceRecord, attempt_number: int = 1, **overrides: Any
    ) -> PaymentAttemptRecord:
        values: dict[str, Any] = {
            "id": new_id("pa"),
            "invoice_id": invoice.id,
            "attempt_number": attempt_number,
            "idempotency_key": f"{invoice.id}-attempt-{attempt_number}",
            "amount_minor": invoice.amount_due_minor,
            "currency": invoice.currency,
            "reason": "scheduled",
            "created_at": T0,
            **overrides,
        }
        return PaymentAttemptRecord(**values)

    def attempt(
        self, session: Session, invoice: InvoiceRecord, attempt_number: int = 1, **overrides: Any
    ) -> PaymentAttemptRecord:
        record, created = attempts.insert_pending_attempt(
            session, self.attempt_record(invoice, attempt_number, **overrides)
        )
        assert created
        return record

    def payment_record(
        self, invoice: InvoiceRecord, attempt: PaymentAttemptRecord, **overrides: Any
    ) -> PaymentRecord:
        values: dict[str, Any] = {
            "id": new_id("py"),
            "invoice_id": invoice.id,
            "attempt_id": attempt.id,
            "stripe_payment_intent_id": f"pi_{attempt.id}",
            "stripe_charge_id": f"ch_{attempt.id}",
            "amount_minor": invoice.amount_due_minor,
            "currency": invoice.currency,
            "settled_at": T0,
            **overrides,
        }
        return PaymentRecord(**values)


@pytest.fixture
def factory() -> Factory:
    return Factory()
