"""The MRR and dunning rollups the database keeps (migration 0021's triggers on
``subscriptions``, ``payment_attempts`` and ``invoices``; 0023's on ``subscriptions`` and
``subscription_status_changes``) never disagree with the rows: after any sequence of writes
through the repositories (subscribe at any price, status changes in and out of order, pauses,
cancels and reactivations, price, quantity, interval and currency changes, a pending signup
deleted, a logged status change deleted, invoices issued, attempts and their outcomes in any
order, invoices paid / voided / written off / lowered, rolled-back transactions), every MRR and
dunning report read from the rollups equals the one computed from the rows, on SQLite and
PostgreSQL, for ranges inside, around and after the book; and each rollup table equals its
definition recomputed from scratch. On PostgreSQL, twenty writers at once; and a database
migrated with data in it is backfilled."""

from __future__ import annotations

import dataclasses
import threading
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, delete, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from billing import reporting
from billing.calendar import IntervalUnit
from billing.errors import BillingError
from billing.invoices import InvoiceStatus
from billing.payments import ChargeOutcomeKind
from billing.records import AttemptStatus, CustomerRecord, SubscriptionRecord
from billing.reports import MRR_STATUSES, Month, monthly_recurring_minor
from billing.subscription import SubscriptionStatus
from billing.testing.database import temporary_database
from db.base import Base
from db.engine import make_engine, make_session_factory, unit_of_work
from db.migrate import upgrade
from db.models import (
    PAYMENT_ATTEMPTS,
    REPORT_DUNNING_INVOICES,
    REPORT_DUNNING_MONTHLY,
    REPORT_MRR_CURRENCY_CUSTOMERS,
    REPORT_MRR_CUSTOMER_MONTHS,
    REPORT_MRR_CUSTOMERS,
    REPORT_MRR_MONTHLY,
    REPORT_MRR_PRICES,
    REPORT_ROLLUPS,
    SUBSCRIPTION_STATUS_CHANGES,
    SUBSCRIPTION_TERMS_CHANGES,
    SUBSCRIPTIONS,
)
from db.repositories import attempts, credit_notes, invoices, subscriptions
from db.repositories import reports as reports_repo
from tests.db.conftest import Factory

ZONES = ("UTC", "Asia/Tokyo", "America/Los_Angeles")
BASE = datetime(2026, 1, 31, 12, tzinfo=UTC)
CURRENCIES = ("USD", "JPY")
#: Half the time a status that counts toward MRR.
STATUSES = st.one_of(
    st.sampled_from(sorted(MRR_STATUSES)), st.sampled_from(tuple(SubscriptionStatus))
)
OUTCOMES = (None, *ChargeOutcomeKind)
#: Reports read back: all the instants, one month in the middle, a range starting after most
#: subscriptions were created (so most are steady), and one currency.
RANGES = (
    reporting.MonthRange(Month(2025, 12), Month(2026, 5)),
    reporting.MonthRange(Month(2026, 2), Month(2026, 2)),
    reporting.MonthRange(Month(2026, 4), Month(2026, 6)),
    reporting.MonthRange(Month(2025, 12), Month(2026, 5), "JPY"),
    # Every instant and more on both sides (the whole book created inside), and after it all.
    reporting.MonthRange(Month(2025, 6), Month(2026, 9)),
    reporting.MonthRange(Month(2026, 6), Month(2026, 8), "USD"),
)

