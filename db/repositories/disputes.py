"""Disputes (``billing.disputes``): one row per provider dispute, as last read from it."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from billing.disputes import DisputeStatus, ProviderDispute, dispute_status_after
from billing.ids import new_id
from billing.records import DisputeRecord, PaymentRecord
from db.models import DISPUTES
from db.repositories._rows import fetch_all, fetch_one, insert_or_get, select_rows

_HOLDING = [s.value for s in DisputeStatus if s.holds_money]


def held_minor(session: Session, payment_id: str) -> int:
    """What the payment's disputes hold (open chargebacks and lost ones), minor units."""
    total = session.execute(
        select(func.coalesce(func.sum(DISPUTES.c.amount_minor), 0)).where(
            DISPUTES.c.payment_id == payment_id, DISPUTES.c.status.in_(_HOLDING)
        )
    ).scalar_one()
    return int(total)


def get_dispute_by_provider_id(session: Session, stripe_dispute_id: str) -> DisputeRecord | None:
    return fetch_one(
        session,
        DisputeRecord,
        select_rows(DISPUTES).where(DISPUTES.c.stripe_dispute_id == stripe_dispute_id),
    )


def list_disputes(session: Session, *, payment_id: str | None = None) -> list[DisputeRecord]:
    statement = select_rows(DISPUTES)
    if payment_id is not None:
        statement = statement.where(DISPUTES.c.payment_id == payment_id)
    return fetch_all(
        session, DisputeRecord, statement.order_by(DISPUTES.c.created_at, DISPUTES.c.id)
    )


def record_dispute(
    session: Session, payment: PaymentRecord | None, reported: ProviderDispute, *, at: datetime
) -> tuple[DisputeRecord, bool]:
    """Record the dispute as the provider holds it: inserted once (its provider id is unique),
    then updated; a closed dispute never reopens (``dispute_status_after``)."""
    before, after = record_dispute_change(session, payment, reported, at=at)
    return after, before is None


def record_dispute_change(
    session: Session, payment: PaymentRecord | None, reported: ProviderDispute, *, at: datetime
) -> tuple[DisputeRecord | None, DisputeRecord]:
    """``record_dispute``, answering ``(as it was, as it is now)``: as it was None when this
    call inserted it."""
    record = DisputeRecord(
        id=new_id("dp"),
        stripe_dispute_id=reported.dispute_id,
        stripe_charge_id=reported.charge_id,
        amount_minor=reported.amount_minor,
        currency=reported.currency,
        status=reported.status,
        created_at=at,
        updated_at=at,
        payment_id=payment.id if payment is not None else None,
        invoice_id=payment.invoice_id if payment is not None else None,
        reason=reported.reason[:64] if reported.reason else None,
        evidence_due_by=reported.evidence_due_by,
        closed_at=at if reported.status.closed else None,
    )
    stored, inserted = insert_or_get(
        session, DISPUTES, record, lambda: get_dispute_by_provider_id(session, reported.dispute_id)
    )
    if inserted:
        return None, stored
    status = dispute_status_after(stored.status, reported.status)
    row = (
        session.execute(
            update(DISPUTES)
            .where(DISPUTES.c.id == stored.id)
            .values(
                status=status,
                amount_minor=reported.amount_minor,
                updated_at=at,
                evidence_due_by=reported.evidence_due_by or stored.evidence_due_by,
                closed_at=(stored.closed_at or at) if status.closed else None,
            )
            .returning(*DISPUTES.c)
        )
        .mappings()
        .one()
    )
    return stored, DisputeRecord(**row)
