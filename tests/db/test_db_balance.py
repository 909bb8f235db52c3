"""Invoice lines and the customer's credit balance, on SQLite and PostgreSQL.

An invoice's totals come from its lines; the customer's credit pays what it can when the
invoice is issued (under the customer's row lock, so two invoices cannot spend one credit);
a voided invoice gives its credit back; every entry is recorded once per decision.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from billing.balance import BalanceEntryKind
from billing.errors import InvalidInput
from billing.invoices import InvoiceLine, InvoiceLineKind, InvoiceStatus
from billing.records import SubscriptionRecord
from db.engine import unit_of_work
from db.migrate import upgrade
from db.repositories import balances, invoices
from tests.db.conftest import T0, Factory

factory = Factory()


def _grant(
    session: Session, customer_id: str, amount: int, key: str, currency: str = "USD"
) -> None:
    balances.record_entry(
        session,
        customer_id=customer_id,
        currency=currency,
        amount_minor=amount,
        kind=BalanceEntryKind.PRORATION_CREDIT,
        source_key=key,
        description="unused time",
        at=T0,
    )


def _issue(
    session: Session, subscription: SubscriptionRecord, period_index: int, lines: list[int]
) -> tuple[object, bool]:
    record = factory.invoice_record(subscription, period_index, status=InvoiceStatus.OPEN)
    drafts = [
        InvoiceLine(
            kind=InvoiceLineKind.SUBSCRIPTION if i == 0 else InvoiceLineKind.PRORATION,
            description=f"line {i}",
            amount_minor=amount,
            period_start=record.period_start,
            period_end=record.period_end,
        )
        for i, amount in enumerate(lines)
    ]
    return invoices.issue_invoice(session, record, drafts)


def test_an_invoice_without_lines_gets_its_subscription_line(session: Session) -> None:
    invoice = factory.invoice(session)
    lines = invoices.list_invoice_lines(session, invoice.id)
    assert [(line.position, line.kind, line.amount_minor) for line in lines] == [
        (1, InvoiceLineKind.SUBSCRIPTION, 2900)
    ]
    assert lines[0].id == "il_" + invoice.id.removeprefix("in_")
    assert (invoice.subtotal_minor, invoice.credit_applied_minor, invoice.amount_due_minor) == (
        2900,
        0,
        2900,
    )


def test_totals_come_from_the_lines_and_the_balance_pays_first(session: Session) -> None:
    subscription = factory.subscription(session)
    _grant(session, subscription.customer_id, 500, "grant-1")

    first, created = _issue(session, subscription, 0, [2900, -2500])  # subtotal 400
    assert created
    assert (first.subtotal_minor, first.credit_applied_minor, first.amount_due_minor) == (  # type: ignore[attr-defined]
        400,
        400,
        0,
    )
    assert first.status == InvoiceStatus.PAID  # type: ignore[attr-defined]
    assert balances.credit_balance(session, subscription.customer_id, "USD") == 100

    second, _ = _issue(session, subscription, 1, [2900])
    assert (second.credit_applied_minor, second.amount_due_minor, second.status) == (  # type: ignore[attr-defined]
        100,
        2800,
        InvoiceStatus.OPEN,
    )
    assert balances.credit_balance(session, subscription.customer_id, "USD") == 0
    kinds = [e.kind for e in balances.list_entries(session, subscription.customer_id)]
    assert kinds == [
        BalanceEntryKind.PRORATION_CREDIT,
        BalanceEntryKind.APPLIED_TO_INVOICE,
        BalanceEntryKind.APPLIED_TO_INVOICE,
    ]


def test_a_negative_subtotal_owes_nothing_and_becomes_credit(session: Session) -> None:
    subscription = factory.subscription(session)
    invoice, _ = _issue(session, subscription, 0, [1000, -1600])
    assert (invoice.subtotal_minor, invoice.amount_due_minor, invoice.status) == (  # type: ignore[attr-defined]
        -600,
        0,
        InvoiceStatus.PAID,
    )
    assert balances.credit_balance(session, subscription.customer_id, "USD") == 600
    # Credit in another currency is another balance.
    assert balances.credit_balance(session, subscription.customer_id, "EUR") == 0
    assert balances.credit_balances(session, subscription.customer_id) == {"USD": 600}


def test_issuing_twice_writes_lines_and_entries_once(session: Session) -> None:
    subscription = factory.subscription(session)
    _grant(session, subscription.customer_id, 300, "grant-1")
    first, created = _issue(session, subscription, 0, [2900, 100])
    again, created_again = _issue(session, subscription, 0, [2900, 100])
    assert created and not created_again and again == first
    assert len(invoices.list_invoice_lines(session, first.id)) == 2  # type: ignore[attr-defined]
    assert balances.credit_balance(session, subscription.customer_id, "USD") == 0


def test_voiding_gives_the_applied_credit_back_once(session: Session) -> None:
    subscription = factory.subscription(session)
    _grant(session, subscription.customer_id, 700, "grant-1")
    invoice, _ = _issue(session, subscription, 0, [2900])
    assert balances.credit_balance(session, subscription.customer_id, "USD") == 0
    for _ in range(2):
        invoices.transition_invoice(
            session,
            invoice.id,  # type: ignore[attr-defined]
            to=InvoiceStatus.VOID,
            at=T0 + timedelta(days=1),
        )
    assert balances.credit_balance(session, subscription.customer_id, "USD") == 700


def test_entries_are_recorded_once_per_decision_and_never_overdrawn(session: Session) -> None:
    customer = factory.customer(session)
    _grant(session, customer.id, 250, "grant-1")
    _grant(session, customer.id, 250, "grant-1")  # a retry: no second credit
    assert balances.credit_balance(session, customer.id, "USD") == 250
    with pytest.raises(InvalidInput, match="already recorded as 250"):
        _grant(session, customer.id, 999, "grant-1")
    with pytest.raises(InvalidInput, match="has 250 minor units of USD credit; 251"):
        balances.record_entry(
            session,
            customer_id=customer.id,
            currency="USD",
            amount_minor=-251,
            kind=BalanceEntryKind.ADJUSTMENT,
            source_key="too-much",
            description="",
            at=T0,
        )
    for bad in (0, True, 1.5):
        with pytest.raises(InvalidInput, match="non-zero whole number"):
            _grant(session, customer.id, bad, f"bad-{bad}")  # type: ignore[arg-type]
    assert balances.credit_balance(session, customer.id, "USD") == 250


def test_two_invoices_issued_at_once_cannot_spend_one_credit(
    backend: str, session_factory: sessionmaker[Session], engine: Engine
) -> None:
    """Two subscriptions of one customer renew at the same instant with 500 of credit and
    400 due each: one invoice takes 400, the other the remaining 100, never 400 + 400."""
    with unit_of_work(session_factory) as session:
        customer = factory.customer(session)
        subs = [factory.subscription(session, customer) for _ in range(2)]
        _grant(session, customer.id, 500, "grant-1")
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def issue(subscription: SubscriptionRecord) -> None:
        try:
            barrier.wait()
            with unit_of_work(session_factory) as session:
                _issue(session, subscription, 0, [400])
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=issue, args=(s,)) for s in subs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if backend == "sqlite":
        # SQLite has one writer: the loser may be told the database is locked; a retry issues
        # the invoice then (what the activity's retry does).
        for subscription in subs:
            with unit_of_work(session_factory) as session:
                _issue(session, subscription, 0, [400])
    else:
        assert errors == []
    with unit_of_work(session_factory) as session:
        applied = sorted(
            invoices.get_invoice_for_period(session, s.id, s.anchor_at).credit_applied_minor  # type: ignore[union-attr]
            for s in subs
        )
        assert applied == [100, 400]
        assert balances.credit_balance(session, customer.id, "USD") == 0


def test_revision_0010_gives_existing_invoices_their_line(tmp_path: object) -> None:
    url = f"sqlite:///{tmp_path}/billing.sqlite3"
    upgrade(url, "0009")
    from db.engine import make_engine, make_session_factory

    engine = make_engine(url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO customers (id, timezone, invoice_prefix, next_invoice_sequence, "
                "created_at, updated_at) VALUES ('cus_1', 'UTC', 'ABCD2345', 2, :t, :t)"
            ),
            {"t": T0},
        )
    with unit_of_work(make_session_factory(engine)) as session:
        from db.repositories import plans

        plans.upsert_plan(session, factory.plan, now=T0)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO subscriptions (id, customer_id, plan_code, status, amount_minor, "
                "currency, interval, interval_count, timezone, anchor_at, workflow_id, "
                "cancel_at_period_end, created_at, updated_at) VALUES ('sub_1', 'cus_1', "
                "'pro-monthly', 'active', 2900, 'USD', 'month', 1, 'UTC', :t, "
                "'subscription-sub_1', false, :t, :t)"
            ),
            {"t": T0},
        )
        connection.execute(
            text(
                "INSERT INTO invoices (id, number, subscription_id, customer_id, period_index, "
                "period_start, period_end, amount_due_minor, amount_paid_minor, currency, status, "
                "description, created_at) VALUES ('in_abc', 'ABCD2345-0001', 'sub_1', 'cus_1', 0, "
                ":t, :e, 2900, 2900, 'USD', 'paid', 'Pro', :t)"
            ),
            {"t": T0, "e": T0 + timedelta(days=28)},
        )
    engine.dispose()
    upgrade(url)
    engine = make_engine(url)
    with unit_of_work(make_session_factory(engine)) as session:
        invoice = invoices.get_invoice(session, "in_abc")
        assert invoice is not None and invoice.subtotal_minor == 2900
        [line] = invoices.list_invoice_lines(session, "in_abc")
        assert (line.id, line.amount_minor, line.plan_code, line.description) == (
            "il_abc",
            2900,
            "pro-monthly",
            "Pro",
        )
    engine.dispose()