instants = st.builds(
    lambda hours, zone: (BASE + timedelta(hours=hours)).astimezone(ZoneInfo(zone)),
    st.integers(min_value=-60 * 24, max_value=24 * 100),
    st.sampled_from(ZONES),
)
# Prices whose monthly amount is 0 (free, or rounding to nothing) and the edges of half-even.
prices = st.tuples(
    st.sampled_from((0, 1, 2, 3, 6, 900, 12_000)),
    st.sampled_from(tuple(IntervalUnit)),
    st.integers(1, 3),
    st.integers(1, 3),
)
subscription_ops = st.one_of(
    st.tuples(
        st.just("subscribe"),
        st.integers(0, 3),  # customer
        st.sampled_from(CURRENCIES),
        prices,
        STATUSES,
        instants,
    ),
    st.tuples(st.just("status"), st.integers(0, 30), STATUSES, instants),
    st.tuples(
        st.just("terms"),
        st.integers(0, 30),
        st.sampled_from((0, 1, 5, 900)),
        st.integers(1, 4),
        st.one_of(st.none(), st.sampled_from(tuple(IntervalUnit))),
        st.one_of(st.none(), st.sampled_from(CURRENCIES)),
        instants,
    ),
    st.tuples(st.just("delete_pending"), st.integers(0, 30)),
    # Not something the service does; the triggers must follow it all the same.
    st.tuples(st.just("delete_change"), st.integers(0, 30), st.integers(0, 5)),
    st.tuples(st.just("delete_terms_change"), st.integers(0, 30), st.integers(0, 5)),
)
invoice_ops = st.one_of(
    st.tuples(
        st.just("issue"),
        st.integers(0, 30),
        st.integers(0, 10**6),
        instants,
        st.sampled_from(OUTCOMES),  # its first attempt's outcome, mostly a failure
    ),
    st.tuples(st.just("attempt"), st.integers(0, 30), st.sampled_from(OUTCOMES), instants),
    st.tuples(st.just("outcome"), st.integers(0, 30), st.integers(0, 3), st.sampled_from(OUTCOMES)),
    st.tuples(
        st.just("transition"),
        st.integers(0, 30),
        st.sampled_from(
            (
                InvoiceStatus.PAID,
                InvoiceStatus.VOID,
                InvoiceStatus.UNCOLLECTIBLE,
                InvoiceStatus.OPEN,
            )
        ),
        instants,
    ),
    st.tuples(st.just("lower"), st.integers(0, 30), st.integers(1, 10**5)),
    st.tuples(st.just("delete_attempt"), st.integers(0, 30)),
)
ops = st.one_of(
    subscription_ops,
    invoice_ops,
    invoice_ops,
    st.tuples(st.just("rolled_back"), st.one_of(subscription_ops, invoice_ops)),
)


@dataclasses.dataclass
class Book:
    customers: list[CustomerRecord] = dataclasses.field(default_factory=list)
    subscriptions: list[str] = dataclasses.field(default_factory=list)
    invoices: list[str] = dataclasses.field(default_factory=list)


def _empty(factory: sessionmaker[Session]) -> None:
    with unit_of_work(factory) as session:
        for table in reversed(Base.metadata.sorted_tables):
            if table not in REPORT_ROLLUPS:
                session.execute(delete(table))
        for table in REPORT_ROLLUPS:
            session.execute(delete(table))


def _pick(items: list[str], index: int) -> str | None:
    return items[index % len(items)] if items else None


