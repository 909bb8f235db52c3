"""Credit notes in the database (SQLite and PostgreSQL): numbering per customer, the credit
to the balance, and the pre-payment credit note on an open invoice (its lower amount due,
compare-and-set, paid at 0, refused while a charge is in flight and unless callers allow it)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy.orm import Session, sessionmaker

from billing.balance import BalanceEntryKind
from billing.calendar import IntervalUnit
from billing.credit_notes import CreditNoteRequest
from billing.errors import ChangeRefused, InvalidInput
from billing.ids import new_id
from billing.invoices import InvoiceStatus, invoice_prefix_for
from billing.plans import Plan
from billing.records import (
    AttemptStatus,
    CustomerRecord,
    InvoiceRecord,
    PaymentAttemptRecord,
    SubscriptionRecord,
)
from billing.subscription import SubscriptionStatus
from db.engine import unit_of_work
from db.repositories import attempts as attempts_repo
from db.repositories import balances as balances_repo
from db.repositories import credit_notes as credit_notes_repo
from db.repositories import customers as customers_repo
from db.repositories import invoices as invoices_repo
from db.repositories import plans as plans_repo
from db.repositories import subscriptions as subscriptions_repo

NOW = datetime(2025, 3, 1, 9, 30, tzinfo=UTC)


@pytest.fixture
def factory(session_factory: sessionmaker[Session]) -> sessionmaker[Session]:
    """The module's database (SQLite and PostgreSQL, see tests/db/conftest.py)."""
    return session_factory


def open_invoice(factory: sessionmaker[Session], amount: int = 3000) -> InvoiceRecord:
    customer_id, subscription_id = new_id("cus"), new_id("sub")
    with unit_of_work(factory) as session:
        plans_repo.upsert_plan(session, Plan("p", "P", amount, "EUR", IntervalUnit.MONTH), now=NOW)
        customers_repo.insert_customer(
            session,
            CustomerRecord(
                id=customer_id,
                invoice_prefix=invoice_prefix_for(customer_id),
                timezone="UTC",
                created_at=NOW,
                updated_at=NOW,
            ),
        )
        subscriptions_repo.insert_subscription(
            session,
            SubscriptionRecord(
                id=subscription_id,
                customer_id=customer_id,
                plan_code="p",
                status=SubscriptionStatus.ACTIVE,
                amount_minor=amount,
                currency="EUR",
                interval=IntervalUnit.MONTH,
                interval_count=1,
                timezone="UTC",
                anchor_at=NOW,
                workflow_id=f"subscription-{subscription_id}",
                created_at=NOW,
                updated_at=NOW,
            ),
        )
        invoice, _ = invoices_repo.issue_invoice(
            session,
            InvoiceRecord(
                id=new_id("in"),
                number="",
                subscription_id=subscription_id,
                customer_id=customer_id,
                period_index=0,
                period_start=NOW,
                period_end=NOW.replace(month=4),
                amount_due_minor=amount,
                currency="EUR",
                status=InvoiceStatus.OPEN,
                created_at=NOW,
                finalized_at=NOW,
                description="P",
            ),
        )
    return invoice


def issue(factory: sessionmaker[Session], invoice_id: str, **request: object) -> object:
    allow = bool(request.pop("allow", True))
    with unit_of_work(factory) as session:
        return credit_notes_repo.issue_credit_note(
            session,
            invoice_id,
            CreditNoteRequest(**request),  # type: ignore[arg-type]
            at=NOW,
            allow_open_invoices=allow,
        )


def stored(factory: sessionmaker[Session], invoice_id: str) -> InvoiceRecord:
    with unit_of_work(factory) as session:
        found = invoices_repo.get_invoice(session, invoice_id)
    assert found is not None
    return found


def test_an_open_invoice_credit_note_lowers_the_amount_due_by_line_and_keeps_it_open(
    factory: sessionmaker[Session],
) -> None:
    invoice = open_invoice(factory)
    with unit_of_work(factory) as session:
        [line] = invoices_repo.list_invoice_lines(session, invoice.id)

    with pytest.raises(ChangeRefused, match="does not issue pre-payment credit notes"):
        issue(factory, invoice.id, amount_minor=100, allow=False)
    assert stored(factory, invoice.id).amount_due_minor == 3000

    from billing.credit_notes import LineRequest

    issued = issue(factory, invoice.id, lines=(LineRequest(line.id, 1200),))
    lowered = stored(factory, invoice.id)
    assert (lowered.status, lowered.amount_due_minor, lowered.subtotal_minor) == (
        InvoiceStatus.OPEN,
        1800,
        3000,
    )
    note = issued.credit_note  # type: ignore[attr-defined]
    assert (note.type, note.amount_due_reduction_minor, note.refund_amount_minor) == (
        "pre_payment",
        1200,
        0,
    )
    with pytest.raises(InvalidInput) as over:
        issue(factory, invoice.id, lines=(LineRequest(line.id, 1801),))
    assert over.value.field == "lines[0].amount_minor"
    assert stored(factory, invoice.id).amount_due_minor == 1800


