"""The reports' reads (rules in ``billing.reports``): subscription histories for MRR, invoices
unpaid at an instant for AR aging, failed invoices for dunning recovery, and monthly sums for
collected vs invoiced. Reads only. Months are grouped in UTC, in SQL, on both databases.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    DateTime,
    String,
    and_,
    case,
    exists,
    func,
    literal,
    or_,
    select,
    text,
    true,
    type_coerce,
    union,
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
    Receivable,
    SteadyGroup,
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
    REPORT_MRR_CURRENCY_CUSTOMERS,
    REPORT_MRR_CUSTOMERS,
    REPORT_MRR_PRICES,
    SUBSCRIPTION_STATUS_CHANGES,
    SUBSCRIPTIONS,
)


def _quantity_column() -> Any:
    """``subscriptions.quantity`` once that column exists (seats: ``amount_minor`` is then the
    unit price), else 1."""
    return SUBSCRIPTIONS.c.get("quantity")


@dataclass(frozen=True, slots=True)
class MrrInputs:
    """What ``billing.reports.mrr_report`` needs for a report from ``start`` to ``until``."""

    histories: list[SubscriptionHistory]
    steady: list[SteadyGroup]
    steady_customers: dict[str, int]
    steady_customer_ids: frozenset[tuple[str, str]]


def _changed_since(start: datetime) -> Any:
    """The subscription has a status change at or after ``start``."""
    changes = SUBSCRIPTION_STATUS_CHANGES
    return exists().where(
        changes.c.subscription_id == SUBSCRIPTIONS.c.id, changes.c.changed_at >= start
    )


def _steady(start: datetime, counted: Sequence[str]) -> ColumnElement[bool]:
    """Created before ``start``, no status change since, and counted: the same at every
    boundary of the report. Its status then is its current one (the status mirror and its
    change log are written together)."""
    return and_(
        SUBSCRIPTIONS.c.created_at < start,
        SUBSCRIPTIONS.c.status.in_(counted),
        ~_changed_since(start),
    )


def mrr_inputs_from_rows(
    session: Session,
    *,
    start: datetime,
    until: datetime,
    counted: Sequence[str],
    currency: str | None = None,
) -> MrrInputs:
    """The book for an MRR report whose first boundary is ``start`` and last ``until``:
    steady counted subscriptions grouped by price (counted, not listed), and every other
    subscription that may count at some boundary with its status changes before ``until``.
    ``counted``: the statuses that count (billing.reports.MRR_STATUSES).

    From the subscriptions themselves (four scans of the book): what ``mrr_inputs`` must
    always agree with."""
    quantity = _quantity_column()
    quantity_value = quantity if quantity is not None else literal(1)
    steady_where = [_steady(start, counted)]
    if currency is not None:
        steady_where.append(SUBSCRIPTIONS.c.currency == currency)
    groups = session.execute(
        select(
            SUBSCRIPTIONS.c.currency,
            SUBSCRIPTIONS.c.amount_minor,
            SUBSCRIPTIONS.c.interval,
            SUBSCRIPTIONS.c.interval_count,
            quantity_value.label("quantity"),
            func.count(),
        )
        .where(*steady_where)
        .group_by(
            SUBSCRIPTIONS.c.currency,
            SUBSCRIPTIONS.c.amount_minor,
            SUBSCRIPTIONS.c.interval,
            SUBSCRIPTIONS.c.interval_count,
            quantity_value,
        )
    )
    steady = []
    free_prices: set[tuple[int, str, int, int]] = set()
    for c, amount, interval, count, qty, n in groups:
        monthly = monthly_recurring_minor(int(amount), IntervalUnit(interval), int(count), int(qty))
        steady.append(SteadyGroup(currency=c, monthly_minor=monthly, subscriptions=int(n)))
        if monthly == 0:
            free_prices.add((int(amount), str(IntervalUnit(interval).value), int(count), int(qty)))
    # Customers count while some subscription of theirs has MRR above 0: leave out the
    # price points whose monthly amount rounds to 0 (free plans).
    free = [
        and_(
            SUBSCRIPTIONS.c.amount_minor == amount,
            SUBSCRIPTIONS.c.interval == interval,
            SUBSCRIPTIONS.c.interval_count == count,
            quantity_value == qty,
        )
        for amount, interval, count, qty in free_prices
    ]
    paying = ~or_(*free) if free else true()
    steady_customers = {
        c: int(n)
        for c, n in session.execute(
            select(SUBSCRIPTIONS.c.currency, func.count(SUBSCRIPTIONS.c.customer_id.distinct()))
            .where(*steady_where, paying)
            .group_by(SUBSCRIPTIONS.c.currency)
        )
    }
    # Everything else that may count at some boundary: created inside the report, or changed
    # since its start.
    others = and_(
        SUBSCRIPTIONS.c.created_at < until,
        or_(SUBSCRIPTIONS.c.created_at >= start, _changed_since(start)),
        *([SUBSCRIPTIONS.c.currency == currency] if currency is not None else []),
    )
    sibling = SUBSCRIPTIONS.alias("sibling")
    owns_steady = (
        exists()
        .where(
            sibling.c.customer_id == SUBSCRIPTIONS.c.customer_id,
            sibling.c.currency == SUBSCRIPTIONS.c.currency,
            sibling.c.created_at < start,
            sibling.c.status.in_(counted),
            *(
                [
                    ~or_(
                        *(
                            and_(
                                sibling.c.amount_minor == amount,
                                sibling.c.interval == interval,
                                sibling.c.interval_count == count,
                                (sibling.c[quantity.name] if quantity is not None else literal(1))
                                == qty,
                            )
                            for amount, interval, count, qty in free_prices
                        )
                    )
                ]
                if free_prices
                else []
            ),
            ~exists().where(
                SUBSCRIPTION_STATUS_CHANGES.c.subscription_id == sibling.c.id,
                SUBSCRIPTION_STATUS_CHANGES.c.changed_at >= start,
            ),
        )
        .label("owns_steady")
    )
    statement = select(
        SUBSCRIPTIONS.c.id,
        SUBSCRIPTIONS.c.customer_id,
        SUBSCRIPTIONS.c.currency,
        SUBSCRIPTIONS.c.amount_minor,
        SUBSCRIPTIONS.c.interval,
        SUBSCRIPTIONS.c.interval_count,
        SUBSCRIPTIONS.c.created_at,
        SUBSCRIPTIONS.c.status,
        quantity_value.label("quantity"),
        owns_steady,
    ).where(others)
    listed = select(SUBSCRIPTIONS.c.id).where(others).subquery("listed")
    changes_statement = (
        select(
            SUBSCRIPTION_STATUS_CHANGES.c.subscription_id,
            SUBSCRIPTION_STATUS_CHANGES.c.from_status,
            SUBSCRIPTION_STATUS_CHANGES.c.to_status,
            SUBSCRIPTION_STATUS_CHANGES.c.changed_at,
        )
        .join(listed, listed.c.id == SUBSCRIPTION_STATUS_CHANGES.c.subscription_id)
        .where(SUBSCRIPTION_STATUS_CHANGES.c.changed_at < until)
        .order_by(
            SUBSCRIPTION_STATUS_CHANGES.c.subscription_id,
            SUBSCRIPTION_STATUS_CHANGES.c.changed_at,
            SUBSCRIPTION_STATUS_CHANGES.c.id,
        )
    )
    changes: dict[str, list[tuple[datetime, SubscriptionStatus, SubscriptionStatus]]] = defaultdict(
        list
    )
    for sub_id, from_status, to_status, changed_at in session.execute(changes_statement):
        changes[sub_id].append(
            (changed_at, SubscriptionStatus(from_status), SubscriptionStatus(to_status))
        )
    histories = []
    owners: set[tuple[str, str]] = set()
    for row in session.execute(statement).mappings():
        own = changes.get(row["id"], [])
        # Before its first change a subscription had that change's from-status; with no change
        # recorded, it has had its current status since it was created.
        initial = own[0][1] if own else SubscriptionStatus(row["status"])
        if row["owns_steady"]:
            owners.add((row["currency"], row["customer_id"]))
        histories.append(
            SubscriptionHistory(
                subscription_id=row["id"],
                customer_id=row["customer_id"],
                currency=row["currency"],
                monthly_minor=monthly_recurring_minor(
                    int(row["amount_minor"]),
                    IntervalUnit(row["interval"]),
                    int(row["interval_count"]),
                    int(row["quantity"]),
                ),
                created_at=row["created_at"],
                initial_status=initial,
                changes=tuple((at, to) for at, _, to in own),
            )
        )
    return MrrInputs(histories, steady, steady_customers, frozenset(owners))


#: The statuses migration 0021's triggers count in ``report_mrr_prices`` (frozen there; a test
#: checks they are billing.reports.MRR_STATUSES).
ROLLUP_COUNTED = ("active", "needs_attention", "past_due")


def mrr_inputs(
    session: Session, *, start: datetime, until: datetime, currency: str | None = None
) -> MrrInputs:
    """What ``mrr_inputs_from_rows`` returns, from the counts the database keeps (migration
    0021) and the subscriptions created or changed since ``start`` only.

    The steady subscriptions (created before ``start``, counted, no change since) are those
    counted now less the counted ones created or changed since ``start``; the steady customers
    are the customers counted now less those whose every paying counted subscription is one of
    these. So the work grows with what moved since ``start``, not with the book."""
    prices = REPORT_MRR_PRICES.c
    price_columns = (
        prices.currency,
        prices.amount_minor,
        prices.interval,
        prices.interval_count,
        prices.quantity,
    )
    counted_now: dict[tuple[str, int, str, int, int], int] = {}
    statement = (
        select(*price_columns, func.sum(prices.subscriptions))
        .group_by(*price_columns)
        .having(func.sum(prices.subscriptions) != 0)
    )
    if currency is not None:
        statement = statement.where(prices.currency == currency)
    for c, amount, interval, count, qty, n in session.execute(statement):
        counted_now[(c, int(amount), str(interval), int(count), int(qty))] = int(n)
    customers = REPORT_MRR_CURRENCY_CUSTOMERS.c
    customers_statement = select(customers.currency, func.sum(customers.customers)).group_by(
        customers.currency
    )
    if currency is not None:
        customers_statement = customers_statement.where(customers.currency == currency)
    steady_customers = {c: int(n) for c, n in session.execute(customers_statement)}

    quantity = _quantity_column()
    quantity_value = quantity if quantity is not None else literal(1)
    changes = SUBSCRIPTION_STATUS_CHANGES
    # Created or changed since ``start``: from ix_subscriptions_created_at and
    # ix_subscription_status_changes_changed_at, never a scan of the book.
    moved_ids = union(
        select(SUBSCRIPTIONS.c.id).where(SUBSCRIPTIONS.c.created_at >= start),
        select(changes.c.subscription_id).where(changes.c.changed_at >= start),
    ).subquery("moved_ids")
    counted = list(ROLLUP_COUNTED)
    moved_where = [
        SUBSCRIPTIONS.c.id.in_(select(moved_ids.c.id)),
        # Listed (may count at some boundary), or counted now (taken off the steady counts).
        or_(SUBSCRIPTIONS.c.created_at < until, SUBSCRIPTIONS.c.status.in_(counted)),
    ]
    if currency is not None:
        moved_where.append(SUBSCRIPTIONS.c.currency == currency)
    # How many counted subscriptions with MRR above 0 the customer has now (report_mrr_customers,
    # kept by 0021's triggers, one row per currency and customer). Each is steady or moved, so
    # the customer owns a steady one exactly when it has more than its moved ones counted now:
    # no per-row subquery over its siblings and their changes. An outer join, not a scalar
    # subquery: PostgreSQL then hashes the rollup (a third less time at 1M invoices than 5,000
    # probes of its key).
    owned = REPORT_MRR_CUSTOMERS.c
    moved = session.execute(
        select(
            SUBSCRIPTIONS.c.id,
            SUBSCRIPTIONS.c.customer_id,
            SUBSCRIPTIONS.c.currency,
            SUBSCRIPTIONS.c.amount_minor,
            type_coerce(SUBSCRIPTIONS.c.interval, String).label("interval"),
            SUBSCRIPTIONS.c.interval_count,
            _as_driver_returns(session, SUBSCRIPTIONS.c.created_at),
            type_coerce(SUBSCRIPTIONS.c.status, String).label("status"),
            quantity_value.label("quantity"),
            owned.subscriptions,
        )
        .select_from(
            SUBSCRIPTIONS.outerjoin(
                REPORT_MRR_CUSTOMERS,
                and_(
                    owned.currency == SUBSCRIPTIONS.c.currency,
                    owned.customer_id == SUBSCRIPTIONS.c.customer_id,
                ),
            )
        )
        .where(*moved_where)
    ).all()
    # The moved ones' changes before ``until`` (plain text statuses: thousands of rows), from
    # the two indexes alone; those of subscriptions not listed are not looked up.
    # Plain tuples and locals below, not ORM rows and attribute look-ups: tens of thousands
    # of values at 1M invoices.
    history: dict[str, list[tuple[datetime, SubscriptionStatus]]] = {}
    # Before its first change a subscription had that change's from-status.
    status_before: dict[str, SubscriptionStatus] = {}
    for sub_id, from_status, to_status, changed_at in session.execute(
        select(
            changes.c.subscription_id,
            type_coerce(changes.c.from_status, String),
            type_coerce(changes.c.to_status, String),
            _as_driver_returns(session, changes.c.changed_at),
        )
        .join(moved_ids, moved_ids.c.id == changes.c.subscription_id)
        .where(changes.c.changed_at < until)
        # Time order is all each subscription's list needs (grouped here, in a dict): no sort
        # on the text ids, whose collation makes it the query's costliest step.
        .order_by(changes.c.changed_at, changes.c.id)
    ).all():
        own = history.get(sub_id)
        if own is None:
            own = history[sub_id] = []
            status_before[sub_id] = _STATUS[from_status]
        own.append((changed_at, _STATUS[to_status]))
    # Few distinct prices among thousands of rows: normalise each once.
    monthly_of: dict[tuple[str, int, str, int, int], int] = {}
    priced = []
    moved_paying_now: dict[tuple[str, str], int] = defaultdict(int)
    for (
        sub_id,
        customer_id,
        code,
        amount,
        interval,
        count,
        created_at,
        status,
        qty,
        paying,
    ) in moved:
        price = (code, int(amount), str(interval), int(count), int(qty))
        monthly = monthly_of.get(price)
        if monthly is None:
            monthly = monthly_of[price] = monthly_recurring_minor(
                price[1], _INTERVAL[price[2]], price[3], price[4]
            )
        is_counted = status in ROLLUP_COUNTED
        priced.append(
            (sub_id, customer_id, code, price, monthly, created_at, status, is_counted, paying)
        )
        if is_counted and monthly > 0:
            moved_paying_now[(code, customer_id)] += 1
    histories = []
    owners: set[tuple[str, str]] = set()
    not_steady_customers: set[tuple[str, str]] = set()
    for sub_id, customer_id, code, price, monthly, created_at, status, is_counted, paying in priced:
        customer = (code, customer_id)
        owns_steady = (paying or 0) > moved_paying_now.get(customer, 0)
        if is_counted:
            counted_now[price] = counted_now.get(price, 0) - 1
            if monthly > 0 and not owns_steady:
                not_steady_customers.add(customer)
        if created_at >= until:
            continue
        if owns_steady:
            owners.add(customer)
        own = history.get(sub_id)
        histories.append(
            SubscriptionHistory(
                subscription_id=sub_id,
                customer_id=customer_id,
                currency=code,
                monthly_minor=monthly,
                created_at=created_at,
                # With no change recorded, it has had its current status since it was created.
                initial_status=status_before[sub_id] if own else _STATUS[status],
                changes=tuple(own) if own else (),
            )
        )
    for c, _ in not_steady_customers:
        steady_customers[c] = steady_customers.get(c, 0) - 1
    steady = [
        SteadyGroup(
            currency=c,
            monthly_minor=monthly_recurring_minor(amount, IntervalUnit(interval), count, qty),
            subscriptions=n,
        )
        for (c, amount, interval, count, qty), n in counted_now.items()
        if n
    ]
    return MrrInputs(
        histories,
        steady,
        {c: n for c, n in steady_customers.items() if n},
        frozenset(owners),
    )


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
