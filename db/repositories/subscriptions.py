"""Subscriptions as the database mirrors them (the workflow holds the live state)."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from sqlalchemy import ColumnElement, and_, bindparam, delete, func, insert, or_, select, update
from sqlalchemy.orm import Session

from billing.records import StatusChangeRecord, SubscriptionRecord, TermsChangeRecord
from billing.subscription import TERMINAL_STATUSES, SubscriptionStatus
from db.models import (
    CUSTOMERS,
    SUBSCRIPTION_STATUS_CHANGES,
    SUBSCRIPTION_TERMS_CHANGES,
    SUBSCRIPTIONS,
)
from db.repositories._rows import fetch_all, fetch_one, insert_or_get, select_rows


def insert_subscription(
    session: Session, record: SubscriptionRecord
) -> tuple[SubscriptionRecord, bool]:
    """Insert ``record``; ``(existing, False)`` if its id, workflow id or signup idempotency
    key is already taken by a subscription (a retried signup).

    The caller compares ``signup_request_hash`` to tell a retry from a reused key. A keyed
    record without a scope is stored in-process (scope ""): NULL is kept for keys stored
    before scoping, and a NULL would let the unique (scope, key) constraint admit a twin.
    """
    if record.signup_idempotency_key is not None and record.signup_key_scope is None:
        record = replace(record, signup_key_scope="")

    def existing() -> SubscriptionRecord | None:
        conditions = [SUBSCRIPTIONS.c.id == record.id]
        conditions.append(SUBSCRIPTIONS.c.workflow_id == record.workflow_id)
        if record.signup_idempotency_key is not None:
            conditions.append(
                _signup_key_matches(record.signup_idempotency_key, record.signup_key_scope or "")
            )
        return fetch_one(
            session,
            SubscriptionRecord,
            select_rows(SUBSCRIPTIONS).where(or_(*conditions)).limit(1),
        )

    return insert_or_get(session, SUBSCRIPTIONS, record, existing)


_GET_SUBSCRIPTION = select_rows(SUBSCRIPTIONS).where(
    SUBSCRIPTIONS.c.id == bindparam("subscription_id")
)


def get_subscription(session: Session, subscription_id: str) -> SubscriptionRecord | None:
    return fetch_one(
        session, SubscriptionRecord, _GET_SUBSCRIPTION, {"subscription_id": subscription_id}
    )


def _signup_key_matches(idempotency_key: str, scope: str) -> ColumnElement[bool]:
    # A key is the sender's own (scope); one stored before keys were scoped (NULL) is still
    # found by any sender, as it was when it was stored.
    return and_(
        SUBSCRIPTIONS.c.signup_idempotency_key == idempotency_key,
        or_(SUBSCRIPTIONS.c.signup_key_scope == scope, SUBSCRIPTIONS.c.signup_key_scope.is_(None)),
    )


def get_subscription_by_signup_key(
    session: Session, idempotency_key: str, scope: str = ""
) -> SubscriptionRecord | None:
    """The subscription a signup with this idempotency key from this sender (``scope``: a
    digest of its API key, "" in-process) created, if any."""
    return fetch_one(
        session,
        SubscriptionRecord,
        select_rows(SUBSCRIPTIONS)
        .where(_signup_key_matches(idempotency_key, scope))
        .order_by(SUBSCRIPTIONS.c.signup_key_scope.is_(None))  # the sender's own first
        .limit(1),
    )


def list_pending_signups(
    session: Session, *, created_before: datetime, limit: int = 500
) -> list[SubscriptionRecord]:
    """Subscriptions still ``pending`` (their workflow was never confirmed started) that were
    recorded before ``created_before`` (UTC), oldest first."""
    return fetch_all(
        session,
        SubscriptionRecord,
        select_rows(SUBSCRIPTIONS)
        .where(
            SUBSCRIPTIONS.c.status == SubscriptionStatus.PENDING,
            SUBSCRIPTIONS.c.created_at < created_before,
        )
        .order_by(SUBSCRIPTIONS.c.created_at, SUBSCRIPTIONS.c.id)
        .limit(limit),
    )


def payment_method_in_use(
    session: Session, customer_id: str, payment_method_id: str, *, besides: str
) -> bool:
    """Whether a subscription of the customer other than ``besides`` that is not over may
    charge ``payment_method_id``: one whose signup attached it, or any live one while it is
    the customer's default card (subscriptions charge the default)."""
    others = (
        select(SUBSCRIPTIONS.c.id)
        .where(
            SUBSCRIPTIONS.c.customer_id == customer_id,
            SUBSCRIPTIONS.c.id != besides,
            SUBSCRIPTIONS.c.status.not_in(TERMINAL_STATUSES),
        )
        .subquery()
    )
    live = session.execute(select(others.c.id)).scalars().all()
    if not live:
        return False
    attached_by_other = session.execute(
        select(SUBSCRIPTIONS.c.id)
        .where(
            SUBSCRIPTIONS.c.id.in_(live),
            SUBSCRIPTIONS.c.signup_payment_method_id == payment_method_id,
        )
        .limit(1)
    ).scalar_one_or_none()
    if attached_by_other is not None:
        return True
    default = session.execute(
        select(CUSTOMERS.c.default_payment_method_id).where(CUSTOMERS.c.id == customer_id)
    ).scalar_one_or_none()
    return bool(default == payment_method_id)


