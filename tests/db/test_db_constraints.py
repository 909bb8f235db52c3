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
from db.models import (
    CustomerRow,
    InvoiceRow,
    PaymentAttemptRow,
    PaymentRow,
    PlanRow,
    SubscriptionRow,
)
from db.repositories._rows import column_values


def raw_insert(model: type[Base], record: object, **changes: Any) -> Executable:
    """An INSERT straight into the table, past every repository check."""
    return insert(model).values({**column_values(record), **changes})


def assert_refused(
    session_factory: sessionmaker[Session], statement: Executable, match: str | None = None
) -> None:
    with pytest.raises(IntegrityError, match=match), unit_of_work(session_factory) as session:
        session.execute(statement)


@pytest.fixture
def rows(session_factory: sessionmaker[Session], factory: Any) -> dict[str, Any]:
    """Committed: a subscription with a paid invoice (two attempts, one payment) and a
    second invoice with one attempt."""
    with unit_of_work(session_factory) as session:
        subscription = factory.subscription(session)
        invoice = factory.invoice(session, subscription)
        attempt = factory.attempt(session, invoice, 1)
        attempt2 = factory.attempt(session, invoice, 2)
        payment = factory.payment_record(invoice, attempt2)
        session.execute(raw_insert(PaymentRow, payment))
        other_invoice = factory.invoice(session, subscription, period_index=1)
        other_attempt = factory.attempt(session, other_invoice, 1)
        # A change's invoice may share the renewal's period start (a change at the renewal).
        session.execute(
            raw_insert(InvoiceRow, invoice, id=new_id("in"), number="CHANGE-0001", change_id="c1")
        )
    return {
        "subscription": subscription,
        "invoice": invoice,
        "attempt": attempt,
        "attempt2": attempt2,
        "payment": payment,
        "other_invoice": other_invoice,
        "other_attempt": other_attempt,
    }


Build = Callable[[Any, dict[str, Any]], Executable]

