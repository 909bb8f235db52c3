"""Invoices for finance (scope ``finance`` or ``admin``): a filtered, keyset-paginated list,
one invoice with its attempts and payment, and the same list as a streamed CSV."""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import StreamingResponse

from billing.api.auth import require_scope
from billing.api.dependencies import get_deps
from billing.api.errors import ApiError
from billing.api.schemas import (
    CURRENCY_PATTERN,
    ID_PATTERN,
    InvoiceDetailOut,
    InvoiceListOut,
    error_responses,
)
from billing.errors import NotFound
from billing.finance import (
    DEFAULT_PAGE_SIZE,
    EXPORT_PAGE_SIZE,
    INVOICE_CSV_COLUMNS,
    INVOICE_LINE_CSV_COLUMNS,
    MAX_PAGE_SIZE,
    InvoiceCursor,
    InvoiceFilter,
    InvoiceListItem,
    invoice_csv_row,
    invoice_line_csv_rows,
)
from billing.invoices import InvoiceStatus
from billing.worker import Dependencies
from db.engine import unit_of_work
from db.repositories import finance as finance_repo

router = APIRouter(
    prefix="/v1",
    tags=["invoices"],
    dependencies=[require_scope("finance", "admin")],
    responses=error_responses(401, 403, 422, 503),
)

_FILTER_PARAMS = frozenset(
    {
        "status",
        "customer_id",
        "subscription_id",
        "currency",
        "issued_from",
        "issued_to",
        "period_from",
        "period_to",
    }
)
_REPEATABLE_PARAMS = frozenset({"status"})
_INSTANT_HELP = "ISO 8601 instant with a zone, e.g. 2025-01-31T00:00:00Z"
#: Documents the format; InvoiceFilter.parse checks it and names the field when it is wrong.
_INSTANT_SCHEMA: dict[str, Any] = {"format": "date-time"}
_STATUS_VALUES = [status.value for status in InvoiceStatus]


def _refuse_unknown_params(request: Request, allowed: frozenset[str]) -> None:
    # A misspelt filter (`statuses=paid`) would otherwise list every invoice, silently.
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        raise ApiError(
            422,
            "invalid_input",
            f"unknown query parameter {unknown[0]!r}; known: {', '.join(sorted(allowed))}",
            field=unknown[0],
        )
    # Only `status` repeats; a repeated single value (`issued_to=a&issued_to=b`) would
    # otherwise silently keep the last one, and which one a proxy or a client keeps varies.
    for name in sorted(allowed - _REPEATABLE_PARAMS):
        given = len(request.query_params.getlist(name))
        if given > 1:
            raise ApiError(
                422,
                "invalid_input",
                f"query parameter {name!r} was given {given} times; give it once",
                field=name,
            )


def invoice_filter(
    status: Annotated[
        list[str],
        Query(
            description="Repeatable: draft, open, paid, void, uncollectible.",
            json_schema_extra={
                "items": {"type": "string", "enum": [s.value for s in InvoiceStatus]}
            },
        ),
    ] = [],  # noqa: B006 (FastAPI copies defaults per request)
    customer_id: Annotated[str | None, Query(max_length=40, pattern=ID_PATTERN)] = None,
    subscription_id: Annotated[str | None, Query(max_length=40, pattern=ID_PATTERN)] = None,
    currency: Annotated[
        str | None, Query(pattern=CURRENCY_PATTERN, description="ISO 4217, e.g. USD")
    ] = None,
    issued_from: Annotated[
        str | None,
        Query(
            max_length=64,
            description=f"created_at >= this; {_INSTANT_HELP}",
            json_schema_extra=_INSTANT_SCHEMA,
        ),
    ] = None,
    issued_to: Annotated[
        str | None,
        Query(
            max_length=64,
            description=f"created_at < this; {_INSTANT_HELP}",
            json_schema_extra=_INSTANT_SCHEMA,
        ),
    ] = None,
    period_from: Annotated[
        str | None,
        Query(
            max_length=64,
            description=f"period_start >= this; {_INSTANT_HELP}",
            json_schema_extra=_INSTANT_SCHEMA,
        ),
    ] = None,
    period_to: Annotated[
        str | None,
        Query(
            max_length=64,
            description=f"period_start < this; {_INSTANT_HELP}",
            json_schema_extra=_INSTANT_SCHEMA,
        ),
    ] = None,
) -> InvoiceFilter:
    """The filter from the query string; InvalidInput (422) names a bad value."""
    return InvoiceFilter.parse(
        statuses=status,
        customer_id=customer_id,
        subscription_id=subscription_id,
        currency=currency,
        issued_from=issued_from,
        issued_to=issued_to,
        period_from=period_from,
        period_to=period_to,
    )


