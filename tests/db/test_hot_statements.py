"""The statements every billed period runs several times are built once (``db/repositories``,
"Hot statements" in ``_rows``): after the first call, calling them again builds no statement
and computes no SQLAlchemy cache key, and they read and write what they did before."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event as sqlalchemy_event
from sqlalchemy.orm import Session
from sqlalchemy.sql.cache_key import HasCacheKey

from billing.payments import ChargeOutcomeKind
from billing.records import AttemptStatus
from db.repositories import attempts, balances, events, invoices, payments, subscriptions
from tests.db.conftest import Factory


@contextmanager
def cache_keys_computed() -> Iterator[list[str]]:
    """The statements whose cache key SQLAlchemy computes in the block (one per statement
    object: a statement built per call computes its own every time)."""
    computed: list[str] = []
    real = HasCacheKey._generate_cache_key

    def counting(self: Any) -> Any:
        computed.append(type(self).__name__)
        return real(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(HasCacheKey, "_generate_cache_key", counting)
        yield computed


def test_hot_statements_compute_no_cache_key_once_warm(session: Session, factory: Factory) -> None:
    subscription = factory.subscription(session)
    invoice = factory.invoice(session, subscription)
    attempt = factory.attempt(session, invoice)
    later = factory.t0 + timedelta(days=1)
    calls: list[Callable[[], Any]] = [
        lambda: invoices.get_invoice(session, invoice.id),
        lambda: invoices.list_invoice_lines(session, invoice.id),
        lambda: invoices.record_payment_intent(session, invoice.id, "pi_hot"),
        lambda: attempts.list_attempts_for_invoice(session, invoice.id),
        lambda: attempts.record_attempt_outcome(
            session,
            attempt.id,
            status=AttemptStatus.FAILED,
            outcome=ChargeOutcomeKind.SOFT_DECLINE,
            decline_code="insufficient_funds",
            failure_message="declined",
            payment_intent_id="pi_hot",
            charge_id=None,
            payment_method_id=None,
            completed_at=later,
        ),
        lambda: payments.get_payment_for_invoice(session, invoice.id),
        lambda: subscriptions.get_subscription(session, subscription.id),
        lambda: subscriptions.parked_at(session, [subscription.id]),
        lambda: balances.lock_customer_of_invoice(session, invoice.id),
        lambda: balances.credit_balance(session, subscription.customer_id, "USD"),
        lambda: events.list_endpoints(session),
        lambda: events.get_event_by_dedupe_key(session, "no-such-key"),
        lambda: events.record_event(
            session,
            type="invoice.payment_failed",
            subscription_id=subscription.id,
            object_id=invoice.id,
            object={"id": invoice.id},
            dedupe_key=f"{invoice.id}:hot",
            created_at=later,
        ),
    ]
    for call in calls:
        call()  # warm: each statement's key once, as at a worker's first billed period
    with cache_keys_computed() as computed:
        results = [call() for call in calls]
    assert computed == []
    # And they still do their work.
    assert results[0] is not None and results[0].stripe_payment_intent_id == "pi_hot"
    assert [a.status for a in results[3]] == [AttemptStatus.FAILED]
    assert results[4].decline_code == "insufficient_funds"
    assert results[6] is not None and results[6].id == subscription.id
    assert results[8] is not None and results[8].id == subscription.customer_id
    assert results[12] is None  # the same dedupe key: recorded once
    assert events.get_event_by_dedupe_key(session, f"{invoice.id}:hot") is not None


def test_a_success_is_recorded_and_never_overwritten(session: Session, factory: Factory) -> None:
    invoice = factory.invoice(session)
    attempt = factory.attempt(session, invoice)
    outcome: dict[str, Any] = {
        "outcome": ChargeOutcomeKind.PAID,
        "decline_code": None,
        "failure_message": None,
        "payment_intent_id": "pi_1",
        "charge_id": "ch_1",
        "payment_method_id": "pm_1",
        "completed_at": factory.t0,
    }
    paid = attempts.record_attempt_outcome(
        session, attempt.id, status=AttemptStatus.SUCCEEDED, **outcome
    )
    assert (paid.status, paid.stripe_charge_id, paid.payment_method_id) == (
        AttemptStatus.SUCCEEDED,
        "ch_1",
        "pm_1",
    )
    # None keeps what is recorded; a success is recorded again as it was.
    again = attempts.record_attempt_outcome(
        session,
        attempt.id,
        status=AttemptStatus.SUCCEEDED,
        **{**outcome, "charge_id": None, "payment_method_id": None},
    )
    assert (again.stripe_charge_id, again.payment_method_id) == ("ch_1", "pm_1")
    with pytest.raises(Exception, match="already succeeded"):
        attempts.record_attempt_outcome(
            session,
            attempt.id,
            status=AttemptStatus.FAILED,
            **{**outcome, "outcome": ChargeOutcomeKind.HARD_DECLINE},
        )


def test_an_event_is_not_read_back_through_returning(session: Session, factory: Factory) -> None:
    """The outbox's insert returns the new row's key only: its JSON ``object`` was encoded on
    insert and would be decoded straight back. The event it returns is the row as stored."""
    subscription = factory.subscription(session)
    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    engine = session.get_bind()
    sqlalchemy_event.listen(engine, "before_cursor_execute", seen)
    try:
        recorded = events.record_event(
            session,
            type="customer.subscription.updated",
            subscription_id=subscription.id,
            object_id=subscription.id,
            object={"id": subscription.id, "items": [{"amount": 900, "currency": "usd"}]},
            dedupe_key=f"{subscription.id}:returning",
            created_at=factory.t0,
        )
    finally:
        sqlalchemy_event.remove(engine, "before_cursor_execute", seen)
    insert = next(s for s in statements if s.lstrip().upper().startswith("INSERT INTO EVENTS"))
    returning = insert.upper().split("RETURNING", 1)[1]
    assert "OBJECT" not in returning and "ID" in returning, insert
    assert recorded is not None
    assert events.get_event(session, recorded.id) == recorded
