"""Events for the business and their deliveries to its endpoints.

An event is written in the transaction of the change it reports, with the next number of its
subscription's sequence, and one delivery row per enabled endpoint that wants its type, so an
endpoint registered later never receives older events, and an event is never lost between
the change and its delivery."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, func, or_, select, text, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from billing.business_events import ACCOUNT_STREAM, endpoint_wants
from billing.errors import ChangeRefused
from billing.ids import new_id
from billing.records import (
    DeliveryStatus,
    EventDeliveryAttemptRecord,
    EventDeliveryRecord,
    EventEndpointRecord,
    EventRecord,
)
from db.engine import mark_delivery_written
from db.models import (
    EVENT_DELIVERIES,
    EVENT_DELIVERY_ATTEMPTS,
    EVENT_ENDPOINTS,
    EVENTS,
    SUBSCRIPTIONS,
)
from db.repositories._rows import fetch_all, fetch_one, insert_or_get, select_rows

# ---- endpoints -----------------------------------------------------------------------------


def insert_endpoint(
    session: Session, record: EventEndpointRecord
) -> tuple[EventEndpointRecord, bool]:
    """Insert the endpoint; ``(existing, False)`` when one for the same URL exists."""
    return insert_or_get(
        session,
        EVENT_ENDPOINTS,
        record,
        lambda: fetch_one(
            session,
            EventEndpointRecord,
            select_rows(EVENT_ENDPOINTS).where(EVENT_ENDPOINTS.c.url_digest == record.url_digest),
        ),
    )


def get_endpoint(session: Session, endpoint_id: str) -> EventEndpointRecord | None:
    return fetch_one(
        session,
        EventEndpointRecord,
        select_rows(EVENT_ENDPOINTS).where(EVENT_ENDPOINTS.c.id == endpoint_id),
    )


_LIST_ENDPOINTS = select_rows(EVENT_ENDPOINTS).order_by(
    EVENT_ENDPOINTS.c.created_at, EVENT_ENDPOINTS.c.id
)


def list_endpoints(session: Session) -> list[EventEndpointRecord]:
    return fetch_all(session, EventEndpointRecord, _LIST_ENDPOINTS)


def count_endpoints(session: Session) -> int:
    return int(session.execute(select(func.count()).select_from(EVENT_ENDPOINTS)).scalar_one())


def update_endpoint(
    session: Session,
    endpoint_id: str,
    *,
    now: datetime,
    enabled: bool | None = None,
    disabled_reason: str | None = None,
    url: str | None = None,
    event_types: list[str] | None = None,
    description: str | None = None,
    contact_email: str | None = None,
) -> EventEndpointRecord | None:
    """Change the given fields (None: unchanged; ``contact_email=""`` clears it)."""
    values: dict[str, Any] = {"updated_at": now}
    if contact_email is not None:
        values["contact_email"] = contact_email or None
    if enabled is not None:
        values["enabled"] = enabled
        if enabled:
            mark_delivery_written(session)  # its waiting deliveries resume
        values["disabled_reason"] = None if enabled else disabled_reason
    if url is not None:
        values["url"] = url
        values["url_digest"] = hashlib.sha256(url.encode()).hexdigest()
    if event_types is not None:
        values["event_types"] = event_types
    if description is not None:
        values["description"] = description
    try:
        with session.begin_nested():
            session.execute(
                update(EVENT_ENDPOINTS).where(EVENT_ENDPOINTS.c.id == endpoint_id).values(**values)
            )
    except IntegrityError:
        raise ChangeRefused(
            "another endpoint has this url already; change that one instead", field="url"
        ) from None
    return get_endpoint(session, endpoint_id)


# ---- events --------------------------------------------------------------------------------


def get_event(session: Session, event_id: str) -> EventRecord | None:
    return fetch_one(session, EventRecord, select_rows(EVENTS).where(EVENTS.c.id == event_id))


_GET_EVENT_BY_DEDUPE_KEY = select_rows(EVENTS).where(EVENTS.c.dedupe_key == bindparam("key"))


def get_event_by_dedupe_key(session: Session, dedupe_key: str) -> EventRecord | None:
    return fetch_one(session, EventRecord, _GET_EVENT_BY_DEDUPE_KEY, {"key": dedupe_key})


# The outbox's two statements before each event's insert (see record_event).
_LOCK_SUBSCRIPTION = (
    select(SUBSCRIPTIONS.c.id)
    .where(SUBSCRIPTIONS.c.id == bindparam("subscription_id"))
    .with_for_update(key_share=True)
)
_LAST_SEQUENCE = select(func.max(EVENTS.c.sequence)).where(
    EVENTS.c.subscription_id == bindparam("subscription_id")
)


#: PostgreSQL advisory lock key that numbers the account stream's events one writer at a time
#: (a constant: the first 8 bytes of sha256(b"billing.events.account"), as a signed bigint).
_ACCOUNT_STREAM_LOCK = int.from_bytes(
    hashlib.sha256(b"billing.events.account").digest()[:8], "big", signed=True
)


def _lock_stream(session: Session, stream: str) -> None:
    """Number the stream's events one writer at a time, until the transaction ends (SQLite:
    one writer anyway, every transaction BEGINs IMMEDIATE). The unique (subscription_id,
    sequence) is the guard if a writer ever skips this."""
    if stream == ACCOUNT_STREAM:
        # No row to lock: a transaction-scoped advisory lock, released at commit/rollback.
        if session.get_bind().dialect.name == "postgresql":
            session.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ACCOUNT_STREAM_LOCK}
            )
        return
    # A subscription's stream: PostgreSQL takes the subscription's row lock. FOR NO KEY
    # UPDATE, not FOR UPDATE: a row written earlier in the same transaction that references
    # the subscription (a notice, an invoice) holds FOR KEY SHARE on it, which FOR UPDATE
    # conflicts with, so two such writers deadlocked (found by 20 parallel commits of a
    # notice then an event).
    session.execute(_LOCK_SUBSCRIPTION, {"subscription_id": stream})


def record_event(
    session: Session,
    *,
    type: str,
    subscription_id: str,
    object_id: str,
    object: dict[str, Any],
    dedupe_key: str,
    created_at: datetime,
) -> EventRecord | None:
    """Write the event and its deliveries in the caller's transaction; None when an event
    with ``dedupe_key`` exists already (a retried activity: the insert below finds it, so
    the usual first write costs no look-up). ``subscription_id`` is the event's stream: the
    subscription's id, or ``ACCOUNT_STREAM`` for an account-level event (a payout)."""
    _lock_stream(session, subscription_id)
    last = session.execute(
        _LAST_SEQUENCE, {"subscription_id": subscription_id}
    ).scalar_one_or_none()
    event, created = insert_or_get(
        session,
        EVENTS,
        EventRecord(
            id=new_id("evt"),
            type=type,
            subscription_id=subscription_id,
            sequence=(last or 0) + 1,
            object_id=object_id,
            object=object,
            dedupe_key=dedupe_key,
            created_at=created_at,
        ),
        lambda: get_event_by_dedupe_key(session, dedupe_key),
        # The event as written: its ``object`` need not come back through JSON.
        read_back=False,
    )
    if not created:
        return None
    for endpoint in list_endpoints(session):
        if endpoint.enabled and endpoint_wants(endpoint.event_types, type):
            insert_or_get(
                session,
                EVENT_DELIVERIES,
                EventDeliveryRecord(
                    id=new_id("dlv"),
                    event_id=event.id,
                    endpoint_id=endpoint.id,
                    subscription_id=subscription_id,
                    sequence=event.sequence,
                    status=DeliveryStatus.PENDING,
                    created_at=created_at,
                ),
                lambda: None,
                read_back=False,
            )
            mark_delivery_written(session)
    return event


