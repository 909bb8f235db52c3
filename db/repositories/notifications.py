"""The notification outbox: notices are written with the change they report and delivered
later; ``dedupe_key`` makes each notice exist once however often it is enqueued."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import and_, or_, update
from sqlalchemy.orm import Session

from billing.ids import new_id
from billing.notices import NoticeKind, NoticeStatus
from billing.records import InvoiceRecord, NotificationRecord, SubscriptionRecord
from billing.subscription import SubscriptionStatus
from db.engine import mark_delivery_written
from db.models import NOTIFICATIONS, SUBSCRIPTIONS
from db.repositories._rows import fetch_all, fetch_one, insert_or_get, select_rows


def get_notification_by_dedupe_key(session: Session, dedupe_key: str) -> NotificationRecord | None:
    return fetch_one(
        session,
        NotificationRecord,
        select_rows(NOTIFICATIONS).where(NOTIFICATIONS.c.dedupe_key == dedupe_key),
    )


def enqueue_notification(
    session: Session, record: NotificationRecord
) -> tuple[NotificationRecord, bool]:
    """Put the notice in the outbox; ``(existing, False)`` if its dedupe key is already there."""
    stored, created = insert_or_get(
        session,
        NOTIFICATIONS,
        record,
        lambda: get_notification_by_dedupe_key(session, record.dedupe_key),
    )
    if created:
        mark_delivery_written(session)
    return stored, created


def enqueue_receipt(
    session: Session, invoice: InvoiceRecord, at: datetime
) -> tuple[NotificationRecord, bool]:
    """The customer's receipt for the paid ``invoice``, once per invoice (its dedupe key is
    the invoice's): by a charge, or entirely by credit (a credit note, the credit balance)."""
    return enqueue_notification(
        session,
        NotificationRecord(
            id=new_id("ntf"),
            kind=NoticeKind.RECEIPT.value,
            customer_id=invoice.customer_id,
            subscription_id=invoice.subscription_id,
            invoice_id=invoice.id,
            dedupe_key=f"{invoice.id}:{NoticeKind.RECEIPT.value}",
            payload={"invoice_number": invoice.number},
            created_at=at,
        ),
    )


def list_notifications(
    session: Session,
    *,
    customer_id: str | None = None,
    subscription_id: str | None = None,
    kind: str | None = None,
    invoice_id: str | None = None,
    limit: int | None = None,
) -> list[NotificationRecord]:
    """Notices matching every filter given, oldest first."""
    statement = select_rows(NOTIFICATIONS).order_by(NOTIFICATIONS.c.created_at, NOTIFICATIONS.c.id)
    if invoice_id is not None:
        statement = statement.where(NOTIFICATIONS.c.invoice_id == invoice_id)
    if limit is not None:
        statement = statement.limit(limit)
    if customer_id is not None:
        statement = statement.where(NOTIFICATIONS.c.customer_id == customer_id)
    if subscription_id is not None:
        statement = statement.where(NOTIFICATIONS.c.subscription_id == subscription_id)
    if kind is not None:
        statement = statement.where(NOTIFICATIONS.c.kind == kind)
    return fetch_all(session, NotificationRecord, statement)


def get_notification(session: Session, notification_id: str) -> NotificationRecord | None:
    return fetch_one(
        session,
        NotificationRecord,
        select_rows(NOTIFICATIONS).where(NOTIFICATIONS.c.id == notification_id),
    )


def claim_pending_notifications(
    session: Session, *, now: datetime, redispatch_after: timedelta, limit: int
) -> list[NotificationRecord]:
    """Pending notices no delivery workflow was started for (or none recently: a start that
    was lost is tried again after ``redispatch_after``), oldest first; each is stamped
    ``dispatched_at = now`` in this transaction."""
    stale = now - redispatch_after
    statement = (
        select_rows(NOTIFICATIONS)
        .where(
            NOTIFICATIONS.c.status == NoticeStatus.PENDING,
            or_(NOTIFICATIONS.c.dispatched_at.is_(None), NOTIFICATIONS.c.dispatched_at < stale),
        )
        .order_by(NOTIFICATIONS.c.created_at, NOTIFICATIONS.c.id)
        .limit(limit)
    )
    claimed = fetch_all(session, NotificationRecord, statement)
    if claimed:
        session.execute(
            update(NOTIFICATIONS)
            .where(NOTIFICATIONS.c.id.in_([n.id for n in claimed]))
            .values(dispatched_at=now)
        )
    return claimed


def record_notice_attempt(
    session: Session, notification_id: str, *, message_id: str, error: str | None
) -> None:
    """Count one SMTP conversation (and why it failed, if it did) on a pending notice."""
    session.execute(
        update(NOTIFICATIONS)
        .where(
            NOTIFICATIONS.c.id == notification_id,
            NOTIFICATIONS.c.status == NoticeStatus.PENDING,
        )
        .values(
            attempts=NOTIFICATIONS.c.attempts + 1,
            message_id=message_id,
            last_error=None if error is None else error[:500],
        )
    )


def finish_notice(
    session: Session,
    notification_id: str,
    *,
    status: NoticeStatus,
    at: datetime,
    message_id: str | None = None,
    reason: str | None = None,
    attempted: bool = True,
) -> bool:
    """Move a pending notice to sent, failed or skipped; False if it was no longer pending
    (a retry of an attempt that already finished it)."""
    values: dict[str, object] = {"status": status}
    if attempted:
        values["attempts"] = NOTIFICATIONS.c.attempts + 1
    if message_id is not None:
        values["message_id"] = message_id
    if status == NoticeStatus.SENT:
        values["sent_at"] = at
        values["last_error"] = None
    else:
        values["last_error"] = None if reason is None else reason[:500]
        if status == NoticeStatus.FAILED:
            values["failed_at"] = at
    result = session.execute(
        update(NOTIFICATIONS)
        .where(
            NOTIFICATIONS.c.id == notification_id,
            NOTIFICATIONS.c.status == NoticeStatus.PENDING,
        )
        .values(**values)
        .returning(NOTIFICATIONS.c.id)
    )
    return result.scalar_one_or_none() is not None


def reminder_candidates(
    session: Session, *, now: datetime, horizon: timedelta, limit: int
) -> list[SubscriptionRecord]:
    """Trialing subscriptions whose trial ends, and active ones that bill, within ``horizon``
    of ``now``: the reminder rule (billing.notices.reminders_due) decides which are due."""
    end = now + horizon
    statement = (
        select_rows(SUBSCRIPTIONS)
        .where(
            or_(
                and_(
                    SUBSCRIPTIONS.c.status == SubscriptionStatus.TRIALING,
                    SUBSCRIPTIONS.c.trial_end_at > now,
                    SUBSCRIPTIONS.c.trial_end_at <= end,
                ),
                and_(
                    SUBSCRIPTIONS.c.status == SubscriptionStatus.ACTIVE,
                    SUBSCRIPTIONS.c.next_billing_at > now,
                    SUBSCRIPTIONS.c.next_billing_at <= end,
                ),
            )
        )
        .order_by(SUBSCRIPTIONS.c.id)
        .limit(limit)
    )
    return fetch_all(session, SubscriptionRecord, statement)
