"""Finance reads: filtered invoice listings with keyset pagination, one invoice with its
attempts and payment, and a subscription's invoicing summary.

Listings are ordered by (created_at, id) ascending and continue after a cursor with
``created_at > c OR (created_at = c AND id > i)``, which both SQLite and PostgreSQL run; the
extra ``created_at >= c`` lets the planner use an index on created_at for the range.
Reads only: nothing here writes or commits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import fields
from datetime import timedelta
from typing import Any, cast

from sqlalchemy import Select, and_, func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from billing.finance import (
    DEFAULT_PAGE_SIZE,
    EXPORT_PAGE_SIZE,
    InvoiceCursor,
    InvoiceDetail,
    InvoiceFilter,
    InvoiceListItem,
    InvoicePage,
    SubscriptionInvoicing,
    check_page_size,
)
from billing.invoices import InvoiceStatus
from billing.records import InvoiceRecord, PaymentRecord
from db.engine import unit_of_work
from db.models import INVOICES, PAYMENT_ATTEMPTS, PAYMENTS
from db.repositories import attempts as attempts_repo
from db.repositories import invoices as invoices_repo
from db.repositories import payments as payments_repo
from db.repositories._rows import fetch_one, select_rows

_PAYMENT_PREFIX = "payment__"
_INVOICE_FIELDS = tuple(f.name for f in fields(InvoiceRecord))
_PAYMENT_FIELDS = tuple(f.name for f in fields(PaymentRecord))


def _listing(invoice_filter: InvoiceFilter, *, only: Any = None) -> Select[Any]:
    """Invoices matching the filter, each with its payment (at most one: a unique constraint),
    so the outer join never repeats an invoice. ``only``: a subquery of invoice ids (column
    ``id``) the listing is restricted to, by join."""
    invoices = INVOICES
    payments = PAYMENTS
    source = invoices if only is None else invoices.join(only, only.c.id == invoices.c.id)
    statement = select(
        *(invoices.c[name] for name in _INVOICE_FIELDS),
        *(payments.c[name].label(_PAYMENT_PREFIX + name) for name in _PAYMENT_FIELDS),
    ).select_from(source.outerjoin(payments, payments.c.invoice_id == invoices.c.id))
    return _filtered(statement, invoice_filter)


def _filtered(statement: Select[Any], f: InvoiceFilter) -> Select[Any]:
    """``statement`` (a select over invoices) narrowed by the filter."""
    if f.statuses:
        statement = statement.where(INVOICES.c.status.in_(f.statuses))
    if f.customer_id is not None:
        statement = statement.where(INVOICES.c.customer_id == f.customer_id)
    if f.subscription_id is not None:
        statement = statement.where(INVOICES.c.subscription_id == f.subscription_id)
    if f.currency is not None:
        statement = statement.where(INVOICES.c.currency == f.currency)
    if f.issued_from is not None:
        statement = statement.where(INVOICES.c.created_at >= f.issued_from)
    if f.issued_to is not None:
        statement = statement.where(INVOICES.c.created_at < f.issued_to)
    if f.period_from is not None:
        statement = statement.where(INVOICES.c.period_start >= f.period_from)
    if f.period_to is not None:
        statement = statement.where(INVOICES.c.period_start < f.period_to)
    return statement


def _item(row: Any) -> InvoiceListItem:
    invoice = InvoiceRecord(**{name: row[name] for name in _INVOICE_FIELDS})
    payment = None
    if row[_PAYMENT_PREFIX + "id"] is not None:
        payment = PaymentRecord(**{name: row[_PAYMENT_PREFIX + name] for name in _PAYMENT_FIELDS})
    return InvoiceListItem(invoice, payment)


def _after(statement: Select[Any], after: InvoiceCursor | None) -> Select[Any]:
    if after is None:
        return statement
    return statement.where(
        INVOICES.c.created_at >= after.created_at,
        or_(
            INVOICES.c.created_at > after.created_at,
            and_(INVOICES.c.created_at == after.created_at, INVOICES.c.id > after.invoice_id),
        ),
    )


#: A period filter at most this wide selects its rows through the period_start index first.
NARROW_PERIOD = timedelta(days=93)


def _narrow_period(f: InvoiceFilter) -> bool:
    """A period window of at most a quarter, with nothing more selective (a customer or a
    subscription has few invoices and its own index)."""
    return (
        f.period_from is not None
        and f.period_to is not None
        and f.period_to - f.period_from <= NARROW_PERIOD
        and f.customer_id is None
        and f.subscription_id is None
    )


def _fetch(
    session: Session, invoice_filter: InvoiceFilter, limit: int, after: InvoiceCursor | None
) -> tuple[list[InvoiceListItem], bool]:
    """Up to ``limit`` items after ``after``, and whether more follow. One row more than asked
    tells whether another page exists, without a COUNT."""
    order = (INVOICES.c.created_at, INVOICES.c.id)
    if _narrow_period(invoice_filter):
        # Invoices are created when their period starts, so periods and (created_at, id) order
        # are correlated: the planner, assuming them independent, walks the created_at index
        # expecting matches early and finds a late month's only after most of the table (300 ms
        # at 1M invoices). A materialized CTE fences that off: the window's (id, created_at)
        # come from the (period_start, created_at, id) index alone, the page is the first of
        # them in listing order, and only the page's rows are read in full.
        keys = cast("Select[Any]", select(INVOICES.c.id, INVOICES.c.created_at))
        window = (
            _after(_filtered(keys, invoice_filter), after)
            .cte("period_window")
            .prefix_with("MATERIALIZED")
        )
        page = (
            select(window.c.id)
            .order_by(window.c.created_at, window.c.id)
            .limit(limit + 1)
            .subquery("page")
        )
        statement = _listing(invoice_filter, only=page).order_by(*order)
    else:
        statement = _after(_listing(invoice_filter), after).order_by(*order).limit(limit + 1)
    items = [_item(row) for row in session.execute(statement).mappings()]
    return items[:limit], len(items) > limit


def list_invoices(
    session: Session,
    invoice_filter: InvoiceFilter,
    *,
    limit: int = DEFAULT_PAGE_SIZE,
    after: InvoiceCursor | None = None,
) -> InvoicePage:
    """One page of the invoices matching ``invoice_filter``, in (created_at, id) order,
    starting after ``after`` (the previous page's ``next_cursor``, decoded). ``limit`` is
    1..200; InvalidInput otherwise."""
    items, has_more = _fetch(session, invoice_filter, check_page_size(limit), after)
    next_cursor = InvoiceCursor.after(items[-1].invoice).encode() if has_more else None
    lines = invoices_repo.lines_by_invoice(session, [item.invoice.id for item in items])
    items = [dataclasses.replace(item, lines=lines[item.invoice.id]) for item in items]
    return InvoicePage(items=items, has_more=has_more, next_cursor=next_cursor)


def iter_invoice_pages(
    session_factory: sessionmaker[Session],
    invoice_filter: InvoiceFilter,
    *,
    page_size: int = EXPORT_PAGE_SIZE,
    after: InvoiceCursor | None = None,
    with_lines: bool = False,
) -> Iterator[list[InvoiceListItem]]:
    """Every invoice matching the filter, in (created_at, id) order, as lists of at most
    ``page_size`` (never an empty list). Each page is read in its own short transaction, so
    an export of any size holds no transaction open between pages (on SQLite every
    transaction takes the write lock the workers need) and has one page in memory.
    ``with_lines``: each item carries its lines (one more query per page)."""
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size must be a positive integer; got {page_size!r}")
    cursor = after
    while True:
        with unit_of_work(session_factory) as session:
            items, has_more = _fetch(session, invoice_filter, page_size, cursor)
            if with_lines and items:
                lines = invoices_repo.lines_by_invoice(session, [i.invoice.id for i in items])
                items = [dataclasses.replace(i, lines=lines[i.invoice.id]) for i in items]
        if items:
            yield items
        if not has_more:
            return
        cursor = InvoiceCursor.after(items[-1].invoice)


def iter_invoices(
    session_factory: sessionmaker[Session],
    invoice_filter: InvoiceFilter,
    *,
    page_size: int = EXPORT_PAGE_SIZE,
    with_lines: bool = False,
) -> Iterator[InvoiceListItem]:
    """``iter_invoice_pages``, one invoice at a time."""
    for page in iter_invoice_pages(
        session_factory, invoice_filter, page_size=page_size, with_lines=with_lines
    ):
        yield from page


def count_invoices(session: Session, invoice_filter: InvoiceFilter) -> int:
    """How many invoices match the filter."""
    listing = _listing(invoice_filter).subquery()
    return int(session.execute(select(func.count()).select_from(listing)).scalar_one())


def get_invoice_detail(session: Session, invoice_id: str) -> InvoiceDetail | None:
    """The invoice with its attempts (by attempt number) and payments; None if unknown."""
    invoice = invoices_repo.get_invoice(session, invoice_id)
    if invoice is None:
        return None
    return InvoiceDetail(
        invoice=invoice,
        attempts=attempts_repo.list_attempts_for_invoice(session, invoice_id),
        payments=payments_repo.list_payments_for_invoice(session, invoice_id),
        lines=invoices_repo.list_invoice_lines(session, invoice_id),
    )


def subscription_invoicing(session: Session, subscription_id: str) -> SubscriptionInvoicing:
    """How many invoices the subscription has, and its open invoice with the number of
    charge attempts made on it (the newest open one, if several)."""
    issued = session.execute(
        select(func.count())
        .select_from(INVOICES)
        .where(INVOICES.c.subscription_id == subscription_id)
    ).scalar_one()
    open_invoice = fetch_one(
        session,
        InvoiceRecord,
        select_rows(INVOICES)
        .where(
            INVOICES.c.subscription_id == subscription_id,
            INVOICES.c.status == InvoiceStatus.OPEN,
        )
        .order_by(INVOICES.c.period_start.desc())
        .limit(1),
    )
    attempts = 0
    if open_invoice is not None:
        attempts = int(
            session.execute(
                select(func.count())
                .select_from(PAYMENT_ATTEMPTS)
                .where(PAYMENT_ATTEMPTS.c.invoice_id == open_invoice.id)
            ).scalar_one()
        )
    return SubscriptionInvoicing(
        invoices_issued=int(issued), open_invoice=open_invoice, open_invoice_attempts=attempts
    )
