"""The monthly totals the database keeps for collected vs invoiced (``report_monthly_totals``,
migration 0019's triggers) never disagree with the invoices, payments and refunds they sum:
after any sequence of writes through the repositories (issue, finalize, pay, lower the amount
due, void, write off, refund and its outcome, a rolled-back transaction), the report read from
the totals equals the report computed from the rows, on SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
import threading
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, delete, select, text
from sqlalchemy.orm import Session, sessionmaker

from billing import reporting
from billing.credit_notes import RefundSource, RefundStatus
from billing.errors import BillingError
from billing.ids import new_id
from billing.invoices import InvoiceStatus
from billing.records import InvoiceRecord, RefundRecord
from billing.refunds import ProviderRefund
from billing.reports import Month
from db.base import Base
from db.engine import make_session_factory, unit_of_work
from db.models import INVOICES, REFUNDS, REPORT_MONTHLY_TOTALS, REPORT_ROLLUPS
from db.repositories import attempts, credit_notes, invoices, payments
from tests.db.conftest import Factory

#: Instants around two month ends, written in zones whose local month differs from UTC's.
ZONES = ("UTC", "Asia/Tokyo", "America/Los_Angeles", "Asia/Kuwait")
BASE = datetime(2026, 1, 31, 12, tzinfo=UTC)
CURRENCIES = ("USD", "JPY", "KWD")
EVERY_MONTH = reporting.MonthRange(Month(2025, 12), Month(2026, 4))

instants = st.builds(
    lambda hours, zone: (BASE + timedelta(hours=hours)).astimezone(ZoneInfo(zone)),
    st.integers(min_value=-40, max_value=24 * 31),
    st.sampled_from(ZONES),
)
ops = st.one_of(
    st.tuples(
        st.just("issue"),
        st.sampled_from(CURRENCIES),
        st.integers(0, 10**7),
        instants,
        st.booleans(),  # finalized at once (else a draft)
    ),
    st.tuples(st.just("finalize"), st.integers(0, 50)),
    st.tuples(
        st.just("pay"),
        st.integers(0, 50),
        instants,
        st.one_of(st.none(), st.integers(0, 5000)),
        st.sampled_from((None, "USD", "EUR", "JPY")),
    ),
    st.tuples(st.just("void"), st.integers(0, 50), instants),
    st.tuples(st.just("write_off"), st.integers(0, 50), instants),
    st.tuples(st.just("lower"), st.integers(0, 50), st.integers(1, 10**6)),
    st.tuples(
        st.just("refund"),
        st.integers(0, 50),
        st.integers(1, 10**6),
        instants,
        st.sampled_from((RefundStatus.SUCCEEDED, RefundStatus.FAILED, RefundStatus.PENDING)),
    ),
    st.tuples(st.just("refund_outcome"), st.integers(0, 50), instants, st.booleans()),
    st.tuples(st.just("rolled_back"), st.sampled_from(CURRENCIES), st.integers(1, 10**6)),
)


def _empty(factory: sessionmaker[Session]) -> None:
    with unit_of_work(factory) as session:
        for table in reversed(Base.metadata.sorted_tables):
            if table not in REPORT_ROLLUPS:
                session.execute(delete(table))
        for table in REPORT_ROLLUPS:
            session.execute(delete(table))


def _apply(session: Session, op: tuple, made: list[InvoiceRecord], refunds: list[str]) -> None:
    factory = Factory()
    kind = op[0]
    if kind == "issue":
        _, currency, amount, created, finalized = op
        subscription = factory.subscription(session, currency=currency, amount_minor=amount)
        record = factory.invoice_record(subscription, created_at=created, amount_due_minor=amount)
        if finalized:
            record = dataclasses.replace(record, status=InvoiceStatus.OPEN, finalized_at=created)
        issued, _ = invoices.issue_invoice(session, record)
        made.append(issued)
        return
    if kind == "rolled_back":
        return
    if not made:
        return
    invoice = invoices.get_invoice(session, made[op[1] % len(made)].id)
    assert invoice is not None
    if kind == "finalize":
        invoices.transition_invoice(
            session, invoice.id, to=InvoiceStatus.OPEN, at=invoice.created_at
        )
    elif kind == "pay":
        _, _, at, fee, settlement_currency = op
        if invoice.status != InvoiceStatus.OPEN or invoice.amount_due_minor == 0:
            return  # (an invoice lowered to 0 is paid by its credit note, not a payment)
        attempt, _ = attempts.insert_pending_attempt(
            session, factory.attempt_record(invoice, created_at=at)
        )
        invoices.transition_invoice(session, invoice.id, to=InvoiceStatus.PAID, at=at)
        payments.insert_payment(
            session,
            factory.payment_record(
                invoice,
                attempt,
                settled_at=at,
                fee_minor=fee,
                net_minor=None if fee is None else invoice.amount_due_minor - fee,
                settlement_currency=settlement_currency,
                settlement_amount_minor=invoice.amount_due_minor,
            ),
        )
    elif kind == "void":
        invoices.transition_invoice(session, invoice.id, to=InvoiceStatus.VOID, at=op[2])
    elif kind == "write_off":
        invoices.transition_invoice(session, invoice.id, to=InvoiceStatus.UNCOLLECTIBLE, at=op[2])
    elif kind == "lower":
        if invoice.status == InvoiceStatus.OPEN:
            credit_notes.reduce_amount_due(session, invoice, min(op[2], invoice.amount_due_minor))
    elif kind == "refund":
        _, _, amount, at, status = op
        payment = payments.get_payment_for_invoice(session, invoice.id)
        if payment is None:
            return
        refund_id = new_id("rf")
        refund = RefundRecord(
            id=refund_id,
            stripe_refund_id=f"re_{refund_id}",
            invoice_id=invoice.id,
            payment_id=payment.id,
            source=RefundSource.PROVIDER,
            amount_minor=min(amount, payment.amount_minor),
            currency=payment.currency,
            status=RefundStatus.PENDING,
            created_at=at,
            updated_at=at,
        )
        session.execute(REFUNDS.insert(), dataclasses.asdict(refund))
        refunds.append(refund.id)
        if status != RefundStatus.PENDING:
            _outcome(session, refund, status, at)
    elif kind == "refund_outcome":
        if not refunds:
            return
        refund_id = refunds[op[1] % len(refunds)]
        current = credit_notes.get_refund(session, refund_id)
        assert current is not None
        _outcome(session, current, RefundStatus.SUCCEEDED if op[3] else RefundStatus.FAILED, op[2])


def _outcome(session: Session, refund: RefundRecord, status: RefundStatus, at: datetime) -> None:
    credit_notes.record_refund_outcome(
        session,
        refund.id,
        ProviderRefund(
            refund_id=refund.stripe_refund_id or f"re_{refund.id}",
            charge_id=None,
            payment_intent_id=None,
            amount_minor=refund.amount_minor,
            currency=refund.currency,
            status=status,
        ),
        at=at,
    )


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(writes=st.lists(ops, max_size=25))
def test_totals_equal_the_report_computed_from_the_rows(
    engine: Engine, writes: list[tuple]
) -> None:
    factory = make_session_factory(engine)
    _empty(factory)
    try:
        _check(factory, writes)
    finally:
        _empty(factory)


def _check(factory: sessionmaker[Session], writes: list[tuple]) -> None:
    made: list[InvoiceRecord] = []
    refunds: list[str] = []
    for op in writes:
        try:
            with unit_of_work(factory) as session:
                _apply(session, op, made, refunds)
                if op[0] == "rolled_back":
                    # A write whose transaction rolls back leaves no trace in the totals.
                    subscription = Factory().subscription(session, currency=op[1])
                    invoices.issue_invoice(
                        session,
                        dataclasses.replace(
                            Factory().invoice_record(subscription, amount_due_minor=op[2]),
                            status=InvoiceStatus.OPEN,
                        ),
                    )
                    raise _RollBack
        except _RollBack:
            pass
        except BillingError:
            pass  # a transition the lifecycle refuses (e.g. voiding a paid invoice)
    for months in (
        EVERY_MONTH,
        reporting.MonthRange(Month(2026, 2), Month(2026, 2)),
        *(dataclasses.replace(EVERY_MONTH, currency=c) for c in (*CURRENCIES, "EUR")),
    ):
        assert reporting.collections(factory, months) == reporting.collections(
            factory, months, from_rows=True
        )
    with unit_of_work(factory) as session:
        # Nothing outside the report's months either.
        totals = session.execute(select(REPORT_MONTHLY_TOTALS)).all()
        assert all(row.month >= "2025-12" and row.month <= "2026-04" for row in totals)
        issued = session.execute(select(INVOICES.c.id)).all()
        assert len(issued) == len(made)


class _RollBack(Exception):
    pass


def _zoned(text: str, zone: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone))


def test_zero_and_three_decimal_currencies_across_month_ends_in_local_zones(
    session_factory: sessionmaker[Session],
) -> None:
    """Hand-computed: months are UTC months whatever zone an instant was written in; JPY and
    KWD amounts are their minor units as they are (yen, fils); a void and a refund after the
    month end count where they belong."""
    factory = Factory()
    with unit_of_work(session_factory) as session:
        jpy = factory.subscription(session, currency="JPY", amount_minor=1500)
        kwd = factory.subscription(session, currency="KWD", amount_minor=12345)

        def issue(sub: object, amount: int, created: datetime, period: int) -> InvoiceRecord:
            record = factory.invoice_record(
                sub,  # type: ignore[arg-type]
                period,
                created_at=created,
                amount_due_minor=amount,
                status=InvoiceStatus.OPEN,
                finalized_at=created,
            )
            return invoices.issue_invoice(session, record)[0]

        def pay(invoice: InvoiceRecord, at: datetime, fee: int, settled_in: str) -> str:
            attempt, _ = attempts.insert_pending_attempt(
                session, factory.attempt_record(invoice, created_at=at)
            )
            invoices.transition_invoice(session, invoice.id, to=InvoiceStatus.PAID, at=at)
            payment, _ = payments.insert_payment(
                session,
                factory.payment_record(
                    invoice, attempt, settled_at=at, fee_minor=fee, settlement_currency=settled_in
                ),
            )
            return payment.id

        # ¥1,500 issued Jan 31 23:30 in New York = Feb 1 04:30 UTC: February's.
        yen = issue(jpy, 1500, _zoned("2026-01-31T23:30", "America/New_York"), 0)
        # ...and paid at 08:00 on Feb 1 in Tokyo = Jan 31 23:00 UTC: collected in January
        # (a payment before its invoice in UTC months is what the stamps say), fee ¥45.
        pay(yen, _zoned("2026-02-01T08:00", "Asia/Tokyo"), 45, "JPY")
        # KWD 12.345 issued Feb 28 23:00 in Kuwait (= 20:00 UTC), paid Mar 1 02:00 there (=
        # Feb 28 23:00 UTC): both February's; the fee, 40 US cents, in the settlement currency.
        dinar = issue(kwd, 12345, _zoned("2026-02-28T23:00", "Asia/Kuwait"), 1)
        payment_id = pay(dinar, _zoned("2026-03-01T02:00", "Asia/Kuwait"), 40, "USD")
        # KWD 5.000 issued Feb 10, voided Mar 5 (after February closed): not invoiced at all.
        voided = issue(kwd, 5000, datetime(2026, 2, 10, tzinfo=UTC), 2)
        invoices.transition_invoice(
            session, voided.id, to=InvoiceStatus.VOID, at=datetime(2026, 3, 5, tzinfo=UTC)
        )
        # KWD 2.345 refunded of the February payment, completed Mar 31 23:30 in New York = Apr
        # 1 03:30 UTC: April's refund, whatever month the payment was.
        refund_at = _zoned("2026-03-31T23:30", "America/New_York")
        session.execute(
            REFUNDS.insert(),
            dataclasses.asdict(
                RefundRecord(
                    id="rf_kwd",
                    invoice_id=dinar.id,
                    payment_id=payment_id,
                    source=RefundSource.PROVIDER,
                    amount_minor=2345,
                    currency="KWD",
                    status=RefundStatus.SUCCEEDED,
                    created_at=refund_at,
                    updated_at=refund_at,
                    stripe_refund_id="re_kwd",
                    completed_at=refund_at,
                )
            ),
        )
    months = reporting.MonthRange(Month(2026, 1), Month(2026, 4))
    rows = reporting.collections(session_factory, months)
    got = {
        (str(r.month), r.currency): (
            r.invoiced_minor,
            r.invoices,
            r.collected_minor,
            r.payments,
            r.refunded_minor,
            r.refunds,
            r.net_collected_minor,
            r.fees_minor,
        )
        for r in rows
        if r.invoices or r.payments or r.refunds or r.fees_minor
    }
    assert got == {
        ("2026-01", "JPY"): (0, 0, 1500, 1, 0, 0, 1500, 45),
        ("2026-02", "JPY"): (1500, 1, 0, 0, 0, 0, 0, 0),
        ("2026-02", "KWD"): (12345, 1, 12345, 1, 0, 0, 12345, 0),
        ("2026-04", "KWD"): (0, 0, 0, 0, 2345, 1, -2345, 0),
        ("2026-02", "USD"): (0, 0, 0, 0, 0, 0, 0, 40),
    }
    # Every month of every currency with a figure is listed, the others as 0.
    assert len(rows) == 3 * 4
    assert rows == reporting.collections(session_factory, months, from_rows=True)


def test_every_report_on_an_empty_database(session_factory: sessionmaker[Session]) -> None:
    months = reporting.MonthRange(Month(2026, 1), Month(2026, 12))
    now = datetime(2026, 12, 7, tzinfo=UTC)
    assert reporting.collections(session_factory, months) == []
    assert reporting.mrr(session_factory, months) == []
    assert reporting.aging(session_factory, as_of=None, currency=None, now=now) == (now, [])
    report = reporting.dunning(session_factory, months)
    assert (report.rows, report.written_off) == ([], [])


def test_twenty_writers_at_once_are_all_counted(
    backend: str, session_factory: sessionmaker[Session]
) -> None:
    """Twenty transactions at once, each issuing and paying an invoice in the same two months
    (one crosses into the other in UTC): the month rows they all update count every one, and
    none deadlocks (each statement takes its rows in key order)."""
    if backend != "postgres":
        pytest.skip("SQLite has one writer at a time")
    factory = Factory()
    with unit_of_work(session_factory) as session:
        subs = [factory.subscription(session) for _ in range(20)]
    barrier = threading.Barrier(20)
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            barrier.wait()
            with unit_of_work(session_factory) as session:
                created = datetime(2026, 1, 31, 23, tzinfo=UTC) + timedelta(minutes=n)
                record = dataclasses.replace(
                    factory.invoice_record(subs[n], created_at=created, amount_due_minor=100 + n),
                    status=InvoiceStatus.OPEN,
                    finalized_at=created,
                )
                invoice, _ = invoices.issue_invoice(session, record)
                paid_at = created + timedelta(hours=1)
                attempt, _ = attempts.insert_pending_attempt(
                    session, factory.attempt_record(invoice, created_at=paid_at)
                )
                invoices.transition_invoice(session, invoice.id, to=InvoiceStatus.PAID, at=paid_at)
                payments.insert_payment(
                    session,
                    factory.payment_record(
                        invoice, attempt, settled_at=paid_at, fee_minor=3, settlement_currency="USD"
                    ),
                )
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    months = reporting.MonthRange(Month(2026, 1), Month(2026, 2))
    rows = reporting.collections(session_factory, months)
    assert rows == reporting.collections(session_factory, months, from_rows=True)
    assert sum(r.invoices for r in rows) == sum(r.payments for r in rows) == 20
    assert sum(r.invoiced_minor for r in rows) == sum(100 + n for n in range(20))
    assert sum(r.fees_minor for r in rows) == 60


def test_a_transaction_in_flight_does_not_hold_the_month_for_others(
    backend: str, session_factory: sessionmaker[Session]
) -> None:
    """A transaction that issued an invoice and has not committed yet (a charge waiting for
    Stripe, say) must not make every other writer of the same month and currency wait: the
    month is kept in several rows on PostgreSQL, one per connection's slot."""
    if backend != "postgres":
        pytest.skip("SQLite has one writer at a time")
    factory = Factory()
    with unit_of_work(session_factory) as session:
        first, second = factory.subscription(session), factory.subscription(session)
    created = datetime(2026, 3, 10, 12, tzinfo=UTC)
    holder = session_factory()
    others: list[Session] = []
    try:
        holder_slot = holder.execute(text("SELECT pg_backend_pid() % 16")).scalar_one()
        invoices.issue_invoice(
            holder,
            dataclasses.replace(
                factory.invoice_record(first, created_at=created, amount_due_minor=500),
                status=InvoiceStatus.OPEN,
                finalized_at=created,
            ),
        )
        holder.flush()
        # A connection of another slot (each new session gets its own connection while the
        # others are held open).
        while True:
            other = session_factory()
            others.append(other)
            if other.execute(text("SELECT pg_backend_pid() % 16")).scalar_one() != holder_slot:
                break
        other.execute(text("SET LOCAL lock_timeout = '3s'"))
        invoices.issue_invoice(
            other,
            dataclasses.replace(
                factory.invoice_record(second, created_at=created, amount_due_minor=700),
                status=InvoiceStatus.OPEN,
                finalized_at=created,
            ),
        )
        other.commit()
        holder.commit()
    finally:
        holder.close()
        for session in others:
            session.close()
    months = reporting.MonthRange(Month(2026, 3), Month(2026, 3))
    rows = reporting.collections(session_factory, months)
    assert rows == reporting.collections(session_factory, months, from_rows=True)
    assert sum(r.invoiced_minor for r in rows) == 1200