def list_events(
    session: Session,
    *,
    limit: int,
    after: tuple[datetime, str] | None = None,
    type: str | None = None,
    subscription_id: str | None = None,
) -> list[EventRecord]:
    """Events oldest first by (created_at, id), after the keyset cursor ``after``; at most
    ``limit``."""
    statement = select_rows(EVENTS).order_by(EVENTS.c.created_at, EVENTS.c.id).limit(limit)
    if after is not None:
        statement = statement.where(tuple_(EVENTS.c.created_at, EVENTS.c.id) > tuple_(*after))
    if type is not None:
        statement = statement.where(EVENTS.c.type == type)
    if subscription_id is not None:
        statement = statement.where(EVENTS.c.subscription_id == subscription_id)
    return fetch_all(session, EventRecord, statement)


# ---- deliveries ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Stream:
    """The deliveries of one subscription's events to one endpoint: sent one at a time."""

    endpoint_id: str
    subscription_id: str


def claim_streams(
    session: Session, *, now: datetime, redispatch_after: timedelta, limit: int
) -> list[Stream]:
    """Streams with a pending delivery to an enabled endpoint that no delivery workflow was
    started for recently; their pending deliveries are stamped ``dispatched_at = now``."""
    stale = now - redispatch_after
    rows = session.execute(
        select(EVENT_DELIVERIES.c.endpoint_id, EVENT_DELIVERIES.c.subscription_id)
        .join(EVENT_ENDPOINTS, EVENT_ENDPOINTS.c.id == EVENT_DELIVERIES.c.endpoint_id)
        .where(
            EVENT_DELIVERIES.c.status == DeliveryStatus.PENDING,
            EVENT_ENDPOINTS.c.enabled.is_(True),
            or_(
                EVENT_DELIVERIES.c.dispatched_at.is_(None),
                EVENT_DELIVERIES.c.dispatched_at < stale,
            ),
        )
        .group_by(EVENT_DELIVERIES.c.endpoint_id, EVENT_DELIVERIES.c.subscription_id)
        .order_by(func.min(EVENT_DELIVERIES.c.created_at))
        .limit(limit)
    ).all()
    streams = [Stream(endpoint_id=r[0], subscription_id=r[1]) for r in rows]
    for stream in streams:
        session.execute(
            update(EVENT_DELIVERIES)
            .where(
                EVENT_DELIVERIES.c.endpoint_id == stream.endpoint_id,
                EVENT_DELIVERIES.c.subscription_id == stream.subscription_id,
                EVENT_DELIVERIES.c.status == DeliveryStatus.PENDING,
            )
            .values(dispatched_at=now)
        )
    return streams


