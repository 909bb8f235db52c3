"""Listings filtered by a narrow billing period take their own query shape (the period index
first, see db/repositories/finance.py). Finance must see exactly the same invoices, pages and
order as through the general shape."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session

from billing.finance import InvoiceCursor, InvoiceFilter
from billing.invoices import InvoiceStatus
from db.repositories import finance
from tests.db.conftest import T0


def _all_pages(session: Session, invoice_filter: InvoiceFilter, limit: int) -> list[list[str]]:
    pages, after = [], None
    while True:
        page = finance.list_invoices(session, invoice_filter, limit=limit, after=after)
        pages.append([item.invoice.id for item in page.items])
        if page.next_cursor is None:
            return pages
        after = InvoiceCursor.decode(page.next_cursor)


def test_a_narrow_period_lists_the_same_pages_in_listing_order(
    session: Session, factory: Any
) -> None:
    # Three subscriptions with anchors a day apart; six monthly periods each. Invoices of one
    # period are created out of period order (a late one), so the two orders differ.
    subscriptions = [
        factory.subscription(session, anchor_at=T0 + timedelta(days=n)) for n in range(3)
    ]
    for index in range(6):
        for n, subscription in enumerate(subscriptions):
            factory.invoice(
                session,
                subscription,
                index,
                created_at=T0 + timedelta(days=30 * index + (3 - n) * 2),
            )
    window_from, window_to = T0 + timedelta(days=60), T0 + timedelta(days=120)
    narrow = InvoiceFilter(period_from=window_from, period_to=window_to)
    assert finance._narrow_period(narrow)
    # Wider than a quarter: the general query shape, then narrowed by hand.
    wide = InvoiceFilter(period_from=T0 - timedelta(days=400), period_to=T0 + timedelta(days=400))
    assert not finance._narrow_period(wide)
    expected = [
        item.invoice
        for item in finance.list_invoices(session, wide, limit=200).items
        if window_from <= item.invoice.period_start < window_to
    ]
    assert len(expected) == 6
    pages = _all_pages(session, narrow, limit=4)
    assert pages == [[i.id for i in expected[:4]], [i.id for i in expected[4:]]]
    assert [i.created_at for i in expected] == sorted(i.created_at for i in expected)

    # Other filters still apply inside the window.
    first = expected[0]
    with_status = InvoiceFilter(
        period_from=window_from, period_to=window_to, statuses=(InvoiceStatus.OPEN,)
    )
    assert _all_pages(session, with_status, limit=4) == [[]]
    assert _all_pages(
        session, InvoiceFilter(period_from=window_from, period_to=window_to, currency="USD"), 10
    ) == [[i.id for i in expected]]
    assert first.status == InvoiceStatus.DRAFT
