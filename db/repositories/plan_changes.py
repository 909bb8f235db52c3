"""Plan changes asked with an Idempotency-Key: claimed once per (API key, key), answered
once. The claim is one statement (insert-or-get on the unique key), so twenty racing repeats
find one row and one Update id."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from billing.errors import IdempotencyConflict
from billing.ids import new_id
from billing.records import PlanChangeRequestRecord
from db.models import PLAN_CHANGE_REQUESTS
from db.repositories._rows import fetch_one, insert_or_get, select_rows

_T = PLAN_CHANGE_REQUESTS


def get_by_key(
    session: Session, key_scope: str, idempotency_key: str
) -> PlanChangeRequestRecord | None:
    return fetch_one(
        session,
        PlanChangeRequestRecord,
        select_rows(_T).where(_T.c.key_scope == key_scope, _T.c.idempotency_key == idempotency_key),
    )


def get_by_change_id(session: Session, change_id: str) -> PlanChangeRequestRecord | None:
    return fetch_one(
        session, PlanChangeRequestRecord, select_rows(_T).where(_T.c.change_id == change_id)
    )


def claim(
    session: Session,
    *,
    subscription_id: str,
    key_scope: str,
    idempotency_key: str,
    request_hash: str,
    at: datetime,
) -> tuple[PlanChangeRequestRecord, bool]:
    """The request under ``(key_scope, idempotency_key)``: ``(it, True)`` when this call
    claimed the key, ``(the first one, False)`` for a repeat. The same key with another
    request (another body, or another subscription) is IdempotencyConflict."""
    row_id = new_id("pcr")
    record = PlanChangeRequestRecord(
        id=row_id,
        subscription_id=subscription_id,
        key_scope=key_scope,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        # The workflow Update's id: every repeat asks for this one change.
        change_id=f"change-{row_id}",
        status="requested",
        created_at=at,
    )
    stored, created = insert_or_get(
        session, _T, record, lambda: get_by_key(session, key_scope, idempotency_key)
    )
    if not created and (
        stored.request_hash != request_hash or stored.subscription_id != subscription_id
    ):
        where = (
            f"subscription {stored.subscription_id}"
            if stored.subscription_id != subscription_id
            else "this subscription"
        )
        raise IdempotencyConflict(
            f"Idempotency-Key {idempotency_key!r} was used for another plan change request "
            f"(on {where}, {stored.created_at.isoformat()}); use a new key for a new change",
            field="Idempotency-Key",
        )
    return stored, created


def record_result(
    session: Session, change_id: str, result: dict[str, Any], at: datetime
) -> PlanChangeRequestRecord | None:
    """Keep the first answer of change ``change_id`` (set once: a later writer keeps the
    first). None when no keyed request asked for that change."""
    session.execute(
        update(_T)
        .where(_T.c.change_id == change_id, _T.c.status == "requested")
        .values(result=result, status="applied", completed_at=at)
    )
    return get_by_change_id(session, change_id)


__all__ = ["claim", "get_by_change_id", "get_by_key", "record_result"]
