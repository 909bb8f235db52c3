"""The reports on a hand-worked book (tests/finance_book.py), read from SQLite and PostgreSQL:
the queries and the rules together give the figures worked out by hand."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session, sessionmaker

from billing import reporting
from billing.reports import Month
from tests import finance_book as book

JAN_TO_APR = reporting.MonthRange(Month(2026, 1), Month(2026, 4))


@pytest.fixture
def factory(session_factory: sessionmaker[Session]) -> sessionmaker[Session]:
    """The book, on each backend (tests/db/conftest.py runs every test on both)."""
    book.write_book(session_factory)
    return session_factory


def test_mrr_and_its_movements_per_currency_and_month(factory: sessionmaker[Session]) -> None:
    rows = reporting.mrr(factory, JAN_TO_APR)
    got = {
        (str(m.month), m.currency): (
            m.opening_mrr_minor,
            m.new_minor,
            m.expansion_minor,
            m.contraction_minor,
            m.churned_minor,
            m.reactivated_minor,
            m.closing_mrr_minor,
        )
        for m in rows
    }
    assert got == book.MRR
    march = next(m for m in rows if str(m.month) == "2026-03" and m.currency == "USD")
    assert march.churned_customers == book.MARCH_USD_CHURN["churned_customers"]
    assert march.logo_churn_rate == book.MARCH_USD_CHURN["logo_churn_rate"]
    assert march.revenue_churn_rate == book.MARCH_USD_CHURN["revenue_churn_rate"]
    april = next(m for m in rows if str(m.month) == "2026-04" and m.currency == "USD")
    assert (april.arr_minor, april.active_subscriptions, april.active_customers) == (30000, 2, 2)


def test_mrr_for_one_currency_only(factory: sessionmaker[Session]) -> None:
    only_eur = reporting.MonthRange(Month(2026, 2), Month(2026, 2), "EUR")
    assert [(m.currency, m.closing_mrr_minor) for m in reporting.mrr(factory, only_eur)] == [
        ("EUR", 4329)
    ]


def test_ar_aging_buckets_as_of_an_instant(factory: sessionmaker[Session]) -> None:
    as_of, rows = reporting.aging(factory, as_of=book.AS_OF, currency=None, now=book.NOW)
    assert as_of == book.AS_OF
    assert {(r.currency, r.bucket.value): (r.invoices, r.outstanding_minor) for r in rows} == (
        book.AGING
    )


def test_ar_aging_in_the_past_uses_the_state_at_that_instant(
    factory: sessionmaker[Session],
) -> None:
    # On Mar 1, in_3 (written off Mar 8) was still owed, in_2 was paid (Feb 14), and in_4 was
    # 28 days past due.
    _, rows = reporting.aging(factory, as_of="2026-03-01T00:00:00Z", currency="USD", now=book.NOW)
    owed = {r.bucket.value: (r.invoices, r.outstanding_minor) for r in rows if r.invoices}
    assert owed == {"1-30": (2, 14000)}


def test_dunning_recovery_by_attempt_and_decline_class(factory: sessionmaker[Session]) -> None:
    report = reporting.dunning(factory, JAN_TO_APR)
    got = {
        (r.currency, r.by, r.key): (
            r.failed_invoices,
            r.recovered_invoices,
            r.recovered_minor,
            r.recovery_rate,
        )
        for r in report.rows
    }
    assert got == book.DUNNING
    assert {w.currency: (w.invoices, w.amount_minor) for w in report.written_off} == (
        book.WRITTEN_OFF
    )


def test_collected_vs_invoiced_per_month(factory: sessionmaker[Session]) -> None:
    rows = reporting.collections(factory, JAN_TO_APR)
    got = {
        (str(r.month), r.currency): (
            r.invoiced_minor,
            r.invoices,
            r.collected_minor,
            r.payments,
            r.fees_minor,
        )
        for r in rows
    }
    assert got == book.COLLECTIONS
    refunded = {
        (str(r.month), r.currency): (r.refunded_minor, r.refunds, r.net_collected_minor)
        for r in rows
    }
    assert refunded == book.REFUNDED
    # The totals the database keeps say what the rows say.
    assert rows == reporting.collections(factory, JAN_TO_APR, from_rows=True)


def test_the_database_counts_whole_days_as_the_rule_does(
    session_factory: sessionmaker[Session],
) -> None:
    """The database groups receivables by whole days since finalization: at each edge (a
    second before a day is complete, the day itself, bucket edges) it agrees with
    billing.reports.days_past_due and aging_bucket."""
    from datetime import timedelta

    from billing.reports import aging_bucket, ar_aging, days_past_due
    from db.models import INVOICES

    book.write_book(session_factory)
    ages = [
        timedelta(0),
        timedelta(seconds=86399),
        timedelta(days=1),
        timedelta(days=30, seconds=86399),
        timedelta(days=31),
        timedelta(days=60, microseconds=999_999),
        timedelta(days=61),
        timedelta(days=90, hours=23),
        timedelta(days=91),
    ]
    as_of = book.AS_OF
    # Reuse the book's open USD invoices' shape: one invoice per age, all open.
    with session_factory() as session, session.begin():
        template = dict(
            session.execute(INVOICES.select().where(INVOICES.c.id == "in_5")).mappings().one()
        )
        for n, age in enumerate(ages):
            row = template | {
                "id": f"in_age_{n}",
                "number": f"AGE-{n:04d}",
                "period_start": template["period_start"] + timedelta(days=400 + n),
                "finalized_at": as_of - age,
                "created_at": as_of - age,
                "currency": "GBP",
                "amount_due_minor": 10**n,
            }
            session.execute(INVOICES.insert().values(**row))
    _, rows = reporting.aging(session_factory, as_of=as_of, currency="GBP", now=book.NOW)
    expected_buckets: dict[str, int] = {}
    for n, age in enumerate(ages):
        bucket = aging_bucket(days_past_due(as_of - age, as_of)).value
        expected_buckets[bucket] = expected_buckets.get(bucket, 0) + 10**n
    assert ar_aging([]) == []
    assert {r.bucket.value: r.outstanding_minor for r in rows if r.invoices} == expected_buckets
    assert expected_buckets == {
        "current": 1 + 10,
        "1-30": 100 + 1000,
        "31-60": 10**4 + 10**5,
        "61-90": 10**6 + 10**7,
        "over-90": 10**8,
    }


def test_steady_months_are_counted_in_bulk_with_the_same_figures(
    factory: sessionmaker[Session],
) -> None:
    """From May every subscription is steady (no change since April 20): sub_b, sub_c and
    sub_d count, sub_a (canceled) does not; nothing moves. A free subscription (cus_b's second,
    and one of a customer of its own) adds no MRR, no active subscription and no customer."""
    from sqlalchemy import insert

    from db.models import CUSTOMERS, SUBSCRIPTIONS

    with factory() as session, session.begin():
        session.execute(
            insert(CUSTOMERS).values(
                id="cus_free",
                timezone="UTC",
                invoice_prefix="FREEFREE",
                created_at=book.at(1, 1),
                updated_at=book.at(1, 1),
            )
        )
        for sub_id, customer in (("sub_free", "cus_free"), ("sub_b_free", "cus_b")):
            session.execute(
                insert(SUBSCRIPTIONS).values(
                    id=sub_id,
                    customer_id=customer,
                    plan_code="book-plan",
                    status="active",
                    amount_minor=0,
                    currency="USD",
                    interval="month",
                    interval_count=1,
                    timezone="UTC",
                    anchor_at=book.at(1, 1),
                    workflow_id=f"subscription-{sub_id}",
                    created_at=book.at(1, 1),
                    updated_at=book.at(1, 1),
                )
            )
    may_june = reporting.MonthRange(Month(2026, 5), Month(2026, 6))
    rows = {(str(m.month), m.currency): m for m in reporting.mrr(factory, may_june)}
    assert set(rows) == {("2026-05", "USD"), ("2026-06", "USD"), ("2026-05", "EUR"),
                         ("2026-06", "EUR")}  # fmt: skip
    for (_, currency), m in rows.items():
        expected = {"USD": (2500, 2, 2), "EUR": (8658, 1, 1)}[currency]
        assert (m.closing_mrr_minor, m.active_subscriptions, m.active_customers) == expected
        assert m.opening_mrr_minor == m.closing_mrr_minor and m.net_movement_minor == 0
        assert m.churned_customers == 0 and m.opening_customers == expected[2]
    # April to May: sub_b (resumed Apr 20) is listed for April and steady in May; the figures
    # chain.
    april_may = reporting.mrr(factory, reporting.MonthRange(Month(2026, 4), Month(2026, 5)))
    usd = [m for m in april_may if m.currency == "USD"]
    assert [(m.opening_mrr_minor, m.reactivated_minor, m.closing_mrr_minor) for m in usd] == [
        (1000, 2000, 2500),
        (2500, 0, 2500),
    ]