def _apply(session: Session, op: tuple[Any, ...], book: Book) -> None:
    factory = Factory()
    kind = op[0]
    if kind == "subscribe":
        _, customer, currency, (amount, interval, count, quantity), status, created = op
        while len(book.customers) <= customer:
            book.customers.append(factory.customer(session))
        record = factory.subscription(
            session,
            book.customers[customer],
            currency=currency,
            amount_minor=amount,
            interval=interval,
            interval_count=count,
            quantity=quantity,
            status=status,
            created_at=created,
        )
        book.subscriptions.append(record.id)
        return
    if kind in ("status", "terms", "delete_pending", "delete_change", "delete_terms_change"):
        sub_id = _pick(book.subscriptions, op[1])
        current = subscriptions.get_subscription(session, sub_id) if sub_id else None
        if current is None:
            return
        if kind == "delete_pending":
            subscriptions.delete_pending_subscription(session, current.id)
            return
        if kind in ("delete_change", "delete_terms_change"):
            # Not something the service does; the triggers must follow it all the same.
            log, table = (
                (subscriptions.list_status_changes, SUBSCRIPTION_STATUS_CHANGES)
                if kind == "delete_change"
                else (subscriptions.list_terms_changes, SUBSCRIPTION_TERMS_CHANGES)
            )
            logged = log(session, current.id)
            if logged:
                gone = logged[op[2] % len(logged)]
                session.execute(delete(table).where(table.c.id == gone.id))
            return
        status, at, terms = current.status, current.updated_at, None
        if kind == "status":
            status, at = op[2], op[3]
        else:
            terms = {"amount_minor": op[2], "quantity": op[3]}
            if op[4] is not None:
                terms["interval"] = op[4]
            if op[5] is not None:
                terms["currency"] = op[5]
            at = op[6]
        _set_state(session, current, status, at, terms)
        return
    if kind == "issue":
        _, sub_index, amount, created, first_outcome = op
        sub_id = _pick(book.subscriptions, sub_index)
        sub = subscriptions.get_subscription(session, sub_id) if sub_id else None
        if sub is None:
            sub = factory.subscription(session, created_at=created)
            book.subscriptions.append(sub.id)
        record = dataclasses.replace(
            factory.invoice_record(
                sub, len(book.invoices), created_at=created, amount_due_minor=amount
            ),
            status=InvoiceStatus.OPEN,
            finalized_at=created,
        )
        issued, _ = invoices.issue_invoice(session, record)
        book.invoices.append(issued.id)
        first, _ = attempts.insert_pending_attempt(
            session, factory.attempt_record(issued, 1, created_at=created)
        )
        if first_outcome is not None:
            _outcome(session, first.id, first_outcome, created)
        return
    invoice_id = _pick(book.invoices, op[1])
    invoice = invoices.get_invoice(session, invoice_id) if invoice_id else None
    if invoice is None:
        return
    made = attempts.list_attempts_for_invoice(session, invoice.id)
    if kind == "attempt":
        _, _, outcome, at = op
        attempt, _ = attempts.insert_pending_attempt(
            session, factory.attempt_record(invoice, len(made) + 1, created_at=at)
        )
        if outcome is not None:
            _outcome(session, attempt.id, outcome, at)
    elif kind == "outcome":
        if made:
            _outcome(session, made[op[2] % len(made)].id, op[3], BASE)
    elif kind == "transition":
        invoices.transition_invoice(session, invoice.id, to=op[2], at=op[3])
    elif kind == "lower":
        if invoice.status == InvoiceStatus.OPEN:
            credit_notes.reduce_amount_due(session, invoice, min(op[2], invoice.amount_due_minor))
    elif kind == "delete_attempt" and made:
        # Not something the service does; the triggers must follow it all the same.
        session.execute(delete(PAYMENT_ATTEMPTS).where(PAYMENT_ATTEMPTS.c.id == made[-1].id))


def _set_state(
    session: Session,
    current: SubscriptionRecord,
    status: SubscriptionStatus,
    at: datetime,
    terms: dict[str, object] | None,
) -> None:
    subscriptions.update_subscription_state(
        session,
        current.id,
        status=status,
        current_period_start=current.current_period_start,
        current_period_end=current.current_period_end,
        next_billing_at=current.next_billing_at,
        cancel_at_period_end=current.cancel_at_period_end,
        canceled_at=current.canceled_at,
        ended_at=current.ended_at,
        paused_at=current.paused_at,
        cancel_reason=current.cancel_reason,
        now=at,
        changed_at=at,
        terms=terms,
    )


def _outcome(
    session: Session, attempt_id: str, outcome: ChargeOutcomeKind | None, at: datetime
) -> None:
    paid = outcome == ChargeOutcomeKind.PAID
    attempts.record_attempt_outcome(
        session,
        attempt_id,
        status=AttemptStatus.SUCCEEDED
        if paid
        else AttemptStatus.PENDING
        if outcome is None
        else AttemptStatus.FAILED,
        outcome=outcome,
        decline_code=None,
        failure_message=None,
        payment_intent_id=None,
        charge_id=None,
        payment_method_id=None,
        completed_at=at,
    )


class _RollBack(Exception):
    pass


