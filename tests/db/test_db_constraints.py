"""The invariants money depends on hold in the database itself: a write that breaks one is
refused with IntegrityError even when it bypasses the repositories."""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Any

import pytest
from sqlalchemy import Executable, insert, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from billing.calendar import IntervalUnit
from billing.dunning import FinalAction
from billing.ids import new_id
from billing.invoices import InvoiceStatus
from billing.payments import ChargeOutcomeKind
from billing.records import AttemptStatus
from billing.subscription import SubscriptionStatus
from db.base import Base
from db.engine import unit_of_work
from db.models import CustomerRow, InvoiceRow, PaymentAttemptRow, PaymentRow, PlanRow
from db.repositories._rows import column_values


def raw_insert(model: type[Base], record: object, **changes: Any) -> Executable:
    """An INSERT straight into the table, past every repository check."""
    return insert(model).values({**column_values(record), **changes})


def assert_refused(session_factory: sessionmaker[Session], statement: Executable) -> None:
    with pytest.raises(IntegrityError), unit_of_work(session_factory) as session:
        session.execute(statement)


@pytest.fixture
def paid_invoice(session_factory: sessionmaker[Session], factory: Any) -> dict[str, Any]:
    """A subscription with an invoice, one attempt and its payment, committed."""
    with unit_of_work(session_factory) as session:
        subscription = factory.subscription(session)
        invoice = factory.invoice(session, subscription)
        attempt = factory.attempt(session, invoice)
        payment = factory.payment_record(invoice, attempt)
        session.execute(raw_insert(PaymentRow, payment))
    return {"subscription": subscription, "invoice": invoice, "attempt": attempt, "payment": payment}


Case = Callable[[Any, dict[str, Any]], Executable]

CASES: dict[str, Case] = {
    # One invoice per (subscription, period start), even with a fresh id and number.
    "second invoice for the same period": lambda f, d: raw_insert(
        InvoiceRow, d["invoice"], id=new_id("in"), number="OTHER-0001"
    ),
    "duplicate invoice number": lambda f, d: raw_insert(
        InvoiceRow,
        f.invoice_record(d["subscription"], period_index=1),
        number=d["invoice"].number,
    ),
    # One attempt per (invoice, attempt number), even under another idempotency key.
    "second attempt with the same number": lambda f, d: raw_insert(
        PaymentAttemptRow, f.attempt_record(d["invoice"], 1), idempotency_key="other-key"
    ),
    "attempt number zero": lambda f, d: raw_insert(
        PaymentAttemptRow, f.attempt_record(d["invoice"], 0)
    ),
    "reused idempotency key": lambda f, d: raw_insert(
        PaymentAttemptRow,
        f.attempt_record(d["invoice"], 2),
        idempotency_key=d["attempt"].idempotency_key,
    ),
    # Never two settled payments for one invoice.
    "second payment for the same invoice": lambda f, d: raw_insert(
        PaymentRow,
        d["payment"],
        id=new_id("py"),
        attempt_id=d["attempt"].id,
        stripe_payment_intent_id="pi_second",
        stripe_charge_id="ch_second",
    ),
    "same payment intent booked twice": lambda f, d: raw_insert(
        PaymentRow, d["payment"], id=new_id("py"), invoice_id="in_other"
    ),
    "zero payment": lambda f, d: update(PaymentRow)
    .where(PaymentRow.id == d["payment"].id)
    .values(amount_minor=0),
    "negative amount due": lambda f, d: update(InvoiceRow)
    .where(InvoiceRow.id == d["invoice"].id)
    .values(amount_due_minor=-1),
    "paid more than due": lambda f, d: update(InvoiceRow)
    .where(InvoiceRow.id == d["invoice"].id)
    .values(amount_paid_minor=d["invoice"].amount_due_minor + 1),
    "negative amount paid": lambda f, d: update(InvoiceRow)
    .where(InvoiceRow.id == d["invoice"].id)
    .values(amount_paid_minor=-1),
    "negative attempt amount": lambda f, d: update(PaymentAttemptRow)
    .where(PaymentAttemptRow.id == d["attempt"].id)
    .values(amount_minor=-100),
    "negative plan price": lambda f, d: update(PlanRow).values(amount_minor=-1),
    "invoice sequence below one": lambda f, d: update(CustomerRow)
    .where(CustomerRow.id == d["invoice"].customer_id)
    .values(next_invoice_sequence=0),
    "invoice for an unknown subscription": lambda f, d: raw_insert(
        InvoiceRow,
        f.invoice_record(d["subscription"], period_index=5),
        number="X-0005",
        subscription_id="sub_missing",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_database_refuses(
    case: str,
    session_factory: sessionmaker[Session],
    factory: Any,
    paid_invoice: dict[str, Any],
) -> None:
    assert_refused(session_factory, CASES[case](factory, paid_invoice))


def test_a_refused_write_leaves_the_invoice_as_it_was(
    session_factory: sessionmaker[Session], paid_invoice: dict[str, Any]
) -> None:
    invoice = paid_invoice["invoice"]
    assert_refused(session_factory, CASES["paid more than due"](None, paid_invoice))
    with unit_of_work(session_factory) as session:
        amount_paid = session.execute(
            select(InvoiceRow.amount_paid_minor).where(InvoiceRow.id == invoice.id)
        ).scalar_one()
    assert amount_paid == 0


ENUM_COLUMNS: list[tuple[type[Base], str, type[StrEnum]]] = [
    (InvoiceRow, "status", InvoiceStatus),
    (PaymentAttemptRow, "status", AttemptStatus),
    (PaymentAttemptRow, "outcome", ChargeOutcomeKind),
    (PlanRow, "interval", IntervalUnit),
    (PlanRow, "dunning_final_action", FinalAction),
]


@pytest.mark.parametrize(
    ("model", "column", "enum"), ENUM_COLUMNS, ids=lambda v: getattr(v, "__name__", str(v))
)
def test_status_checks_accept_exactly_the_enum_values(
    session_factory: sessionmaker[Session],
    paid_invoice: dict[str, Any],
    model: type[Base],
    column: str,
    enum: type[StrEnum],
) -> None:
    """The migration spells the allowed values out; this catches it drifting from the enum."""
    table = model.__table__
    quoted = f'"{column}"'
    for value in [*enum, "bogus"]:
        # Raw SQL: the ORM type would refuse an unknown value before the database sees it.
        statement = text(f"UPDATE {table.name} SET {quoted} = :value").bindparams(value=value)  # type: ignore[attr-defined]
        if value == "bogus":
            assert_refused(session_factory, statement)
        else:
            with unit_of_work(session_factory) as session:
                session.execute(statement)


def test_subscription_status_check_matches_the_enum(
    session_factory: sessionmaker[Session], paid_invoice: dict[str, Any]
) -> None:
    for value in [*SubscriptionStatus, "bogus"]:
        statement = text("UPDATE subscriptions SET status = :value").bindparams(value=value)
        if value == "bogus":
            assert_refused(session_factory, statement)
        else:
            with unit_of_work(session_factory) as session:
                session.execute(statement)