def list_subscriptions_for_customer(
    session: Session, customer_id: str, *, live_only: bool = False
) -> list[SubscriptionRecord]:
    """The customer's subscriptions, oldest first; ``live_only``: those not canceled."""
    statement = select_rows(SUBSCRIPTIONS).where(SUBSCRIPTIONS.c.customer_id == customer_id)
    if live_only:
        statement = statement.where(SUBSCRIPTIONS.c.status.not_in(TERMINAL_STATUSES))
    return fetch_all(
        session,
        SubscriptionRecord,
        statement.order_by(SUBSCRIPTIONS.c.created_at, SUBSCRIPTIONS.c.id),
    )


def update_subscription_state(
    session: Session,
    subscription_id: str,
    *,
    status: SubscriptionStatus,
    current_period_start: datetime | None,
    current_period_end: datetime | None,
    next_billing_at: datetime | None,
    cancel_at_period_end: bool,
    canceled_at: datetime | None,
    ended_at: datetime | None,
    paused_at: datetime | None,
    cancel_reason: str | None,
    now: datetime,
    changed_at: datetime | None = None,
    attention_reason: str | None = None,
    terms: dict[str, object] | None = None,
) -> bool:
    """Mirror the workflow's view of the subscription (instants UTC). False if there is no
    such subscription, or if it is canceled and ``status`` is not: cancellation is final, so
    a late, retried sync from before the cancel must not bring it back.

    ``terms``: the plan snapshot after a plan or quantity change (``plan_code``,
    ``amount_minor``, ``currency``, ``interval``, ``interval_count``, ``quantity``,
    ``anchor_at``), written with the status; None leaves it as it is.

    A new status is also logged in ``subscription_status_changes`` at ``changed_at`` (when
    the workflow decided it; ``now`` if not given), in the same transaction, and new terms
    (another plan, unit amount, quantity or interval) in ``subscription_terms_changes``. A
    sync that repeats the stored status and terms logs nothing, so a retried sync is logged
    once.
    """
    status = SubscriptionStatus(status)
    stored = session.execute(
        select(SUBSCRIPTIONS.c.status, *(SUBSCRIPTIONS.c[c] for c in _LOGGED_TERMS))
        .where(SUBSCRIPTIONS.c.id == subscription_id)
        .with_for_update()  # PostgreSQL: the logged "from" is the state this update replaces
    ).one_or_none()
    previous = stored[0] if stored is not None else None
    statement = (
        update(SUBSCRIPTIONS)
        .where(SUBSCRIPTIONS.c.id == subscription_id)
        .values(
            status=status,
            current_period_start=current_period_start,
            current_period_end=current_period_end,
            next_billing_at=next_billing_at,
            cancel_at_period_end=cancel_at_period_end,
            canceled_at=canceled_at,
            ended_at=ended_at,
            paused_at=paused_at,
            cancel_reason=cancel_reason,
            attention_reason=attention_reason,
            updated_at=now,
            **(terms or {}),
        )
        .returning(SUBSCRIPTIONS.c.id)
    )
    if status not in TERMINAL_STATUSES:
        statement = statement.where(SUBSCRIPTIONS.c.status.not_in(TERMINAL_STATUSES))
    if session.execute(statement).scalar_one_or_none() is None:
        return False
    if previous is not None and SubscriptionStatus(previous) != status:
        session.execute(
            insert(SUBSCRIPTION_STATUS_CHANGES).values(
                subscription_id=subscription_id,
                from_status=SubscriptionStatus(previous),
                to_status=status,
                changed_at=changed_at or now,
                reason=cancel_reason
                if status == SubscriptionStatus.CANCELED
                else ((attention_reason or "")[:500] or None)
                if status == SubscriptionStatus.NEEDS_ATTENTION
                else None,
            )
        )
    if stored is not None and terms:
        before = dict(zip(_LOGGED_TERMS, stored[1:], strict=True))
        after = {c: terms.get(c, before[c]) for c in _LOGGED_TERMS}
        if any(str(after[c]) != str(before[c]) for c in _LOGGED_TERMS):
            session.execute(
                insert(SUBSCRIPTION_TERMS_CHANGES).values(
                    subscription_id=subscription_id,
                    changed_at=changed_at or now,
                    **{f"from_{c}": before[c] for c in _LOGGED_TERMS},
                    **{f"to_{c}": after[c] for c in _LOGGED_TERMS},
                )
            )
    return True


