"""Instants go in as any aware datetime and always come out as aware UTC, on both backends."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.exc import StatementError
from sqlalchemy.orm import Session, sessionmaker

from db.engine import unit_of_work
from db.repositories import customers, invoices

KOLKATA = timezone(timedelta(hours=5, minutes=30))


def test_aware_non_utc_instant_reads_back_equal_and_utc(
    backend: str, session_factory: sessionmaker[Session], factory: Any
) -> None:
    created_at = datetime(2026, 3, 29, 1, 30, 15, 123456, tzinfo=KOLKATA)
    with unit_of_work(session_factory) as session:
        customer = factory.customer(session, created_at=created_at)

    with unit_of_work(session_factory) as session:
        if backend == "postgres":
            # The driver returns timestamptz in the session's zone; make that zone not UTC.
            session.execute(text("SET TIME ZONE 'America/New_York'"))
        stored = customers.get_customer(session, customer.id)

    assert stored is not None
    assert stored.created_at == created_at
    assert stored.created_at.tzinfo is UTC
    assert stored.created_at == datetime(2026, 3, 28, 20, 0, 15, 123456, tzinfo=UTC)


def test_the_record_returned_by_an_insert_is_already_utc(session: Session, factory: Any) -> None:
    created_at = datetime(2026, 7, 1, 12, 0, tzinfo=ZoneInfo("America/Los_Angeles"))
    customer = factory.customer(session, created_at=created_at)
    assert customer.created_at.tzinfo is UTC
    assert customer.created_at == datetime(2026, 7, 1, 19, 0, tzinfo=UTC)


def test_naive_datetime_is_refused_on_write(
    session_factory: sessionmaker[Session], factory: Any
) -> None:
    with (
        pytest.raises(StatementError, match="naive datetime"),
        unit_of_work(session_factory) as session,
    ):
        factory.customer(session, created_at=datetime(2026, 1, 1, 9, 0))


def test_naive_datetime_is_refused_in_a_query(session: Session) -> None:
    # A naive period start would silently match nothing (or the wrong row) otherwise.
    with pytest.raises(StatementError, match="naive datetime"):
        invoices.get_invoice_for_period(session, "sub_x", datetime(2026, 1, 1))


def test_lookup_by_instant_matches_whatever_zone_the_caller_uses(
    session: Session, factory: Any
) -> None:
    invoice = factory.invoice(session)
    same_instant = invoice.period_start.astimezone(ZoneInfo("Pacific/Auckland"))
    found = invoices.get_invoice_for_period(session, invoice.subscription_id, same_instant)
    assert found == invoice


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    instant=st.datetimes(
        min_value=datetime(1900, 1, 1),
        max_value=datetime(2200, 1, 1),
        timezones=st.timezones(),
    )
)
def test_any_aware_instant_round_trips(
    session_factory: sessionmaker[Session], factory: Any, instant: datetime
) -> None:
    with unit_of_work(session_factory) as session:
        customer = factory.customer(session, updated_at=instant)
    with unit_of_work(session_factory) as session:
        stored = customers.get_customer(session, customer.id)
    assert stored is not None
    assert stored.updated_at.tzinfo is UTC
    assert stored.updated_at == instant.astimezone(UTC)
