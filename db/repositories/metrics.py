"""Counts for the business metrics the API serves at ``/metrics`` (billing.api.metrics): each
one aggregate query, grouped by a label. Reads only."""

from __future__ import annotations

from sqlalchemy import and_, case, func, select
from sqlalchemy.orm import Session

from billing.invoices import InvoiceStatus
from db.models import (
    INVOICES,
    NOTIFICATIONS,
    PAYMENT_ATTEMPTS,
    PAYMENTS,
    SUBSCRIPTIONS,
    WEBHOOK_EVENTS,
)


def charge_attempts_by_outcome(session: Session) -> dict[tuple[str, str], int]:
    """{(status, outcome or ""): attempts}: every charge attempt ever recorded."""
    rows = session.execute(
        select(PAYMENT_ATTEMPTS.c.status, PAYMENT_ATTEMPTS.c.outcome, func.count()).group_by(
            PAYMENT_ATTEMPTS.c.status, PAYMENT_ATTEMPTS.c.outcome
        )
    )
    return {(str(status), str(outcome or "")): int(n) for status, outcome, n in rows}


def dunning_recoveries(session: Session) -> int:
    """Invoices paid by an attempt after the first (a retry or a new card recovered them)."""
    return int(
        session.execute(
            select(func.count()).select_from(
                PAYMENTS.join(
                    PAYMENT_ATTEMPTS,
                    and_(
                        PAYMENT_ATTEMPTS.c.id == PAYMENTS.c.attempt_id,
                        PAYMENT_ATTEMPTS.c.attempt_number > 1,
                    ),
                )
            )
        ).scalar_one()
    )


def invoices_by_status(session: Session) -> dict[str, int]:
    rows = session.execute(select(INVOICES.c.status, func.count()).group_by(INVOICES.c.status))
    return {str(InvoiceStatus(status)): int(n) for status, n in rows}


def webhook_events_by_outcome(session: Session) -> dict[str, int]:
    rows = session.execute(
        select(WEBHOOK_EVENTS.c.outcome, func.count()).group_by(WEBHOOK_EVENTS.c.outcome)
    )
    return {str(outcome): int(n) for outcome, n in rows}


def notifications_by_state(session: Session) -> dict[str, int]:
    """{"sent": n, "pending": m}: notices delivered and notices still in the outbox."""
    sent = func.sum(case((NOTIFICATIONS.c.sent_at.isnot(None), 1), else_=0))
    row = session.execute(select(func.count(), sent)).one()
    total, delivered = int(row[0]), int(row[1] or 0)
    return {"sent": delivered, "pending": total - delivered}


def subscriptions_by_status(session: Session) -> dict[str, int]:
    rows = session.execute(
        select(SUBSCRIPTIONS.c.status, func.count()).group_by(SUBSCRIPTIONS.c.status)
    )
    return {str(status): int(n) for status, n in rows}