def _run(factory: sessionmaker[Session], writes: list[tuple[Any, ...]], book: Book) -> None:
    for op in writes:
        try:
            with unit_of_work(factory) as session:
                if op[0] == "rolled_back":
                    # Whatever it wrote leaves no trace in the rollups.
                    _apply(
                        session,
                        op[1],
                        Book(list(book.customers), list(book.subscriptions), list(book.invoices)),
                    )
                    session.flush()
                    raise _RollBack
                _apply(session, op, book)
        except (_RollBack, BillingError):
            pass  # rolled back: a transition the lifecycle refuses, say
        except Exception as error:  # a constraint the database refuses: rolled back too
            if "IntegrityError" not in type(error).__name__:
                raise


def assert_rollups_agree(factory: sessionmaker[Session]) -> None:
    """Every report from the rollups equals the report from the rows, and each rollup table
    equals its definition recomputed from the rows."""
    for months in RANGES:
        assert reporting.mrr(factory, months) == reporting.mrr(factory, months, from_rows=True)
        assert reporting.dunning(factory, months) == reporting.dunning(
            factory, months, from_rows=True
        )
    with unit_of_work(factory) as session:
        assert _kept(session) == _from_scratch(session)


def _kept(session: Session) -> dict[str, Any]:
    prices = REPORT_MRR_PRICES.c
    price = (
        prices.currency,
        prices.amount_minor,
        prices.interval,
        prices.interval_count,
        prices.quantity,
    )
    customers = REPORT_MRR_CUSTOMERS.c
    monthly = REPORT_DUNNING_MONTHLY.c
    key = (
        monthly.month,
        monthly.currency,
        monthly.status,
        monthly.first_failure,
        monthly.paid_by_attempt,
    )
    return {
        "prices": {
            tuple(row[:-1]): int(row[-1])
            for row in session.execute(
                select(*price, func.sum(prices.subscriptions)).group_by(*price)
            )
            if row[-1]
        },
        "customers": {
            (c, cus): int(n)
            for c, cus, n in session.execute(
                select(customers.currency, customers.customer_id, customers.subscriptions)
            )
            if n
        },
        "currency_customers": {
            c: int(n)
            for c, n in session.execute(
                select(
                    REPORT_MRR_CURRENCY_CUSTOMERS.c.currency,
                    func.sum(REPORT_MRR_CURRENCY_CUSTOMERS.c.customers),
                ).group_by(REPORT_MRR_CURRENCY_CUSTOMERS.c.currency)
            )
            if n
        },
        "mrr_customer_months": {
            tuple(row[:3]): tuple(int(v) for v in row[3:])
            for row in session.execute(
                select(
                    *(
                        REPORT_MRR_CUSTOMER_MONTHS.c[c]
                        for c in ("currency", "customer_id", "month")
                    ),
                    *(REPORT_MRR_CUSTOMER_MONTHS.c[f] for f in MRR_FIGURES),
                )
            )
        },
        "mrr_monthly": {
            tuple(row[:2]): tuple(int(v) for v in row[2:])
            for row in session.execute(
                select(
                    REPORT_MRR_MONTHLY.c.currency,
                    REPORT_MRR_MONTHLY.c.month,
                    *(func.sum(REPORT_MRR_MONTHLY.c[f]) for f in MRR_FIGURES),
                ).group_by(REPORT_MRR_MONTHLY.c.currency, REPORT_MRR_MONTHLY.c.month)
            )
            if any(row[2:])
        },
        "dunning_invoices": {
            row[0]: tuple(row[1:]) for row in session.execute(select(REPORT_DUNNING_INVOICES))
        },
        "dunning_monthly": {
            tuple(row[:-2]): (int(row[-2]), int(row[-1]))
            for row in session.execute(
                select(
                    *key, func.sum(monthly.invoices), func.sum(monthly.amount_due_minor)
                ).group_by(*key)
            )
            if row[-2] or row[-1]
        },
    }


