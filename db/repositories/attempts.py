"""Charge attempts: one row per (invoice, attempt number), written as pending before the
provider is called and completed with the outcome afterwards."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BindParameter, bindparam, func, update
from sqlalchemy.orm import Session

from billing.errors import ChangeRefused, NotFound
from billing.payments import ChargeOutcomeKind
from billing.records import AttemptStatus, PaymentAttemptRecord
from db.models import PAYMENT_ATTEMPTS
from db.repositories._rows import fetch_all, fetch_one, insert_or_get, select_rows


def get_attempt(
    session: Session, invoice_id: str, attempt_number: int
) -> PaymentAttemptRecord | None:
    return fetch_one(
        session,
        PaymentAttemptRecord,
        select_rows(PAYMENT_ATTEMPTS).where(
            PAYMENT_ATTEMPTS.c.invoice_id == invoice_id,
            PAYMENT_ATTEMPTS.c.attempt_number == attempt_number,
        ),
    )


def get_attempt_by_payment_intent(
    session: Session, payment_intent_id: str
) -> PaymentAttemptRecord | None:
    """The first attempt that created or confirmed the provider payment intent
    ``payment_intent_id`` (several attempts of one invoice share its intent)."""
    return fetch_one(
        session,
        PaymentAttemptRecord,
        select_rows(PAYMENT_ATTEMPTS)
        .where(PAYMENT_ATTEMPTS.c.stripe_payment_intent_id == payment_intent_id)
        .order_by(PAYMENT_ATTEMPTS.c.created_at)
        .limit(1),
    )


def list_attempts_for_payment_intent(
    session: Session, payment_intent_id: str
) -> list[PaymentAttemptRecord]:
    """Every attempt that created or confirmed the PaymentIntent ``payment_intent_id``, by
    attempt number. An invoice has one intent, so all its attempts can share it."""
    return fetch_all(
        session,
        PaymentAttemptRecord,
        select_rows(PAYMENT_ATTEMPTS)
        .where(PAYMENT_ATTEMPTS.c.stripe_payment_intent_id == payment_intent_id)
        .order_by(PAYMENT_ATTEMPTS.c.attempt_number),
    )


_LIST_ATTEMPTS_FOR_INVOICE = (
    select_rows(PAYMENT_ATTEMPTS)
    .where(PAYMENT_ATTEMPTS.c.invoice_id == bindparam("invoice_id"))
    .order_by(PAYMENT_ATTEMPTS.c.attempt_number)
)


def list_attempts_for_invoice(session: Session, invoice_id: str) -> list[PaymentAttemptRecord]:
    """The invoice's attempts by attempt number."""
    return fetch_all(
        session, PaymentAttemptRecord, _LIST_ATTEMPTS_FOR_INVOICE, {"invoice_id": invoice_id}
    )


def insert_pending_attempt(
    session: Session, record: PaymentAttemptRecord
) -> tuple[PaymentAttemptRecord, bool]:
    """Insert the attempt; ``(existing, False)`` if (invoice, attempt number) is already
    recorded. A retried charge activity thereby reuses the first attempt's idempotency key."""
    return insert_or_get(
        session,
        PAYMENT_ATTEMPTS,
        record,
        lambda: get_attempt(session, record.invoice_id, record.attempt_number),
    )


def record_attempt_outcome(
    session: Session,
    attempt_id: str,
    *,
    status: AttemptStatus | str,
    outcome: ChargeOutcomeKind | None,
    decline_code: str | None,
    failure_message: str | None,
    payment_intent_id: str | None,
    charge_id: str | None,
    payment_method_id: str | None,
    completed_at: datetime | None,
) -> PaymentAttemptRecord:
    """Complete the attempt with what the provider said (``completed_at`` UTC).

    Provider ids passed as None keep what is already recorded. A succeeded attempt stays
    succeeded: recording anything else on it raises ChangeRefused, because it means money
    was taken and something is about to forget it.
    """
    status = AttemptStatus(status)
    outcome = None if outcome is None else ChargeOutcomeKind(outcome)
    statement = _RECORD_SUCCESS if status == AttemptStatus.SUCCEEDED else _RECORD_UNLESS_SUCCEEDED
    updated = (
        session.execute(
            statement,
            {
                "attempt_id": attempt_id,
                "new_status": status,
                "new_outcome": outcome,
                "new_decline_code": decline_code,
                "new_failure_message": failure_message,
                "new_payment_intent_id": payment_intent_id,
                "new_charge_id": charge_id,
                "new_payment_method_id": payment_method_id,
                "new_completed_at": completed_at,
            },
        )
        .mappings()
        .first()
    )
    if updated is None:
        current = fetch_one(
            session,
            PaymentAttemptRecord,
            select_rows(PAYMENT_ATTEMPTS).where(PAYMENT_ATTEMPTS.c.id == attempt_id),
        )
        if current is None:
            raise NotFound(f"payment attempt {attempt_id} not found")
        raise ChangeRefused(
            f"payment attempt {attempt_id} (invoice {current.invoice_id}, attempt "
            f"{current.attempt_number}) already succeeded; it cannot become {status.value}"
        )
    return PaymentAttemptRecord(**updated)


def _typed(name: str, column: str) -> BindParameter[Any]:
    return bindparam(name, type_=PAYMENT_ATTEMPTS.c[column].type)


# Provider ids passed as None keep what is recorded (COALESCE); built once (see _rows).
_RECORD_SUCCESS = (
    update(PAYMENT_ATTEMPTS)
    .where(PAYMENT_ATTEMPTS.c.id == bindparam("attempt_id"))
    .values(
        status=_typed("new_status", "status"),
        outcome=_typed("new_outcome", "outcome"),
        decline_code=_typed("new_decline_code", "decline_code"),
        failure_message=_typed("new_failure_message", "failure_message"),
        stripe_payment_intent_id=func.coalesce(
            _typed("new_payment_intent_id", "stripe_payment_intent_id"),
            PAYMENT_ATTEMPTS.c.stripe_payment_intent_id,
        ),
        stripe_charge_id=func.coalesce(
            _typed("new_charge_id", "stripe_charge_id"), PAYMENT_ATTEMPTS.c.stripe_charge_id
        ),
        payment_method_id=func.coalesce(
            _typed("new_payment_method_id", "payment_method_id"),
            PAYMENT_ATTEMPTS.c.payment_method_id,
        ),
        completed_at=_typed("new_completed_at", "completed_at"),
    )
    .returning(*PAYMENT_ATTEMPTS.c)
)
#: Anything but a success: never over a succeeded attempt.
_RECORD_UNLESS_SUCCEEDED = _RECORD_SUCCESS.where(
    PAYMENT_ATTEMPTS.c.status != AttemptStatus.SUCCEEDED
)