def test_an_open_invoice_with_a_charge_in_flight_is_not_lowered(
    factory: sessionmaker[Session],
) -> None:
    invoice = open_invoice(factory)
    with unit_of_work(factory) as session:
        attempts_repo.insert_pending_attempt(
            session,
            PaymentAttemptRecord(
                id=new_id("pa"),
                invoice_id=invoice.id,
                attempt_number=1,
                idempotency_key=f"{invoice.id}-attempt-1",
                amount_minor=3000,
                currency="EUR",
                reason="scheduled",
                created_at=NOW,
            ),
        )
    with pytest.raises(ChangeRefused, match="charge attempt 1 in flight"):
        issue(factory, invoice.id, amount_minor=100)
    assert stored(factory, invoice.id).amount_due_minor == 3000


def attempt(
    factory: sessionmaker[Session],
    invoice: InvoiceRecord,
    number: int,
    status: AttemptStatus,
    intent: str | None = "pi_one",
) -> None:
    with unit_of_work(factory) as session:
        attempts_repo.insert_pending_attempt(
            session,
            PaymentAttemptRecord(
                id=new_id("pa"),
                invoice_id=invoice.id,
                attempt_number=number,
                idempotency_key=f"{invoice.id}-attempt-{number}",
                amount_minor=invoice.amount_due_minor,
                currency="EUR",
                reason="scheduled",
                created_at=NOW,
                stripe_payment_intent_id=intent,
            ),
        )
        if status != AttemptStatus.PENDING:
            found = attempts_repo.get_attempt(session, invoice.id, number)
            assert found is not None
            attempts_repo.record_attempt_outcome(
                session,
                found.id,
                status=status,
                outcome=None,
                decline_code=None,
                failure_message=None,
                payment_intent_id=intent,
                charge_id=None,
                payment_method_id=None,
                completed_at=NOW,
            )


def test_a_credit_note_that_brings_the_amount_due_to_0_pays_the_invoice(
    factory: sessionmaker[Session],
) -> None:
    invoice = open_invoice(factory)
    issue(factory, invoice.id, amount_minor=1000)
    assert stored(factory, invoice.id).status == InvoiceStatus.OPEN
    issued = issue(factory, invoice.id, amount_minor=2000)
    paid = stored(factory, invoice.id)
    assert (paid.status, paid.amount_due_minor, paid.amount_paid_minor, paid.paid_at) == (
        InvoiceStatus.PAID,
        0,
        0,
        NOW,
    )
    assert paid.status_reason == f"paid by credit note {issued.credit_note.number}"  # type: ignore[attr-defined]
    assert issued.invoice == paid  # type: ignore[attr-defined]
    # Nothing is left to credit, and no refund can come of it (nothing was captured).
    with pytest.raises(ChangeRefused, match="fully credited"):
        issue(factory, invoice.id, amount_minor=1)


def test_a_charge_that_succeeded_or_waits_for_authentication_refuses_a_credit_note(
    factory: sessionmaker[Session],
) -> None:
    succeeded = open_invoice(factory)
    attempt(factory, succeeded, 1, AttemptStatus.SUCCEEDED)
    with pytest.raises(ChangeRefused, match="was charged"):
        issue(factory, succeeded.id, amount_minor=100)

    waiting = open_invoice(factory)
    attempt(factory, waiting, 1, AttemptStatus.REQUIRES_ACTION)
    with pytest.raises(ChangeRefused, match="charge attempt 1 in flight"):
        issue(factory, waiting.id, amount_minor=100)
    # A new card confirmed the same intent again (declined): the authentication it waited for
    # is gone, so the invoice can be credited.
    attempt(factory, waiting, 2, AttemptStatus.FAILED)
    issue(factory, waiting.id, amount_minor=100)
    assert stored(factory, waiting.id).amount_due_minor == 2900

    # An invoice charged before one intent per invoice: the other intent can still be paid.
    legacy = open_invoice(factory)
    attempt(factory, legacy, 1, AttemptStatus.REQUIRES_ACTION, intent="pi_first")
    attempt(factory, legacy, 2, AttemptStatus.FAILED, intent="pi_second")
    with pytest.raises(ChangeRefused, match="charge attempt 1 in flight"):
        issue(factory, legacy.id, amount_minor=100)
    assert stored(factory, legacy.id).amount_due_minor == 3000


def test_numbers_follow_the_customer_and_credits_reach_the_balance_once(
    factory: sessionmaker[Session],
) -> None:
    invoice = open_invoice(factory, amount=1000)
    with unit_of_work(factory) as session:
        invoices_repo.transition_invoice(session, invoice.id, to=InvoiceStatus.PAID, at=NOW)
    first = issue(factory, invoice.id, credit_amount_minor=300)
    second = issue(factory, invoice.id, credit_amount_minor=200, out_of_band_amount_minor=100)
    numbers = [first.credit_note.number, second.credit_note.number]  # type: ignore[attr-defined]
    prefix = invoice.number.split("-")[0]
    assert numbers == [f"{prefix}-CN-0001", f"{prefix}-CN-0002"]
    with unit_of_work(factory) as session:
        entries = balances_repo.list_entries(session, invoice.customer_id)
        assert [(e.kind, e.amount_minor) for e in entries] == [
            (BalanceEntryKind.CREDIT_NOTE, 300),
            (BalanceEntryKind.CREDIT_NOTE, 200),
        ]
        assert balances_repo.credit_balance(session, invoice.customer_id, "EUR") == 500
    # Paid without a card charge (no payment): nothing can be refunded.
    with pytest.raises(InvalidInput) as refused:
        issue(factory, invoice.id, refund_amount_minor=1)
    assert refused.value.field == "refund_amount_minor"