def _from_scratch(session: Session) -> dict[str, Any]:
    prices: dict[tuple[Any, ...], int] = {}
    customers: dict[tuple[str, str], int] = {}
    for row in session.execute(select(SUBSCRIPTIONS)):
        if row.status not in MRR_STATUSES:
            continue
        key = (row.currency, row.amount_minor, str(row.interval), row.interval_count, row.quantity)
        prices[key] = prices.get(key, 0) + 1
        if monthly_recurring_minor(
            row.amount_minor, row.interval, row.interval_count, row.quantity
        ):
            customer = (row.currency, row.customer_id)
            customers[customer] = customers.get(customer, 0) + 1
    currency_customers: dict[str, int] = {}
    for currency, _ in customers:
        currency_customers[currency] = currency_customers.get(currency, 0) + 1
    # The dunning rows as the migration's backfill computes them, in SQL.
    fresh = session.execute(
        text(
            "SELECT i.id, i.created_at, i.currency, i.status, a.outcome, "
            "(SELECT min(p.attempt_number) FROM payment_attempts p WHERE p.invoice_id = i.id "
            "AND p.outcome = 'paid' AND p.attempt_number > 1), i.amount_due_minor "
            "FROM invoices i JOIN payment_attempts a ON a.invoice_id = i.id "
            "AND a.attempt_number = 1 AND a.outcome <> 'paid'"
        )
    ).all()
    dunning_invoices = {}
    dunning_monthly: dict[tuple[Any, ...], tuple[int, int]] = {}
    for invoice_id, created, currency, status, outcome, paid_by, amount in fresh:
        created_at = created if isinstance(created, datetime) else datetime.fromisoformat(created)
        month = str(Month.of(created_at.replace(tzinfo=created_at.tzinfo or UTC)))
        row = (month, currency, status, outcome, paid_by or 0, amount)
        dunning_invoices[invoice_id] = row
        n, total = dunning_monthly.get(row[:-1], (0, 0))
        dunning_monthly[row[:-1]] = (n + 1, total + amount)
    mrr_customer_months = _customer_months_by_definition(session)
    mrr_monthly: dict[tuple[str, str], tuple[int, ...]] = {}
    for (currency, _, month), figures in mrr_customer_months.items():
        total = mrr_monthly.get((currency, month), (0,) * len(MRR_FIGURES))
        mrr_monthly[(currency, month)] = tuple(a + b for a, b in zip(total, figures, strict=True))
    return {
        "prices": prices,
        "customers": customers,
        "currency_customers": currency_customers,
        "mrr_customer_months": mrr_customer_months,
        "mrr_monthly": {k: v for k, v in mrr_monthly.items() if any(v)},
        "dunning_invoices": dunning_invoices,
        "dunning_monthly": dunning_monthly,
    }


MRR_FIGURES = (
    "mrr_minor",
    "subscriptions",
    "customers",
    "new_minor",
    "reactivated_minor",
    "churned_minor",
    "churned_customers",
    "expansion_minor",
    "contraction_minor",
)
#: Later than any instant the tests write.
FAR = datetime(2100, 1, 1, tzinfo=UTC)


