"""The reports' reads (rules in ``billing.reports``): subscription histories for MRR, invoices
unpaid at an instant for AR aging, failed invoices for dunning recovery, and monthly sums for
collected vs invoiced. Reads only. Months are grouped in UTC, in SQL, on both databases.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Integer, and_, bindparam, func, or_, select
from sqlalchemy.orm import Session

from billing.calendar import IntervalUnit
from billing.invoices import InvoiceStatus
from billing.payments import ChargeOutcomeKind
from billing.reports import (
    FailedInvoice,
    Month,
    MonthlySum,
    Receivable,
    SubscriptionHistory,
    monthly_recurring_minor,
)
from billing.subscription import SubscriptionStatus
from db.models import (
    INVOICES,
    PAYMENT_ATTEMPTS,
    PAYMENTS,
    SUBSCRIPTION_STATUS_CHANGES,
    SUBSCRIPTIONS,
)
from db.types import UTCDateTime


def _quantity_column() -> Any:
    """``subscriptions.quantity`` once that column exists (seats: ``amount_minor`` is then the
    unit price), else 1."""
    return SUBSCRIPTIONS.c.get("quantity")


def subscription_histories(
    session: Session, *, until: datetime, currency: str | None = None
) -> list[SubscriptionHistory]:
    """Every subscription created before ``until`` with its status changes before ``until``."""
    quantity = _quantity_column()
    columns = [
        SUBSCRIPTIONS.c.id,
        SUBSCRIPTIONS.c.customer_id,
        SUBSCRIPTIONS.c.currency,
        SUBSCRIPTIONS.c.amount_minor,
        SUBSCRIPTIONS.c.interval,
        SUBSCRIPTIONS.c.interval_count,
        SUBSCRIPTIONS.c.created_at,
        SUBSCRIPTIONS.c.status,
    ]
    if quantity is not None:
        columns.append(quantity.label("quantity"))
    statement = select(*columns).where(SUBSCRIPTIONS.c.created_at < until)
    changes_statement = (
        select(
            SUBSCRIPTION_STATUS_CHANGES.c.subscription_id,
            SUBSCRIPTION_STATUS_CHANGES.c.from_status,
            SUBSCRIPTION_STATUS_CHANGES.c.to_status,
            SUBSCRIPTION_STATUS_CHANGES.c.changed_at,
        )
        .where(SUBSCRIPTION_STATUS_CHANGES.c.changed_at < until)
        .order_by(
            SUBSCRIPTION_STATUS_CHANGES.c.subscription_id,
            SUBSCRIPTION_STATUS_CHANGES.c.changed_at,
            SUBSCRIPTION_STATUS_CHANGES.c.id,
        )
    )
    if currency is not None:
        statement = statement.where(SUBSCRIPTIONS.c.currency == currency)
        changes_statement = changes_statement.join(
            SUBSCRIPTIONS, SUBSCRIPTIONS.c.id == SUBSCRIPTION_STATUS_CHANGES.c.subscription_id
        ).where(SUBSCRIPTIONS.c.currency == currency)
    changes: dict[str, list[tuple[datetime, SubscriptionStatus, SubscriptionStatus]]] = defaultdict(
        list
    )
    for sub_id, from_status, to_status, changed_at in session.execute(changes_statement):
        changes[sub_id].append(
            (changed_at, SubscriptionStatus(from_status), SubscriptionStatus(to_status))
        )
    histories = []
    for row in session.execute(statement).mappings():
        own = changes.get(row["id"], [])
        # Before its first change a subscription had that change's from-status; with no change
        # recorded, it has had its current status since it was created.
        initial = own[0][1] if own else SubscriptionStatus(row["status"])
        histories.append(
            SubscriptionHistory(
                subscription_id=row["id"],
                customer_id=row["customer_id"],
                currency=row["currency"],
                monthly_minor=monthly_recurring_minor(
                    int(row["amount_minor"]),
                    IntervalUnit(row["interval"]),
                    int(row["interval_count"]),
                    int(row["quantity"]) if quantity is not None else 1,
                ),
                created_at=row["created_at"],
                initial_status=initial,
                changes=tuple((at, to) for at, _, to in own),
            )
        )
    return histories


def _unpaid_at(as_of: datetime) -> ColumnElement[bool]:
    """Finalized at or before ``as_of`` and, at ``as_of``, neither paid, voided nor written
    off (each is stamped with its instant, so the state at any past instant is known)."""
    return and_(
        INVOICES.c.finalized_at.isnot(None),
        INVOICES.c.finalized_at <= as_of,
        *(
            or_(column.is_(None), column > as_of)
            for column in (
                INVOICES.c.paid_at,
                INVOICES.c.voided_at,
                INVOICES.c.marked_uncollectible_at,
            )
        ),
    )


def _whole_days_since(session: Session, column: Any, as_of: datetime) -> Any:
    """Whole days from ``column`` to ``as_of`` (floor of the elapsed seconds / 86400, as
    billing.reports.days_past_due counts them), in SQL so the database groups by it."""
    instant = bindparam("as_of_instant", as_of, type_=UTCDateTime())
    if session.get_bind().dialect.name == "postgresql":
        return func.floor(func.extract("epoch", instant - column) / 86400).cast(Integer)
    # SQLite: integer seconds since the epoch of both UTC wall times, integer division.
    seconds = func.strftime("%s", instant).cast(Integer) - func.strftime("%s", column).cast(Integer)
    return seconds / 86400


def receivables(
    session: Session, *, as_of: datetime, currency: str | None = None
) -> list[Receivable]:
    """Invoices owed at ``as_of``, grouped by currency and whole days since they fell due (at
    finalization), with how many and the amount outstanding (an invoice is paid in one
    payment, so the whole amount due). One row per day of age, not per invoice."""
    days = _whole_days_since(session, INVOICES.c.finalized_at, as_of).label("days")
    statement = (
        select(INVOICES.c.currency, days, func.count(), func.sum(INVOICES.c.amount_due_minor))
        .where(_unpaid_at(as_of), INVOICES.c.amount_due_minor > 0)
        .group_by(INVOICES.c.currency, days)
    )
    if currency is not None:
        statement = statement.where(INVOICES.c.currency == currency)
    return [
        Receivable(
            currency=c,
            days_past_due=max(0, int(d)),
            outstanding_minor=int(amount),
            invoices=int(n),
        )
        for c, d, n, amount in session.execute(statement)
    ]


def failed_invoices(
    session: Session, *, issued_from: datetime, issued_to: datetime, currency: str | None = None
) -> list[FailedInvoice]:
    """Invoices issued in [issued_from, issued_to) whose first attempt with an outcome was not
    a payment, grouped by currency, status, the class of that failure and the attempt that
    paid them (if any), with how many and their amount due."""
    attempts = PAYMENT_ATTEMPTS
    decided = attempts.c.outcome.isnot(None)
    first = (
        select(attempts.c.invoice_id, func.min(attempts.c.attempt_number).label("n"))
        .where(decided)
        .group_by(attempts.c.invoice_id)
        .subquery("first_decided")
    )
    first_attempt = attempts.alias("first_attempt")
    paying = attempts.alias("paying_attempt")
    statement = (
        select(
            INVOICES.c.currency,
            INVOICES.c.status,
            first_attempt.c.outcome,
            paying.c.attempt_number,
            func.count(),
            func.sum(INVOICES.c.amount_due_minor),
        )
        .select_from(
            INVOICES.join(first, first.c.invoice_id == INVOICES.c.id)
            .join(
                first_attempt,
                and_(
                    first_attempt.c.invoice_id == INVOICES.c.id,
                    first_attempt.c.attempt_number == first.c.n,
                ),
            )
            .outerjoin(PAYMENTS, PAYMENTS.c.invoice_id == INVOICES.c.id)
            .outerjoin(paying, paying.c.id == PAYMENTS.c.attempt_id)
        )
        .where(
            INVOICES.c.created_at >= issued_from,
            INVOICES.c.created_at < issued_to,
            first_attempt.c.outcome != ChargeOutcomeKind.PAID.value,
        )
        .group_by(
            INVOICES.c.currency,
            INVOICES.c.status,
            first_attempt.c.outcome,
            paying.c.attempt_number,
        )
    )
    if currency is not None:
        statement = statement.where(INVOICES.c.currency == currency)
    return [
        FailedInvoice(
            currency=c,
            amount_due_minor=int(amount),
            first_failure=ChargeOutcomeKind(outcome),
            status=InvoiceStatus(status),
            paid_by_attempt=int(paid_by) if paid_by is not None else None,
            invoices=int(n),
        )
        for c, status, outcome, paid_by, n, amount in session.execute(statement)
    ]


def _month_of(session: Session, column: Any) -> Any:
    """``YYYY-MM`` of an instant column, in UTC."""
    if session.get_bind().dialect.name == "postgresql":
        return func.to_char(func.timezone("UTC", column), "YYYY-MM")
    # SQLite stores UTC wall time as text (db.types.UTCDateTime).
    return func.strftime("%Y-%m", column)


def _monthly_sums(
    session: Session,
    *,
    instant: Any,
    amount: Any,
    currency_column: Any,
    source: Any,
    where: list[Any],
) -> list[MonthlySum]:
    month = _month_of(session, instant).label("month")
    statement = (
        select(month, currency_column, func.sum(amount), func.count())
        .select_from(source)
        .where(*where)
        .group_by(month, currency_column)
    )
    return [
        MonthlySum(str(m), str(c), int(total or 0), int(n))
        for m, c, total, n in session.execute(statement)
        if c is not None
    ]


def monthly_invoiced(
    session: Session, first: Month, last: Month, *, currency: str | None = None
) -> list[MonthlySum]:
    """Invoices issued per month (created_at) and currency, void and draft ones excluded."""
    where = [
        INVOICES.c.created_at >= first.start,
        INVOICES.c.created_at < last.next().start,
        INVOICES.c.status.notin_([InvoiceStatus.VOID.value, InvoiceStatus.DRAFT.value]),
    ]
    if currency is not None:
        where.append(INVOICES.c.currency == currency)
    return _monthly_sums(
        session,
        instant=INVOICES.c.created_at,
        amount=INVOICES.c.amount_due_minor,
        currency_column=INVOICES.c.currency,
        source=INVOICES,
        where=where,
    )


def monthly_collected(
    session: Session, first: Month, last: Month, *, currency: str | None = None
) -> list[MonthlySum]:
    """Payments settled per month and charge currency."""
    where = [PAYMENTS.c.settled_at >= first.start, PAYMENTS.c.settled_at < last.next().start]
    if currency is not None:
        where.append(PAYMENTS.c.currency == currency)
    return _monthly_sums(
        session,
        instant=PAYMENTS.c.settled_at,
        amount=PAYMENTS.c.amount_minor,
        currency_column=PAYMENTS.c.currency,
        source=PAYMENTS,
        where=where,
    )


def monthly_fees(
    session: Session, first: Month, last: Month, *, currency: str | None = None
) -> list[MonthlySum]:
    """Provider fees of payments settled per month, by settlement currency."""
    where = [
        PAYMENTS.c.settled_at >= first.start,
        PAYMENTS.c.settled_at < last.next().start,
        PAYMENTS.c.fee_minor.isnot(None),
    ]
    if currency is not None:
        where.append(PAYMENTS.c.settlement_currency == currency)
    return _monthly_sums(
        session,
        instant=PAYMENTS.c.settled_at,
        amount=PAYMENTS.c.fee_minor,
        currency_column=PAYMENTS.c.settlement_currency,
        source=PAYMENTS,
        where=where,
    )