#: case -> (statement, what PostgreSQL names in its error, what SQLite names in its error).
#: Each statement breaks exactly one constraint, so the message proves which one held.
CASES: dict[str, tuple[Build, str, str]] = {
    # One renewal invoice per (subscription, period start), even with a fresh id and number.
    "second invoice for the same period": (
        lambda f, d: raw_insert(InvoiceRow, d["invoice"], id=new_id("in"), number="OTHER-0001"),
        "uq_invoices_renewal_period",
        "invoices.subscription_id, invoices.period_start",
    ),
    # One invoice per plan change.
    "second invoice for the same change": (
        lambda f, d: raw_insert(
            InvoiceRow, d["invoice"], id=new_id("in"), number="OTHER-0003", change_id="c1"
        ),
        "uq_invoices_change_id",
        "invoices.change_id",
    ),
    "duplicate invoice number": (
        lambda f, d: raw_insert(
            InvoiceRow, f.invoice_record(d["subscription"], 7), number=d["invoice"].number
        ),
        "uq_invoices_number",
        "invoices.number",
    ),
    # One attempt per (invoice, attempt number), even under another idempotency key.
    "second attempt with the same number": (
        lambda f, d: raw_insert(
            PaymentAttemptRow, f.attempt_record(d["invoice"], 1), idempotency_key="other-key"
        ),
        "uq_payment_attempts_invoice_id_attempt_number",
        "payment_attempts.invoice_id, payment_attempts.attempt_number",
    ),
    "reused idempotency key": (
        lambda f, d: raw_insert(
            PaymentAttemptRow,
            f.attempt_record(d["invoice"], 3),
            idempotency_key=d["attempt"].idempotency_key,
        ),
        "uq_payment_attempts_idempotency_key",
        "payment_attempts.idempotency_key",
    ),
    "attempt number zero": (
        lambda f, d: raw_insert(PaymentAttemptRow, f.attempt_record(d["invoice"], 0)),
        "ck_payment_attempts_attempt_number_positive",
        "ck_payment_attempts_attempt_number_positive",
    ),
    # Never two settled payments for one invoice.
    "second payment for the same invoice": (
        lambda f, d: raw_insert(PaymentRow, f.payment_record(d["invoice"], d["attempt"])),
        "uq_payments_invoice_id",
        "payments.invoice_id",
    ),
    "one payment intent booked for two invoices": (
        lambda f, d: raw_insert(
            PaymentRow,
            f.payment_record(d["other_invoice"], d["other_attempt"]),
            stripe_payment_intent_id=d["payment"].stripe_payment_intent_id,
        ),
        "uq_payments_stripe_payment_intent_id",
        "payments.stripe_payment_intent_id",
    ),
    "zero payment": (
        lambda f, d: (
            update(PaymentRow).where(PaymentRow.id == d["payment"].id).values(amount_minor=0)
        ),
        "ck_payments_amount_minor_positive",
        "ck_payments_amount_minor_positive",
    ),
    # amount_paid <= amount_due and amount_paid >= 0 already imply amount_due >= 0, so either
    # check may be the one reported.
    "negative amount due": (
        lambda f, d: (
            update(InvoiceRow).where(InvoiceRow.id == d["invoice"].id).values(amount_due_minor=-1)
        ),
        "ck_invoices_amount_(due_nonnegative|paid_within_due)",
        "ck_invoices_amount_(due_nonnegative|paid_within_due)",
    ),
    "paid more than due": (
        lambda f, d: (
            update(InvoiceRow)
            .where(InvoiceRow.id == d["invoice"].id)
            .values(amount_paid_minor=d["invoice"].amount_due_minor + 1)
        ),
        "ck_invoices_amount_paid_within_due",
        "ck_invoices_amount_paid_within_due",
    ),
    "negative amount paid": (
        lambda f, d: (
            update(InvoiceRow).where(InvoiceRow.id == d["invoice"].id).values(amount_paid_minor=-1)
        ),
        "ck_invoices_amount_paid_within_due",
        "ck_invoices_amount_paid_within_due",
    ),
    "negative attempt amount": (
        lambda f, d: (
            update(PaymentAttemptRow)
            .where(PaymentAttemptRow.id == d["attempt"].id)
            .values(amount_minor=-100)
        ),
        "ck_payment_attempts_amount_minor_nonnegative",
        "ck_payment_attempts_amount_minor_nonnegative",
    ),
    "negative plan price": (
        lambda f, d: update(PlanRow).values(amount_minor=-1),
        "ck_plans_amount_minor_nonnegative",
        "ck_plans_amount_minor_nonnegative",
    ),
    "invoice sequence below one": (
        lambda f, d: (
            update(CustomerRow)
            .where(CustomerRow.id == d["invoice"].customer_id)
            .values(next_invoice_sequence=0)
        ),
        "ck_customers_next_invoice_sequence",
        "ck_customers_next_invoice_sequence",
    ),
    "invoice for an unknown subscription": (
        lambda f, d: raw_insert(
            InvoiceRow,
            f.invoice_record(d["subscription"], 5),
            number="X-0005",
            subscription_id="sub_missing",
        ),
        "fk_invoices_subscription_id_subscriptions",
        "FOREIGN KEY constraint failed",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_database_refuses(
    case: str,
    backend: str,
    session_factory: sessionmaker[Session],
    factory: Any,
    rows: dict[str, Any],
) -> None:
    build, on_postgres, on_sqlite = CASES[case]
    expected = on_postgres if backend == "postgres" else on_sqlite
    assert_refused(session_factory, build(factory, rows), match=expected)


def test_a_refused_write_leaves_the_invoice_as_it_was(
    session_factory: sessionmaker[Session], rows: dict[str, Any]
) -> None:
    invoice = rows["invoice"]
    build, _, on_sqlite = CASES["paid more than due"]
    assert_refused(session_factory, build(None, rows), match=on_sqlite)
    with unit_of_work(session_factory) as session:
        amount_paid = session.execute(
            select(InvoiceRow.amount_paid_minor).where(InvoiceRow.id == invoice.id)
        ).scalar_one()
    assert amount_paid == 0


ENUM_COLUMNS: list[tuple[type[Base], str, type[StrEnum]]] = [
    (SubscriptionRow, "status", SubscriptionStatus),
    (SubscriptionRow, "interval", IntervalUnit),
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
    rows: dict[str, Any],
    model: type[Base],
    column: str,
    enum: type[StrEnum],
) -> None:
    """The migration spells the allowed values out; this catches it drifting from the enum."""
    table = model.__table__
    quoted = f'"{column}"'
    for value in [*enum, "bogus"]:
        # Raw SQL: the ORM type would refuse an unknown value before the database sees it.
        statement = text(f"UPDATE {table.name} SET {quoted} = :value").bindparams(value=value)
        if value == "bogus":
            assert_refused(session_factory, statement, match=f"ck_{table.name}_{column}")
        else:
            with unit_of_work(session_factory) as session:
                session.execute(statement)