def next_delivery(session: Session, stream: Stream) -> EventDeliveryRecord | None:
    """The stream's pending delivery with the lowest sequence number."""
    return fetch_one(
        session,
        EventDeliveryRecord,
        select_rows(EVENT_DELIVERIES)
        .where(
            EVENT_DELIVERIES.c.endpoint_id == stream.endpoint_id,
            EVENT_DELIVERIES.c.subscription_id == stream.subscription_id,
            EVENT_DELIVERIES.c.status == DeliveryStatus.PENDING,
        )
        .order_by(EVENT_DELIVERIES.c.sequence)
        .limit(1),
    )


def get_delivery(session: Session, delivery_id: str) -> EventDeliveryRecord | None:
    return fetch_one(
        session,
        EventDeliveryRecord,
        select_rows(EVENT_DELIVERIES).where(EVENT_DELIVERIES.c.id == delivery_id),
    )


def record_delivery_attempt(
    session: Session,
    delivery_id: str,
    *,
    at: datetime,
    status_code: int | None,
    error: str | None,
    duration_ms: int,
    delivered: bool,
) -> None:
    """Log one HTTP request of the delivery; a 2xx (``delivered``) finishes it."""
    session.execute(
        EVENT_DELIVERY_ATTEMPTS.insert().values(
            delivery_id=delivery_id,
            attempted_at=at,
            status_code=status_code,
            error=None if error is None else error[:500],
            duration_ms=duration_ms,
        )
    )
    values: dict[str, Any] = {
        "attempts": EVENT_DELIVERIES.c.attempts + 1,
        "last_status_code": status_code,
        "last_error": None if error is None else error[:500],
    }
    if delivered:
        values["status"] = DeliveryStatus.DELIVERED
        values["delivered_at"] = at
    session.execute(
        update(EVENT_DELIVERIES)
        .where(
            EVENT_DELIVERIES.c.id == delivery_id,
            EVENT_DELIVERIES.c.status == DeliveryStatus.PENDING,
        )
        .values(**values)
    )


def fail_delivery(session: Session, delivery_id: str, *, reason: str) -> None:
    session.execute(
        update(EVENT_DELIVERIES)
        .where(
            EVENT_DELIVERIES.c.id == delivery_id,
            EVENT_DELIVERIES.c.status == DeliveryStatus.PENDING,
        )
        .values(status=DeliveryStatus.FAILED, last_error=reason[:500])
    )


def list_deliveries(session: Session, event_id: str) -> list[EventDeliveryRecord]:
    return fetch_all(
        session,
        EventDeliveryRecord,
        select_rows(EVENT_DELIVERIES)
        .where(EVENT_DELIVERIES.c.event_id == event_id)
        .order_by(EVENT_DELIVERIES.c.created_at, EVENT_DELIVERIES.c.id),
    )


def list_delivery_attempts(
    session: Session, delivery_ids: list[str]
) -> list[EventDeliveryAttemptRecord]:
    if not delivery_ids:
        return []
    return fetch_all(
        session,
        EventDeliveryAttemptRecord,
        select_rows(EVENT_DELIVERY_ATTEMPTS)
        .where(EVENT_DELIVERY_ATTEMPTS.c.delivery_id.in_(delivery_ids))
        .order_by(EVENT_DELIVERY_ATTEMPTS.c.id),
    )


def redeliver(
    session: Session, event: EventRecord, endpoint: EventEndpointRecord, now: datetime
) -> EventDeliveryRecord:
    """Queue the event for the endpoint again (a delivery created if it never had one)."""
    mark_delivery_written(session)
    existing = fetch_one(
        session,
        EventDeliveryRecord,
        select_rows(EVENT_DELIVERIES).where(
            and_(
                EVENT_DELIVERIES.c.event_id == event.id,
                EVENT_DELIVERIES.c.endpoint_id == endpoint.id,
            )
        ),
    )
    if existing is None:
        stored, _ = insert_or_get(
            session,
            EVENT_DELIVERIES,
            EventDeliveryRecord(
                id=new_id("dlv"),
                event_id=event.id,
                endpoint_id=endpoint.id,
                subscription_id=event.subscription_id,
                sequence=event.sequence,
                status=DeliveryStatus.PENDING,
                created_at=now,
            ),
            lambda: None,
        )
        return stored
    session.execute(
        update(EVENT_DELIVERIES)
        .where(EVENT_DELIVERIES.c.id == existing.id)
        .values(status=DeliveryStatus.PENDING, dispatched_at=None, delivered_at=None)
    )
    found = get_delivery(session, existing.id)
    assert found is not None
    return found


def delivery_counts(session: Session) -> dict[str, int]:
    """How many deliveries are in each status (for the rate script and operators)."""
    rows = session.execute(
        select(EVENT_DELIVERIES.c.status, func.count()).group_by(EVENT_DELIVERIES.c.status)
    ).all()
    return {str(status): int(count) for status, count in rows}
