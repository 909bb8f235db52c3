"""Settled payments: at most one per invoice, enforced by a unique constraint."""

from __future__ import annotations

from sqlalchemy import bindparam
from sqlalchemy.orm import Session

from billing.records import PaymentRecord
from db.models import PAYMENTS
from db.repositories._rows import fetch_all, fetch_one, insert_or_get, select_rows

_GET_PAYMENT_FOR_INVOICE = select_rows(PAYMENTS).where(
    PAYMENTS.c.invoice_id == bindparam("invoice_id")
)


def get_payment_for_invoice(session: Session, invoice_id: str) -> PaymentRecord | None:
    return fetch_one(session, PaymentRecord, _GET_PAYMENT_FOR_INVOICE, {"invoice_id": invoice_id})


def list_payments_for_invoice(session: Session, invoice_id: str) -> list[PaymentRecord]:
    """The invoice's payments (the schema allows at most one)."""
    return fetch_all(
        session,
        PaymentRecord,
        select_rows(PAYMENTS)
        .where(PAYMENTS.c.invoice_id == invoice_id)
        .order_by(PAYMENTS.c.settled_at),
    )


def insert_payment(session: Session, record: PaymentRecord) -> tuple[PaymentRecord, bool]:
    """Record the invoice's settlement; ``(existing, False)`` if the invoice already has one.

    If the existing payment has a different ``stripe_payment_intent_id``, the customer was
    charged twice for this invoice: only the first is booked, and the second needs a refund.
    """
    return insert_or_get(
        session,
        PAYMENTS,
        record,
        lambda: get_payment_for_invoice(session, record.invoice_id),
    )