def _customer_months_by_definition(session: Session) -> dict[tuple[str, str, str], tuple[int, ...]]:
    """``report_mrr_customer_months`` from its definition, in Python: for each customer and
    currency, at each month start where one of its subscriptions may start or stop counting
    (the month after its creation or after a status change), its subscriptions' MRR
    (``SubscriptionHistory.mrr_at``) there and at the previous month start; the rows are the
    differences, and the movements of the month between, as ``mrr_report`` classifies them."""
    histories = reports_repo.mrr_histories_from_rows(session, until=FAR)
    by_customer: dict[tuple[str, str], list[Any]] = {}
    for history in histories:
        by_customer.setdefault((history.currency, history.customer_id), []).append(history)
    rows: dict[tuple[str, str, str], tuple[int, ...]] = {}
    for (currency, customer), mine in by_customer.items():
        months = sorted(
            {Month.of(h.created_at).next() for h in mine}
            | {Month.of(at).next() for h in mine for at, _ in h.changes}
            | {Month.of(at).next() for h in mine for at, _ in h.price_changes}
        )
        for month in months:
            before_start = Month(month.year - (month.month == 1), (month.month - 2) % 12 + 1)
            before, after = before_start.start, month.start
            was = [h.mrr_at(before) for h in mine]
            now = [h.mrr_at(after) for h in mine]
            new = reactivated = churned = expansion = contraction = 0
            for h, b, a in zip(mine, was, now, strict=True):
                first = h.first_counted_boundary()
                if b == 0 and a > 0:
                    if first is not None and first < before:
                        reactivated += a
                    else:
                        new += a
                elif a == 0 and b > 0:
                    churned += b
                elif a > b > 0:
                    expansion += a - b
                elif b > a > 0:
                    contraction += b - a
            counts_before = any(was)
            counts_now = any(now)
            figures = (
                sum(now) - sum(was),
                sum(1 for v in now if v) - sum(1 for v in was if v),
                int(counts_now) - int(counts_before),
                new,
                reactivated,
                churned,
                int(counts_before and not counts_now),
                expansion,
                contraction,
            )
            if any(figures):
                rows[(currency, customer, str(month))] = figures
    return rows


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(writes=st.lists(ops, min_size=10, max_size=40))
def test_rollups_equal_the_reports_computed_from_the_rows(
    engine: Engine, writes: list[tuple[Any, ...]]
) -> None:
    factory = make_session_factory(engine)
    _empty(factory)
    try:
        _run(factory, writes, Book())
        assert_rollups_agree(factory)
    finally:
        _empty(factory)


def test_a_customer_counts_exactly_when_a_price_rounds_to_more_than_zero(
    session_factory: sessionmaker[Session],
) -> None:
    """The triggers decide in SQL whether a price's monthly amount is above 0; Python rounds
    half to even (billing.reports.monthly_recurring_minor). Every small price, each for its own
    customer, on both sides of one half a minor unit a month."""
    factory = Factory()
    with unit_of_work(session_factory) as session:
        for amount in range(14):
            for interval in IntervalUnit:
                for count in range(1, 5):
                    for quantity in (1, 2):
                        factory.subscription(
                            session,
                            amount_minor=amount,
                            interval=interval,
                            interval_count=count,
                            quantity=quantity,
                        )
    with unit_of_work(session_factory) as session:
        kept, scratch = _kept(session), _from_scratch(session)
    assert kept == scratch
    # Some prices round to 0 (amount 1 every 2 months is exactly one half: 0), most do not.
    assert 0 < len(scratch["customers"]) < 14 * 4 * 4 * 2


def test_the_rollups_count_the_statuses_the_report_counts() -> None:
    """Migration 0021 froze MRR_STATUSES into its triggers; the reader names them too."""
    assert set(reports_repo.ROLLUP_COUNTED) == {s.value for s in MRR_STATUSES}


