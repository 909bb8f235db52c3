"""The reports' reads (rules in ``billing.reports``): subscription histories for MRR, invoices
unpaid at an instant for AR aging, failed invoices for dunning recovery, and monthly sums for
collected vs invoiced. Reads only. Months are grouped in UTC, in SQL, on both databases.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    DateTime,
    String,
    and_,
    case,
    func,
    literal,
    or_,
    select,
    text,
    type_coerce,
    union_all,
)
from sqlalchemy.orm import Session

from billing.calendar import IntervalUnit
from billing.credit_notes import RefundStatus
from billing.invoices import InvoiceStatus
from billing.payments import ChargeOutcomeKind
from billing.reports import (
    FailedInvoice,
    Month,
    MonthlySum,
    MrrBoundary,
    Receivable,
    SubscriptionHistory,
    bucket_first_days,
    monthly_recurring_minor,
)
from billing.subscription import SubscriptionStatus
from db.models import (
    INVOICES,
    PAYMENT_ATTEMPTS,
    PAYMENTS,
    REFUNDS,
    REPORT_DUNNING_MONTHLY,
    REPORT_MONTHLY_TOTALS,
    REPORT_MRR_MONTHLY,
    SUBSCRIPTION_STATUS_CHANGES,
    SUBSCRIPTION_TERMS_CHANGES,
    SUBSCRIPTIONS,
)


def _quantity_column() -> Any:
    """``subscriptions.quantity`` once that column exists (seats: ``amount_minor`` is then the
    unit price), else 1."""
    return SUBSCRIPTIONS.c.get("quantity")


def mrr_histories_from_rows(
    session: Session, *, until: datetime, currency: str | None = None
) -> list[SubscriptionHistory]:
    """Every subscription created before ``until`` (of ``currency``, if given), with its
    status changes and its plan or seat changes before ``until`` in time order, its status
    before the first status change (that change's ``from_status``, whenever it is; with none
    logged, its status now) and its monthly amount before the first terms change (from that
    change's ``from_`` terms; with none logged, its terms now).

    From the subscriptions and their changes themselves (a scan of the book): what the
    monthly rollup (``mrr_boundaries``) must always agree with."""
    changes = SUBSCRIPTION_STATUS_CHANGES
    quantity = _quantity_column()
    first_change = changes.alias("first_change")
    first_from = (
        select(type_coerce(first_change.c.from_status, String))
        .where(first_change.c.subscription_id == SUBSCRIPTIONS.c.id)
        .order_by(first_change.c.changed_at, first_change.c.id)
        .limit(1)
        .scalar_subquery()
    )
    where = [SUBSCRIPTIONS.c.created_at < until]
    if currency is not None:
        where.append(SUBSCRIPTIONS.c.currency == currency)
    rows = session.execute(
        select(
            SUBSCRIPTIONS.c.id,
            SUBSCRIPTIONS.c.customer_id,
            SUBSCRIPTIONS.c.currency,
            SUBSCRIPTIONS.c.amount_minor,
            type_coerce(SUBSCRIPTIONS.c.interval, String),
            SUBSCRIPTIONS.c.interval_count,
            quantity if quantity is not None else literal(1),
            _as_driver_returns(session, SUBSCRIPTIONS.c.created_at),
            type_coerce(SUBSCRIPTIONS.c.status, String),
            first_from,
        ).where(*where)
    ).all()
    listed = select(SUBSCRIPTIONS.c.id).where(*where).subquery("listed")
    terms = SUBSCRIPTION_TERMS_CHANGES.c
    first_terms: dict[str, int] = {}
    prices: dict[str, list[tuple[datetime, int]]] = defaultdict(list)
    for (
        sub_id,
        changed_at,
        from_amount,
        from_interval,
        from_count,
        from_quantity,
        to_amount,
        to_interval,
        to_count,
        to_quantity,
    ) in session.execute(
        select(
            terms.subscription_id,
            _as_driver_returns(session, terms.changed_at),
            terms.from_amount_minor,
            type_coerce(terms.from_interval, String),
            terms.from_interval_count,
            terms.from_quantity,
            terms.to_amount_minor,
            type_coerce(terms.to_interval, String),
            terms.to_interval_count,
            terms.to_quantity,
        )
        .join(listed, listed.c.id == terms.subscription_id)
        .order_by(terms.changed_at, terms.id)
    ):
        if sub_id not in first_terms:
            first_terms[sub_id] = monthly_recurring_minor(
                int(from_amount), _INTERVAL[from_interval], int(from_count), int(from_quantity)
            )
        if changed_at < until:
            prices[sub_id].append(
                (
                    changed_at,
                    monthly_recurring_minor(
                        int(to_amount), _INTERVAL[to_interval], int(to_count), int(to_quantity)
                    ),
                )
            )
    history: dict[str, list[tuple[datetime, SubscriptionStatus]]] = defaultdict(list)
    for sub_id, to_status, changed_at in session.execute(
        select(
            changes.c.subscription_id,
            type_coerce(changes.c.to_status, String),
            _as_driver_returns(session, changes.c.changed_at),
        )
        .join(listed, listed.c.id == changes.c.subscription_id)
        .where(changes.c.changed_at < until)
        .order_by(changes.c.changed_at, changes.c.id)
    ):
        history[sub_id].append((changed_at, _STATUS[to_status]))
    return [
        SubscriptionHistory(
            subscription_id=sub_id,
            customer_id=customer_id,
            currency=code,
            monthly_minor=first_terms[sub_id]
            if sub_id in first_terms
            else monthly_recurring_minor(int(amount), _INTERVAL[interval], int(count), int(qty)),
            created_at=created_at,
            initial_status=_STATUS[first or status],
            changes=tuple(history.get(sub_id, ())),
            price_changes=tuple(prices.get(sub_id, ())),
        )
        for (
            sub_id,
            customer_id,
            code,
            amount,
            interval,
            count,
            qty,
            created_at,
            status,
            first,
        ) in rows
    ]


#: The statuses migrations 0021 and 0023 froze into their triggers (a test checks they are
#: billing.reports.MRR_STATUSES).
ROLLUP_COUNTED = ("active", "needs_attention", "past_due")


def mrr_boundaries(
    session: Session, first: Month, last: Month, *, currency: str | None = None
) -> tuple[list[MrrBoundary], list[MrrBoundary]]:
    """From ``report_mrr_monthly`` (migration 0023): per currency, every level move up to
    ``first``'s start summed (the opening levels), and the moves at each later month start up
    to the end of ``last`` (billing.reports.mrr_from_boundaries). One row per currency and
    month after the sums; the book's months before ``first`` are added up in SQL."""
    totals = REPORT_MRR_MONTHLY.c
    opening = str(first)
    key = case((totals.month <= opening, literal(opening)), else_=totals.month).label("key")
    figures = (
        "mrr_minor",
        "subscriptions",
        "customers",
        "new_minor",
        "reactivated_minor",
        "churned_minor",
        "churned_customers",
        "expansion_minor",
        "contraction_minor",
    )
    statement = (
        select(totals.currency, key, *(func.sum(getattr(totals, f)).label(f) for f in figures))
        .where(totals.month <= str(last.next()))
        .group_by(totals.currency, key)
    )
    if currency is not None:
        statement = statement.where(totals.currency == currency)
    start: list[MrrBoundary] = []
    moves: list[MrrBoundary] = []
    for row in session.execute(statement).mappings():
        month = Month.parse(row["key"])
        values = {f: int(row[f] or 0) for f in figures}
        if row["key"] == opening:
            # Only the levels: the movements summed here are of months before the report.
            start.append(
                MrrBoundary(
                    currency=row["currency"],
                    month=month,
                    mrr_minor=values["mrr_minor"],
                    subscriptions=values["subscriptions"],
                    customers=values["customers"],
                )
            )
        else:
            moves.append(MrrBoundary(currency=row["currency"], month=month, **values))
    return start, moves


_STATUS = {status.value: status for status in SubscriptionStatus}


def _as_driver_returns(session: Session, column: Any) -> Any:
    """An instant column read for comparison only. On PostgreSQL, the driver's aware datetime
    as it comes (in the session's zone: it compares equal to the same instant in UTC), without
    ``UTCDateTime``'s conversion per value (a fifth of the MRR reader's time for its ~15,000
    instants at 1M invoices); SQLite's naive text needs that conversion, so it keeps it."""
    if session.get_bind().dialect.name == "postgresql":
        return type_coerce(column, DateTime(timezone=True)).label(column.name)
    return column


_INTERVAL = {unit.value: unit for unit in IntervalUnit}


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


def receivables(
    session: Session, *, as_of: datetime, currency: str | None = None
) -> list[Receivable]:
    """Invoices owed at ``as_of``, grouped by currency and aging bucket (by whole days since
    they fell due, at finalization; ``days_past_due`` is the bucket's first day), with how
    many and the amount outstanding (an invoice is paid in one payment, so the whole amount
    due). One row per bucket, not per invoice.

    Two disjoint parts, each from an index (ix_invoices_unsettled_finalized_at, and one per
    settling stamp): the invoices still unsettled now, and those settled after ``as_of``
    (every stamp they have is later)."""
    stamps = (INVOICES.c.paid_at, INVOICES.c.voided_at, INVOICES.c.marked_uncollectible_at)
    owed = [INVOICES.c.amount_due_minor > 0]
    if currency is not None:
        owed.append(INVOICES.c.currency == currency)
    columns = (INVOICES.c.currency, INVOICES.c.finalized_at, INVOICES.c.amount_due_minor)
    unsettled = select(*columns).where(
        INVOICES.c.finalized_at.isnot(None),
        INVOICES.c.finalized_at <= as_of,
        *(stamp.is_(None) for stamp in stamps),
        *owed,
    )
    settled_later = select(*columns).where(
        _unpaid_at(as_of), or_(*(stamp > as_of for stamp in stamps)), *owed
    )
    owed_rows = union_all(unsettled, settled_later).subquery("owed")
    # Its bucket's first day: the largest L with as_of - finalized_at >= L whole days, i.e.
    # finalized_at <= as_of - L days (exactly billing.reports.days_past_due's floor).
    firsts = sorted(bucket_first_days(), reverse=True)
    days = case(
        *(
            (owed_rows.c.finalized_at <= as_of - timedelta(days=first), literal(first))
            for first in firsts[:-1]
        ),
        else_=literal(firsts[-1]),
    ).label("days")
    statement = select(
        owed_rows.c.currency, days, func.count(), func.sum(owed_rows.c.amount_due_minor)
    ).group_by(owed_rows.c.currency, days)
    return [
        Receivable(
            currency=c,
            days_past_due=max(0, int(d)),
            outstanding_minor=int(amount),
            invoices=int(n),
        )
        for c, d, n, amount in session.execute(statement)
    ]


def failed_invoices_from_rows(
    session: Session, *, issued_from: datetime, issued_to: datetime, currency: str | None = None
) -> list[FailedInvoice]:
    """Invoices issued in [issued_from, issued_to) whose first attempt with an outcome was not
    a payment, grouped by currency, status, the class of that failure and the attempt that
    paid them (if any), with how many and their amount due.

    From the invoices and attempts themselves (a join of every failed first attempt with the
    invoices): what ``failed_invoices`` must always agree with."""
    attempts = PAYMENT_ATTEMPTS
    # The first attempt decides whether an invoice failed: an attempt whose outcome is unknown
    # is re-driven under its own number, never replaced, so attempt 1 always gets an outcome.
    first_attempt = attempts.alias("first_attempt")
    # The attempt that paid after a failure: a succeeded attempt after the first (at most one
    # per invoice: an intent is paid once and an invoice has one settled payment).
    recovered = (
        select(attempts.c.invoice_id, func.min(attempts.c.attempt_number).label("n"))
        .where(attempts.c.outcome == ChargeOutcomeKind.PAID.value, attempts.c.attempt_number > 1)
        .group_by(attempts.c.invoice_id)
        .subquery("recovered")
    )
    statement = (
        select(
            INVOICES.c.currency,
            INVOICES.c.status,
            first_attempt.c.outcome,
            recovered.c.n,
            func.count(),
            func.sum(INVOICES.c.amount_due_minor),
        )
        .select_from(
            first_attempt.join(INVOICES, INVOICES.c.id == first_attempt.c.invoice_id).outerjoin(
                recovered, recovered.c.invoice_id == first_attempt.c.invoice_id
            )
        )
        .where(
            # Both conditions as the partial index ix_payment_attempts_first_failed states them.
            first_attempt.c.attempt_number == 1,
            first_attempt.c.outcome != ChargeOutcomeKind.PAID.value,
            INVOICES.c.created_at >= issued_from,
            INVOICES.c.created_at < issued_to,
        )
        .group_by(
            INVOICES.c.currency,
            INVOICES.c.status,
            first_attempt.c.outcome,
            recovered.c.n,
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
            # Recovered only if the invoice is paid now (a later refund-to-void would not be).
            paid_by_attempt=int(paid_by) if paid_by is not None else None,
            invoices=int(n),
        )
        for c, status, outcome, paid_by, n, amount in session.execute(statement)
    ]


def failed_invoices(
    session: Session, first: Month, last: Month, *, currency: str | None = None
) -> list[FailedInvoice]:
    """What ``failed_invoices_from_rows`` returns for the invoices issued from ``first`` to
    ``last`` (UTC months, both included), from ``report_dunning_monthly`` (kept by triggers,
    migration 0021): a few rows per month."""
    totals = REPORT_DUNNING_MONTHLY.c
    key = (totals.currency, totals.status, totals.first_failure, totals.paid_by_attempt)
    statement = (
        select(*key, func.sum(totals.invoices), func.sum(totals.amount_due_minor))
        .where(totals.month >= str(first), totals.month <= str(last))
        .group_by(*key)
        # A key whose invoices all moved elsewhere keeps its rows, at 0.
        .having(func.sum(totals.invoices) != 0)
    )
    if currency is not None:
        statement = statement.where(totals.currency == currency)
    return [
        FailedInvoice(
            currency=c,
            amount_due_minor=int(amount),
            first_failure=ChargeOutcomeKind(outcome),
            status=InvoiceStatus(status),
            paid_by_attempt=int(paid_by) or None,
            invoices=int(n),
        )
        for c, status, outcome, paid_by, n, amount in session.execute(statement)
    ]


def _month_of(session: Session, column: Any) -> Any:
    """The month of an instant column, in UTC: a timestamp at the month's start on PostgreSQL
    (``date_trunc`` is far cheaper per row than formatting text), ``YYYY-MM`` text on SQLite
    (which stores UTC wall time as text, db.types.UTCDateTime)."""
    if session.get_bind().dialect.name == "postgresql":
        return func.date_trunc("month", func.timezone("UTC", column))
    return func.strftime("%Y-%m", column)


def _month_text(value: Any) -> str:
    return value.strftime("%Y-%m") if isinstance(value, datetime) else str(value)


def tune_for_reports(session: Session) -> None:
    """Per-transaction settings for the report queries: PostgreSQL's JIT compiles each of
    these aggregates afresh (about 100 ms at 1M invoices) for no gain at this size. The
    session's zone is UTC so that instants come back with ``timezone.utc`` (psycopg maps only
    the name ``UTC`` to it; a server set to ``Etc/UTC`` gives a ZoneInfo, and comparing
    thousands of those with UTC boundaries doubles the MRR report's walk). Months are grouped
    with an explicit zone (``_month_of``), so no figure depends on this setting."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SET LOCAL jit = off"))
        session.execute(text("SET LOCAL TimeZone = 'UTC'"))


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
        MonthlySum(_month_text(m), str(c), int(total or 0), int(n))
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


def monthly_refunded(
    session: Session, first: Month, last: Month, *, currency: str | None = None
) -> list[MonthlySum]:
    """Refunds that succeeded per month (``completed_at``) and currency (the charge's)."""
    where = [
        REFUNDS.c.status == RefundStatus.SUCCEEDED.value,
        REFUNDS.c.completed_at >= first.start,
        REFUNDS.c.completed_at < last.next().start,
    ]
    if currency is not None:
        where.append(REFUNDS.c.currency == currency)
    return _monthly_sums(
        session,
        instant=REFUNDS.c.completed_at,
        amount=REFUNDS.c.amount_minor,
        currency_column=REFUNDS.c.currency,
        source=REFUNDS,
        where=where,
    )


@dataclass(frozen=True, slots=True)
class MonthlyFigures:
    """Collected vs invoiced's four sums, each per (month, currency)."""

    invoiced: list[MonthlySum]
    collected: list[MonthlySum]
    fees: list[MonthlySum]
    refunded: list[MonthlySum]


def monthly_figures_from_rows(
    session: Session, first: Month, last: Month, *, currency: str | None = None
) -> MonthlyFigures:
    """The four sums computed from the invoices, payments and refunds themselves (a scan of
    every row in the months): what ``report_monthly_totals`` must always agree with."""
    return MonthlyFigures(
        monthly_invoiced(session, first, last, currency=currency),
        monthly_collected(session, first, last, currency=currency),
        monthly_fees(session, first, last, currency=currency),
        monthly_refunded(session, first, last, currency=currency),
    )


def monthly_figures(
    session: Session, first: Month, last: Month, *, currency: str | None = None
) -> MonthlyFigures:
    """The four sums from ``report_monthly_totals`` (kept by triggers, migration 0019): one
    row per month and currency. A sum whose count is 0 had no rows, as a GROUP BY over the
    rows would not have produced it."""
    totals = REPORT_MONTHLY_TOTALS.c
    sums = [
        func.sum(getattr(totals, c)).label(c)
        for c in (
            "invoiced_minor",
            "invoices",
            "collected_minor",
            "payments",
            "fees_minor",
            "fee_payments",
            "refunded_minor",
            "refunds",
        )
    ]
    # The slots of a month and currency (PostgreSQL spreads concurrent writers over them).
    statement = (
        select(totals.month, totals.currency, *sums)
        .where(totals.month >= str(first), totals.month <= str(last))
        .group_by(totals.month, totals.currency)
    )
    if currency is not None:
        statement = statement.where(totals.currency == currency)
    figures = MonthlyFigures([], [], [], [])
    for row in session.execute(statement).mappings():
        for target, amount, count in (
            (figures.invoiced, "invoiced_minor", "invoices"),
            (figures.collected, "collected_minor", "payments"),
            (figures.fees, "fees_minor", "fee_payments"),
            (figures.refunded, "refunded_minor", "refunds"),
        ):
            if row[count]:
                target.append(
                    MonthlySum(row["month"], row["currency"], int(row[amount]), int(row[count]))
                )
    return figures
