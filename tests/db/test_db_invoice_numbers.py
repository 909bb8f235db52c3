"""Invoice numbers: PREFIX-0001, PREFIX-0002, ... per customer; unique and gap-free, also when
workers allocate concurrently and when transactions roll back."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest
from sqlalchemy.orm import Session, sessionmaker

from billing.errors import NotFound
from billing.invoices import format_invoice_number
from billing.records import InvoiceRecord
from db.engine import unit_of_work
from db.repositories import customers, invoices

WORKERS = 8
T = TypeVar("T")


class Abort(Exception):
    """Raised inside a unit of work to make it roll back."""


def run_concurrently(jobs: int, job: Callable[[int], T]) -> list[T]:
    """Run ``job(i)`` for each i on WORKERS threads that all start at the same moment."""
    start = threading.Barrier(jobs)

    def run(i: int) -> T:
        start.wait(timeout=30)
        return job(i)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(run, range(jobs)))


def test_numbers_count_up_per_customer(session: Session, factory: Any) -> None:
    ada = factory.customer(session)
    bob = factory.customer(session)

    ada_numbers = [customers.allocate_invoice_number(session, ada.id) for _ in range(3)]
    bob_first = customers.allocate_invoice_number(session, bob.id)

    assert ada_numbers == [f"{ada.invoice_prefix}-{n:04d}" for n in (1, 2, 3)]
    assert bob_first == f"{bob.invoice_prefix}-0001"
    stored = customers.get_customer(session, ada.id)
    assert stored is not None and stored.next_invoice_sequence == 4


def test_a_rolled_back_allocation_leaves_no_gap(
    session_factory: sessionmaker[Session], factory: Any
) -> None:
    with unit_of_work(session_factory) as session:
        customer = factory.customer(session)
        assert customers.allocate_invoice_number(session, customer.id).endswith("-0001")

    with pytest.raises(Abort), unit_of_work(session_factory) as session:
        assert customers.allocate_invoice_number(session, customer.id).endswith("-0002")
        raise Abort  # e.g. the invoice insert failed afterwards

    with unit_of_work(session_factory) as session:
        assert customers.allocate_invoice_number(session, customer.id).endswith("-0002")


def test_allocating_for_an_unknown_customer_says_so(session: Session) -> None:
    with pytest.raises(NotFound, match="cus_missing"):
        customers.allocate_invoice_number(session, "cus_missing")


def test_concurrent_allocations_are_unique_and_gap_free(
    session_factory: sessionmaker[Session], factory: Any
) -> None:
    """8 threads allocate at once, one transaction each; every third transaction rolls back.
    The committed numbers must be exactly 0001..N with nothing skipped or repeated."""
    with unit_of_work(session_factory) as session:
        customer = factory.customer(session)
    rounds = 6

    def allocate(worker: int) -> list[str]:
        committed: list[str] = []
        for i in range(rounds):
            try:
                with unit_of_work(session_factory) as session:
                    number = customers.allocate_invoice_number(session, customer.id)
                    if (worker + i) % 3 == 0:
                        raise Abort
                committed.append(number)
            except Abort:
                pass
        return committed

    committed = [n for numbers in run_concurrently(WORKERS, allocate) for n in numbers]

    expected_count = sum(1 for w in range(WORKERS) for i in range(rounds) if (w + i) % 3)
    assert sorted(committed) == [
        format_invoice_number(customer.invoice_prefix, n) for n in range(1, expected_count + 1)
    ]
    with unit_of_work(session_factory) as session:
        stored = customers.get_customer(session, customer.id)
    assert stored is not None and stored.next_invoice_sequence == expected_count + 1


def test_racing_to_issue_one_period_creates_one_invoice_and_no_gap(
    session_factory: sessionmaker[Session], factory: Any
) -> None:
    """Eight retries of create_invoice for the same period run at once: one creates the
    invoice, the others get it back, and the losers' number allocations leave no gap."""
    with unit_of_work(session_factory) as session:
        subscription = factory.subscription(session)
    draft = factory.invoice_record(subscription, 0)

    def issue(_: int) -> tuple[str, bool]:
        with unit_of_work(session_factory) as session:
            invoice, created = invoices.issue_invoice(session, draft)
        return invoice.number, created

    results = run_concurrently(WORKERS, issue)

    assert sum(created for _, created in results) == 1
    prefix = _prefix(session_factory, subscription.customer_id)
    assert {number for number, _ in results} == {format_invoice_number(prefix, 1)}
    with unit_of_work(session_factory) as session:
        assert len(invoices.list_invoices_for_subscription(session, subscription.id)) == 1
        next_invoice = invoices.issue_invoice(session, factory.invoice_record(subscription, 1))
    assert next_invoice[1] is True
    assert next_invoice[0].number.endswith("-0002")


def _prefix(session_factory: sessionmaker[Session], customer_id: str) -> str:
    with unit_of_work(session_factory) as session:
        customer = customers.get_customer(session, customer_id)
    assert customer is not None
    return customer.invoice_prefix


def test_issue_invoice_falls_back_on_the_unique_constraint(
    session: Session, factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If both period checks miss a row that exists (a stale read), the insert hits the
    (subscription, period start) constraint: the existing invoice comes back and the
    number allocated for the failed insert is rolled back with it."""
    subscription = factory.subscription(session)
    existing = factory.invoice(session, subscription, 0)
    real_lookup = invoices.get_invoice_for_period
    stale_reads = 2

    def stale_then_real(*args: Any) -> InvoiceRecord | None:
        nonlocal stale_reads
        if stale_reads:
            stale_reads -= 1
            return None
        return real_lookup(*args)

    monkeypatch.setattr(invoices, "get_invoice_for_period", stale_then_real)
    again, created = invoices.issue_invoice(session, factory.invoice_record(subscription, 0))

    assert (again, created) == (existing, False)
    customer = customers.get_customer(session, subscription.customer_id)
    assert customer is not None and customer.next_invoice_sequence == 2
