"""The notification outbox: notices are written with the change they report and delivered
later; ``dedupe_key`` makes each notice exist once however often it is enqueued."""

from __future__ import annotations

from sqlalchemy.orm import Session

from billing.records import NotificationRecord
from db.models import NOTIFICATIONS
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
    return insert_or_get(
        session,
        NOTIFICATIONS,
        record,
        lambda: get_notification_by_dedupe_key(session, record.dedupe_key),
    )


def list_notifications(
    session: Session,
    *,
    customer_id: str | None = None,
    subscription_id: str | None = None,
    kind: str | None = None,
) -> list[NotificationRecord]:
    """Notices matching every filter given, oldest first."""
    statement = select_rows(NOTIFICATIONS).order_by(NOTIFICATIONS.c.created_at, NOTIFICATIONS.c.id)
    if customer_id is not None:
        statement = statement.where(NOTIFICATIONS.c.customer_id == customer_id)
    if subscription_id is not None:
        statement = statement.where(NOTIFICATIONS.c.subscription_id == subscription_id)
    if kind is not None:
        statement = statement.where(NOTIFICATIONS.c.kind == kind)
    return fetch_all(session, NotificationRecord, statement)
