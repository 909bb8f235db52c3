# The ``stack`` fixture is imported from the activities' main test module; each test's
# ``stack`` parameter is that fixture, not a redefinition.
# ruff: noqa: F811
"""What a paid charge costs the database (issue 16: the engine's share of a billing cycle):
two transactions, the invoice read once, the customer's lock taken by the statement that
reads the customer. The money is recorded as before: one attempt, one payment, invoice paid,
its event and receipt."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, event

from billing.invoices import InvoiceStatus
from billing.payments import ChargeOutcomeKind
from billing.records import AttemptStatus
from billing.testing import cards
from db.engine import unit_of_work
from db.repositories import events as events_repo
from tests.activities.test_billing_activities import (
    Stack,
    charge,
    open_invoice,
    seed_subscription,
    stack,  # noqa: F401  (a fixture, used by its name)
    stored_attempts,
    stored_invoice,
    stored_payments,
)
from tests.conftest import BOTH_BACKENDS


@contextmanager
def recorded_statements(engine: Engine) -> Iterator[list[str]]:
    statements: list[str] = []

    def before(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(" ".join(statement.split()))

    def on_commit(_conn: Any) -> None:
        statements.append("COMMIT")

    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine, "commit", on_commit)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", before)
        event.remove(engine, "commit", on_commit)


def reads_of(statements: list[str], table: str) -> list[str]:
    """Reads of ``table``'s rows (the statements selecting its columns)."""
    return [s for s in statements if re.match(rf"SELECT {table}\.", s)]


@BOTH_BACKENDS
def test_a_paid_charge_reads_the_invoice_once_in_two_transactions(stack: Stack) -> None:
    seeded = seed_subscription(stack, card=cards.SUCCEEDS)
    invoice = open_invoice(stack, seeded)

    with recorded_statements(stack.engine) as statements:
        paid = charge(stack, invoice.invoice_id, 1)

    assert paid.outcome == ChargeOutcomeKind.PAID and paid.payment_id is not None
    # The attempt recorded before the send, the outcome with its settlement after it.
    assert statements.count("COMMIT") == 2
    assert len(reads_of(statements, "invoices")) == 1
    # The customer is read by the statement that takes its lock, and by nothing else.
    [customer_read] = reads_of(statements, "customers")
    if stack.engine.dialect.name == "postgresql":
        assert customer_read.endswith("FOR NO KEY UPDATE")
    assert not [s for s in statements if s.startswith("UPDATE customers")]

    # What is recorded is what it was: one attempt, one payment, paid, its event and receipt.
    [attempt] = stored_attempts(stack, invoice.invoice_id)
    assert attempt.status == AttemptStatus.SUCCEEDED
    [payment] = stored_payments(stack, invoice.invoice_id)
    settled = stored_invoice(stack, invoice.invoice_id)
    assert (settled.status, settled.amount_paid_minor) == (InvoiceStatus.PAID, payment.amount_minor)
    assert settled.stripe_payment_intent_id == paid.payment_intent_id
    with unit_of_work(stack.session_factory) as session:
        shown = events_repo.get_event_by_dedupe_key(session, f"{invoice.invoice_id}:invoice.paid")
    assert shown is not None
    # The event shows the invoice as GET shows it: paid, with its payment and lines.
    assert shown.object["status"] == "paid"
    assert shown.object["amount_paid_minor"] == payment.amount_minor
    assert shown.object["payment"]["stripe_payment_intent_id"] == paid.payment_intent_id
    assert len(shown.object["lines"]) == 1