@router.get("/invoices", summary="List invoices")
async def list_invoices(
    request: Request,
    filters: Annotated[InvoiceFilter, Depends(invoice_filter)],
    deps: Annotated[Dependencies, Depends(get_deps)],
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = DEFAULT_PAGE_SIZE,
    cursor: Annotated[
        str | None, Query(max_length=512, description="next_cursor of the previous page.")
    ] = None,
) -> InvoiceListOut:
    """Invoices matching every filter given, oldest first (by created_at, then id). Amounts
    are minor units with their currency; ranges are half-open ([from, to))."""
    _refuse_unknown_params(request, _FILTER_PARAMS | {"limit", "cursor"})
    after = InvoiceCursor.decode(cursor) if cursor is not None else None

    def read() -> InvoiceListOut:
        with unit_of_work(deps.session_factory) as session:
            page = finance_repo.list_invoices(session, filters, limit=limit, after=after)
        return InvoiceListOut.of(page)

    return await asyncio.to_thread(read)


@router.get(
    "/invoices.csv",
    summary="Export invoices as CSV",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/csv": {}}, "description": "One line per invoice."}},
)
async def export_invoices(
    request: Request,
    filters: Annotated[InvoiceFilter, Depends(invoice_filter)],
    deps: Annotated[Dependencies, Depends(get_deps)],
) -> StreamingResponse:
    """The invoices ``GET /v1/invoices`` lists for the same filters, all of them, streamed: a
    header row, then one line per invoice. Amounts are minor units next to a currency
    column; instants are ISO 8601 UTC."""
    _refuse_unknown_params(request, _FILTER_PARAMS)
    pages = finance_repo.iter_invoice_pages(
        deps.session_factory, filters, page_size=EXPORT_PAGE_SIZE
    )
    # The first page is read before answering, so a database failure is still a clean error
    # response rather than a truncated 200.
    first = await asyncio.to_thread(_next_page, pages)
    return StreamingResponse(
        _csv_lines(first, pages),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="invoices.csv"'},
    )


@router.get(
    "/invoice-lines.csv",
    summary="Export invoice lines as CSV",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/csv": {}}, "description": "One line per invoice line."}},
)
async def export_invoice_lines(
    request: Request,
    filters: Annotated[InvoiceFilter, Depends(invoice_filter)],
    deps: Annotated[Dependencies, Depends(get_deps)],
) -> StreamingResponse:
    """The lines of the invoices ``GET /v1/invoices.csv`` exports for the same filters, one
    row per line (the subscription line, proration lines with their periods, credit notes
    carried over), each with its invoice's id, number, status and totals. ``amount_minor`` is
    signed (a credit is negative); an invoice's lines add up to its ``invoice_subtotal_minor``.
    """
    _refuse_unknown_params(request, _FILTER_PARAMS)
    pages = finance_repo.iter_invoice_pages(
        deps.session_factory, filters, page_size=EXPORT_PAGE_SIZE, with_lines=True
    )
    first = await asyncio.to_thread(_next_page, pages)
    return StreamingResponse(
        _line_csv_lines(first, pages),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="invoice-lines.csv"'},
    )


async def _line_csv_lines(
    first: list[InvoiceListItem] | None, pages: Iterator[list[InvoiceListItem]]
) -> AsyncIterator[str]:
    yield _csv_text([list(INVOICE_LINE_CSV_COLUMNS)])
    page = first
    while page is not None:
        yield _csv_text([row for item in page for row in invoice_line_csv_rows(item)])
        page = await asyncio.to_thread(_next_page, pages)


def _next_page(pages: Iterator[list[InvoiceListItem]]) -> list[InvoiceListItem] | None:
    return next(pages, None)


def _csv_text(rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerows(rows)
    return buffer.getvalue()


async def _csv_lines(
    first: list[InvoiceListItem] | None, pages: Iterator[list[InvoiceListItem]]
) -> AsyncIterator[str]:
    yield _csv_text([list(INVOICE_CSV_COLUMNS)])
    page = first
    while page is not None:
        yield _csv_text([invoice_csv_row(item) for item in page])
        # Each page is its own short transaction, read off the event loop.
        page = await asyncio.to_thread(_next_page, pages)


@router.get(
    "/invoices/{id}",
    summary="One invoice with its attempts and payment",
    responses=error_responses(404),
)
async def get_invoice(
    id: Annotated[
        str,
        Path(min_length=1, max_length=40, pattern=ID_PATTERN, description="Invoice id, 'in_...'."),
    ],
    deps: Annotated[Dependencies, Depends(get_deps)],
) -> InvoiceDetailOut:
    """The invoice, every charge attempt (number, status, outcome, decline code, idempotency
    key, provider ids) and its payment (amount, fee, net, settlement)."""

    def read() -> InvoiceDetailOut:
        with unit_of_work(deps.session_factory) as session:
            detail = finance_repo.get_invoice_detail(session, id)
        if detail is None:
            raise NotFound(f"invoice {id!r} not found", field="id")
        return InvoiceDetailOut.of_detail(detail)

    return await asyncio.to_thread(read)