def test_twenty_writers_at_once(backend: str, session_factory: sessionmaker[Session]) -> None:
    """Twenty transactions at once on PostgreSQL, on the same few invoices and customers: each
    adds a later attempt to an invoice whose first attempt failed (paid or declined), moves
    that invoice (paid, written off, lowered), and changes a subscription of one of two
    customers (so their counts cross 0 in parallel). The rollups count every write and none
    deadlocks."""
    if backend != "postgres":
        pytest.skip("SQLite has one writer at a time")
    factory = Factory()
    book = Book()
    created = datetime(2026, 2, 10, tzinfo=UTC)
    with unit_of_work(session_factory) as session:
        book.customers = [factory.customer(session) for _ in range(2)]
        for n in range(20):
            sub = factory.subscription(
                session,
                book.customers[n % 2],
                status=SubscriptionStatus.ACTIVE if n % 3 else SubscriptionStatus.PAUSED,
                amount_minor=(0, 900, 1)[n % 3],
                created_at=created - timedelta(days=40),
            )
            book.subscriptions.append(sub.id)
        for n in range(5):
            sub = subscriptions.get_subscription(session, book.subscriptions[n])
            assert sub is not None
            invoice = invoices.issue_invoice(
                session,
                dataclasses.replace(
                    factory.invoice_record(sub, n, created_at=created, amount_due_minor=1000),
                    status=InvoiceStatus.OPEN,
                    finalized_at=created,
                ),
            )[0]
            book.invoices.append(invoice.id)
            first = factory.attempt(session, invoice, 1)
            _outcome(session, first.id, ChargeOutcomeKind.SOFT_DECLINE, created)
    barrier = threading.Barrier(20)
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            barrier.wait()
            with unit_of_work(session_factory) as session:
                invoice = invoices.get_invoice(session, book.invoices[n % 5])
                assert invoice is not None
                at = created + timedelta(days=1 + n)
                attempt, _ = attempts.insert_pending_attempt(
                    session, Factory().attempt_record(invoice, 2 + n // 5, created_at=at)
                )
                outcome = (ChargeOutcomeKind.PAID, ChargeOutcomeKind.HARD_DECLINE)[n % 2]
                _outcome(session, attempt.id, outcome, at)
                try:
                    with session.begin_nested():
                        if n % 4 == 0:
                            invoices.transition_invoice(
                                session, invoice.id, to=InvoiceStatus.PAID, at=at
                            )
                        elif n % 4 == 1:
                            invoices.transition_invoice(
                                session, invoice.id, to=InvoiceStatus.UNCOLLECTIBLE, at=at
                            )
                        else:
                            current = invoices.get_invoice(session, invoice.id)
                            if current is not None and current.status == InvoiceStatus.OPEN:
                                credit_notes.reduce_amount_due(session, current, 7)
                except BillingError:
                    pass  # another writer settled it first
                sub = subscriptions.get_subscription(session, book.subscriptions[n])
                assert sub is not None
                to = SubscriptionStatus.PAUSED if n % 3 else SubscriptionStatus.ACTIVE
                _set_state(session, sub, to, at, {"quantity": 1 + n % 2})
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with unit_of_work(session_factory) as session:
        count = session.execute(select(func.count()).select_from(PAYMENT_ATTEMPTS)).scalar()
    assert count == 25
    assert_rollups_agree(session_factory)
    report = reporting.dunning(
        session_factory, reporting.MonthRange(Month(2026, 2), Month(2026, 2))
    )
    assert [(r.by, r.failed_invoices) for r in report.rows if r.by == "total"] == [("total", 5)]


def test_a_database_migrated_with_data_in_it_is_backfilled(backend: str, admin_url: str) -> None:
    """Rows written before migration 0021 (at 0018) are in the rollups after it, and the
    triggers keep them from then on."""
    with temporary_database(backend, admin_url=admin_url, migrate=False) as url:  # type: ignore[arg-type]
        upgrade(url, "0018")
        engine = make_engine(url)
        try:
            factory = make_session_factory(engine)
            before = [
                (
                    "subscribe",
                    0,
                    "USD",
                    (900, IntervalUnit.MONTH, 1, 1),
                    SubscriptionStatus.ACTIVE,
                    BASE - timedelta(days=50),
                ),
                (
                    "subscribe",
                    0,
                    "USD",
                    (1, IntervalUnit.YEAR, 1, 1),
                    SubscriptionStatus.ACTIVE,
                    BASE - timedelta(days=50),
                ),
                (
                    "subscribe",
                    1,
                    "JPY",
                    (1500, IntervalUnit.WEEK, 2, 3),
                    SubscriptionStatus.PAST_DUE,
                    BASE,
                ),
                (
                    "subscribe",
                    2,
                    "USD",
                    (900, IntervalUnit.MONTH, 1, 1),
                    SubscriptionStatus.CANCELED,
                    BASE,
                ),
                ("status", 0, SubscriptionStatus.CANCELED, BASE + timedelta(days=70)),
                ("issue", 0, 900, BASE, ChargeOutcomeKind.SOFT_DECLINE),
                ("attempt", 0, ChargeOutcomeKind.PAID, BASE + timedelta(days=3)),
                ("transition", 0, InvoiceStatus.PAID, BASE + timedelta(days=3)),
                ("issue", 2, 4500, BASE + timedelta(days=35), ChargeOutcomeKind.HARD_DECLINE),
                ("transition", 1, InvoiceStatus.UNCOLLECTIBLE, BASE + timedelta(days=60)),
            ]
            book = Book()
            _run(factory, before, book)
            upgrade(url)
            with unit_of_work(factory) as session:
                assert (
                    session.execute(
                        select(func.count()).select_from(REPORT_DUNNING_INVOICES)
                    ).scalar()
                    == 2
                )
            assert_rollups_agree(factory)
            # ...and the triggers carry on from the backfill.
            _run(
                factory,
                [
                    ("status", 1, SubscriptionStatus.PAUSED, BASE + timedelta(days=80)),
                    ("attempt", 1, ChargeOutcomeKind.PAID, BASE + timedelta(days=90)),
                ],
                book,
            )
            assert_rollups_agree(factory)
        finally:
            engine.dispose()


def test_one_statement_writing_thousands_of_customers(
    backend: str, session_factory: sessionmaker[Session]
) -> None:
    """A bulk load (as scripts/bench.py's): 20,000 customers' subscriptions inserted by one
    statement, then paused (logged) by one statement and some canceled by another. On
    PostgreSQL the refresh takes one lock on the whole book instead of one per customer (20,000
    advisory locks do not fit the lock table: "out of shared memory"), and the rollups still
    equal the rows."""
    if backend != "postgres":
        pytest.skip("the lock table is PostgreSQL's")
    factory = Factory()
    with unit_of_work(session_factory) as session:
        factory.subscription(session)  # the plan
        epoch = datetime(2026, 1, 10, tzinfo=UTC)
        session.execute(
            text(
                "INSERT INTO customers (id, timezone, invoice_prefix, created_at, updated_at) "
                "SELECT 'cus_many_' || g, 'UTC', 'MANY' || to_hex(g), :epoch, :epoch "
                "FROM generate_series(1, 20000) AS g"
            ),
            {"epoch": epoch},
        )
        session.execute(
            text(
                "INSERT INTO subscriptions (id, customer_id, plan_code, status, amount_minor, "
                "currency, interval, interval_count, timezone, anchor_at, workflow_id, "
                "created_at, updated_at) "
                "SELECT 'sub_many_' || g, 'cus_many_' || g, :plan, 'active', 900 + g % 3, "
                "'USD', 'month', 1, 'UTC', :epoch, 'subscription-sub_many_' || g, "
                ":epoch + g * interval '1 hour', :epoch FROM generate_series(1, 20000) AS g"
            ),
            {"epoch": epoch, "plan": factory.plan.code},
        )
    # As autovacuum would: the planner probes the changes by index only once it knows there
    # are thousands.
    with unit_of_work(session_factory) as session:
        session.execute(text("ANALYZE customers, subscriptions, subscription_status_changes"))
    with unit_of_work(session_factory) as session:
        session.execute(
            text(
                "INSERT INTO subscription_status_changes (subscription_id, from_status, "
                "to_status, changed_at) SELECT id, 'active', 'paused', created_at + "
                "interval '40 days' FROM subscriptions WHERE id LIKE 'sub_many_%'"
            )
        )
        session.execute(
            text(
                "INSERT INTO subscription_status_changes (subscription_id, from_status, "
                "to_status, changed_at) SELECT id, 'paused', 'active', created_at + "
                "interval '70 days' FROM subscriptions WHERE id LIKE 'sub_many_%' "
                "AND right(id, 1) IN ('1', '2', '3')"
            )
        )
        session.execute(text("ANALYZE subscription_status_changes"))
    assert_rollups_agree(session_factory)
    may = reporting.mrr(session_factory, reporting.MonthRange(Month(2026, 4), Month(2026, 4)))
    assert [m.reactivated_minor > 0 and m.opening_mrr_minor > 0 for m in may] == [True]
