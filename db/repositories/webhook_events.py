"""Provider webhook events: the dedupe log (one row per provider event id), and the read-only
lookups the webhook endpoint routes with.

An event is *claimed* by inserting its row before anything is acted on, so a redelivery of
the same event id finds the row and does nothing. A claim whose request died (no
``processed_at`` long after ``claimed_at``) may be taken over by a redelivery; a claim whose
request failed cleanly is deleted (``release_webhook_event``) so the provider's retry runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from billing.records import (
    WebhookEventRecord,
    WebhookOutcome,
)
from db.models import WEBHOOK_EVENTS
from db.repositories._rows import fetch_all, fetch_one, insert_or_get, select_rows


@dataclass(frozen=True, slots=True)
class WebhookClaim:
    """The event's row and whether this caller now owns processing it."""

    event: WebhookEventRecord
    claimed: bool

    @property
    def already_processed(self) -> bool:
        return not self.claimed and self.event.processed_at is not None


def get_webhook_event(session: Session, event_id: str) -> WebhookEventRecord | None:
    return fetch_one(
        session,
        WebhookEventRecord,
        select_rows(WEBHOOK_EVENTS).where(WEBHOOK_EVENTS.c.id == event_id),
    )


def claim_webhook_event(
    session: Session,
    *,
    event_id: str,
    event_type: str,
    now: datetime,
    stale_after: timedelta,
) -> WebhookClaim:
    """Insert the event's row (outcome ``processing``) and own it: ``claimed=True``.

    If the row exists, the event was delivered before: ``claimed=False``, unless that earlier
    delivery never finished and claimed it more than ``stale_after`` ago (its process died
    mid-request); then this caller takes the claim over. Safe against concurrent deliveries:
    the primary key decides the insert, and the takeover is one conditional UPDATE.
    """
    record, inserted = insert_or_get(
        session,
        WEBHOOK_EVENTS,
        WebhookEventRecord(
            id=event_id,
            type=event_type,
            outcome=WebhookOutcome.PROCESSING,
            received_at=now,
            claimed_at=now,
        ),
        lambda: get_webhook_event(session, event_id),
    )
    if inserted or record.processed_at is not None:
        return WebhookClaim(record, claimed=inserted)
    taken = (
        session.execute(
            update(WEBHOOK_EVENTS)
            .where(
                WEBHOOK_EVENTS.c.id == event_id,
                WEBHOOK_EVENTS.c.processed_at.is_(None),
                WEBHOOK_EVENTS.c.claimed_at < now - stale_after,
            )
            .values(claimed_at=now, outcome=WebhookOutcome.PROCESSING)
            .returning(*WEBHOOK_EVENTS.c)
        )
        .mappings()
        .first()
    )
    if taken is None:
        return WebhookClaim(record, claimed=False)
    return WebhookClaim(WebhookEventRecord(**taken), claimed=True)


def record_webhook_outcome(
    session: Session,
    event_id: str,
    *,
    outcome: WebhookOutcome,
    processed_at: datetime,
    subscription_id: str | None = None,
    detail: str | None = None,
) -> bool:
    """Mark the event processed with what was done (``processed_at`` UTC). False if its row is
    gone."""
    updated = session.execute(
        update(WEBHOOK_EVENTS)
        .where(WEBHOOK_EVENTS.c.id == event_id)
        .values(
            outcome=WebhookOutcome(outcome),
            processed_at=processed_at,
            subscription_id=subscription_id,
            detail=None if detail is None else detail[:500],
        )
        .returning(WEBHOOK_EVENTS.c.id)
    ).scalar_one_or_none()
    return updated is not None


def release_webhook_event(session: Session, event_id: str, *, claimed_at: datetime) -> bool:
    """Forget an unfinished claim, so that the provider's next delivery of the event is
    processed instead of being taken for a duplicate. Only the claim made at ``claimed_at``
    is deleted: a later takeover by another delivery, or a finished event, stays."""
    deleted = session.execute(
        delete(WEBHOOK_EVENTS)
        .where(
            WEBHOOK_EVENTS.c.id == event_id,
            WEBHOOK_EVENTS.c.processed_at.is_(None),
            WEBHOOK_EVENTS.c.claimed_at == claimed_at,
        )
        .returning(WEBHOOK_EVENTS.c.id)
    ).scalar_one_or_none()
    return deleted is not None


def list_webhook_events(
    session: Session, *, event_type: str | None = None
) -> list[WebhookEventRecord]:
    """Events in the order they arrived (of ``event_type`` only, if given)."""
    statement = select_rows(WEBHOOK_EVENTS).order_by(
        WEBHOOK_EVENTS.c.received_at, WEBHOOK_EVENTS.c.id
    )
    if event_type is not None:
        statement = statement.where(WEBHOOK_EVENTS.c.type == event_type)
    return fetch_all(session, WebhookEventRecord, statement)


def count_webhook_events(session: Session) -> int:
    return int(session.execute(select(func.count()).select_from(WEBHOOK_EVENTS)).scalar_one())