#: The terms a plan or seat change moves, logged in ``subscription_terms_changes``.
_LOGGED_TERMS = ("plan_code", "amount_minor", "quantity", "interval", "interval_count")


def list_terms_changes(session: Session, subscription_id: str) -> list[TermsChangeRecord]:
    """The subscription's plan and seat changes, oldest first."""
    return fetch_all(
        session,
        TermsChangeRecord,
        select_rows(SUBSCRIPTION_TERMS_CHANGES)
        .where(SUBSCRIPTION_TERMS_CHANGES.c.subscription_id == subscription_id)
        .order_by(SUBSCRIPTION_TERMS_CHANGES.c.changed_at, SUBSCRIPTION_TERMS_CHANGES.c.id),
    )


def list_status_changes(session: Session, subscription_id: str) -> list[StatusChangeRecord]:
    """The subscription's status changes, oldest first."""
    return fetch_all(
        session,
        StatusChangeRecord,
        select_rows(SUBSCRIPTION_STATUS_CHANGES)
        .where(SUBSCRIPTION_STATUS_CHANGES.c.subscription_id == subscription_id)
        .order_by(SUBSCRIPTION_STATUS_CHANGES.c.changed_at, SUBSCRIPTION_STATUS_CHANGES.c.id),
    )


def delete_pending_subscription(session: Session, subscription_id: str) -> bool:
    """Remove a subscription whose workflow never started (status ``pending``): a signup the
    workflow service definitely refused, or one the sweeper found can never start. False if
    it is not pending (its workflow has reported in)."""
    deleted = session.execute(
        delete(SUBSCRIPTIONS)
        .where(
            SUBSCRIPTIONS.c.id == subscription_id,
            SUBSCRIPTIONS.c.status == SubscriptionStatus.PENDING,
        )
        .returning(SUBSCRIPTIONS.c.id)
    ).scalar_one_or_none()
    return deleted is not None


def count_subscriptions_with_status(session: Session, status: SubscriptionStatus) -> int:
    """How many subscriptions have ``status`` now (e.g. needs_attention, for the gauge an
    operator alerts on)."""
    return int(
        session.scalar(
            select(func.count()).select_from(SUBSCRIPTIONS).where(SUBSCRIPTIONS.c.status == status)
        )
        or 0
    )


def list_subscriptions(
    session: Session,
    *,
    status: SubscriptionStatus | None = None,
    limit: int,
    after_id: str | None = None,
    customer_id: str | None = None,
    plan_code: str | None = None,
) -> list[SubscriptionRecord]:
    """Subscriptions by id (keyset: those after ``after_id``), with ``status``, of
    ``customer_id``, on ``plan_code`` when given; at most ``limit``."""
    statement = select_rows(SUBSCRIPTIONS).order_by(SUBSCRIPTIONS.c.id).limit(limit)
    if status is not None:
        statement = statement.where(SUBSCRIPTIONS.c.status == status)
    if customer_id is not None:
        statement = statement.where(SUBSCRIPTIONS.c.customer_id == customer_id)
    if plan_code is not None:
        statement = statement.where(SUBSCRIPTIONS.c.plan_code == plan_code)
    if after_id is not None:
        statement = statement.where(SUBSCRIPTIONS.c.id > after_id)
    return fetch_all(session, SubscriptionRecord, statement)


def parked_at(session: Session, subscription_ids: list[str]) -> dict[str, datetime]:
    """When each of these subscriptions last moved to needs_attention (those that never did
    are absent), from the status log."""
    if not subscription_ids:
        return {}
    rows = session.execute(_PARKED_AT, {"subscription_ids": list(subscription_ids)}).all()
    return {subscription_id: changed_at for subscription_id, changed_at in rows}


_PARKED_AT = (
    select(
        SUBSCRIPTION_STATUS_CHANGES.c.subscription_id,
        func.max(SUBSCRIPTION_STATUS_CHANGES.c.changed_at),
    )
    .where(
        SUBSCRIPTION_STATUS_CHANGES.c.subscription_id.in_(
            bindparam("subscription_ids", expanding=True)
        ),
        SUBSCRIPTION_STATUS_CHANGES.c.to_status == SubscriptionStatus.NEEDS_ATTENTION,
    )
    .group_by(SUBSCRIPTION_STATUS_CHANGES.c.subscription_id)
)
