"""Revenue reports for finance (scope ``finance`` or ``admin``), as JSON and as CSV:
``/v1/reports/mrr``, ``/v1/reports/ar-aging``, ``/v1/reports/dunning``,
``/v1/reports/collections`` (each also ``.csv``). Per currency, never converted; amounts in
minor units; months ``YYYY-MM`` in UTC, ``from`` and ``to`` both included."""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from billing import reporting
from billing.api.auth import require_scope
from billing.api.dependencies import get_clock, get_deps
from billing.api.errors import ApiError
from billing.api.schemas import CURRENCY_PATTERN, error_responses
from billing.clock import Clock
from billing.finance import format_instant
from billing.reports import (
    AGING_CSV_COLUMNS,
    COLLECTIONS_CSV_COLUMNS,
    DUNNING_CSV_COLUMNS,
    MRR_CSV_COLUMNS,
    aging_row,
    collection_row,
    csv_cell,
    mrr_row,
    recovery_row,
)
from billing.worker import Dependencies

router = APIRouter(
    prefix="/v1/reports",
    tags=["reports"],
    dependencies=[require_scope("finance", "admin")],
    responses=error_responses(401, 403, 422, 503),
)

_MONTH = r"^\d{4}-\d{2}$"
_MONTHLY_PARAMS = frozenset({"from", "to", "currency"})


def _refuse_unknown(request: Request, allowed: frozenset[str]) -> None:
    for name in request.query_params:
        if name not in allowed:
            raise ApiError(
                422,
                "invalid_input",
                f"unknown query parameter {name!r}; known: {', '.join(sorted(allowed))}",
                field=name,
            )
        if len(request.query_params.getlist(name)) > 1:
            raise ApiError(
                422, "invalid_input", f"query parameter {name!r} was given twice", field=name
            )


FromParam = Annotated[
    str | None,
    Query(alias="from", max_length=7, pattern=_MONTH, description="First month, YYYY-MM."),
]
ToParam = Annotated[
    str | None,
    Query(alias="to", max_length=7, pattern=_MONTH, description="Last month (included)."),
]
CurrencyParam = Annotated[
    str | None, Query(pattern=CURRENCY_PATTERN, description="Only this ISO 4217 currency.")
]


def month_range(
    request: Request,
    clock: Annotated[Clock, Depends(get_clock)],
    first: FromParam = None,
    last: ToParam = None,
    currency: CurrencyParam = None,
) -> reporting.MonthRange:
    _refuse_unknown(request, _MONTHLY_PARAMS)
    return reporting.month_range_from(first, last, currency, now=clock.now())


def _csv(columns: Sequence[str], rows: list[dict[str, object]], filename: str) -> Response:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([csv_cell(row[c]) for c in columns])
    return Response(
        buffer.getvalue(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


async def _read(fn: Callable[[], Any]) -> Any:
    return await asyncio.to_thread(fn)


def mrr_body(months: reporting.MonthRange, rows: list[dict[str, object]]) -> dict[str, Any]:
    return {"from": str(months.first), "to": str(months.last), "rows": rows}


_CSV: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/csv": {}}, "description": "A header row, then one line a row."}
}


@router.get("/mrr", summary="MRR, ARR and movements per month and currency")
async def mrr(
    months: Annotated[reporting.MonthRange, Depends(month_range)],
    deps: Annotated[Dependencies, Depends(get_deps)],
) -> dict[str, Any]:
    """Per currency and month: opening and closing MRR, the movements (new, expansion,
    contraction, churned, reactivated), ARR (closing x 12), active subscriptions and
    customers, logo and revenue churn. A subscription counts while active, past due or
    needing attention; annual prices count / 12, weekly x 52 / 12."""
    rows = await _read(lambda: reporting.mrr(deps.session_factory, months))
    return mrr_body(months, [mrr_row(m) for m in rows])


@router.get("/mrr.csv", summary="MRR report as CSV", response_class=Response, responses=_CSV)
async def mrr_csv(
    months: Annotated[reporting.MonthRange, Depends(month_range)],
    deps: Annotated[Dependencies, Depends(get_deps)],
) -> Response:
    rows = await _read(lambda: reporting.mrr(deps.session_factory, months))
    return _csv(MRR_CSV_COLUMNS, [mrr_row(m) for m in rows], "mrr.csv")


_AGING_PARAMS = frozenset({"as_of", "currency"})


def _aging(
    request: Request, deps: Dependencies, clock: Clock, as_of: str | None, currency: str | None
) -> tuple[datetime, list[dict[str, object]]]:
    _refuse_unknown(request, _AGING_PARAMS)
    instant, rows = reporting.aging(
        deps.session_factory, as_of=as_of, currency=currency, now=clock.now()
    )
    return instant, [aging_row(r) for r in rows]


AsOfParam = Annotated[
    str | None,
    Query(
        max_length=64,
        description="The instant (ISO 8601 with a zone); default now.",
        json_schema_extra={"format": "date-time"},
    ),
]


@router.get("/ar-aging", summary="Accounts receivable aging per currency")
async def ar_aging(
    request: Request,
    deps: Annotated[Dependencies, Depends(get_deps)],
    clock: Annotated[Clock, Depends(get_clock)],
    as_of: AsOfParam = None,
    currency: CurrencyParam = None,
) -> dict[str, Any]:
    """Invoices unpaid at ``as_of`` by days past due (due when finalized): current, 1-30,
    31-60, 61-90, over-90; count and outstanding amount per bucket and currency."""
    instant, rows = await _read(lambda: _aging(request, deps, clock, as_of, currency))
    return {"as_of": format_instant(instant), "rows": rows}


@router.get("/ar-aging.csv", summary="AR aging as CSV", response_class=Response, responses=_CSV)
async def ar_aging_csv(
    request: Request,
    deps: Annotated[Dependencies, Depends(get_deps)],
    clock: Annotated[Clock, Depends(get_clock)],
    as_of: AsOfParam = None,
    currency: CurrencyParam = None,
) -> Response:
    _, rows = await _read(lambda: _aging(request, deps, clock, as_of, currency))
    return _csv(AGING_CSV_COLUMNS, rows, "ar-aging.csv")


def dunning_body(report: Any, months: reporting.MonthRange) -> dict[str, Any]:
    return {
        "from": str(months.first),
        "to": str(months.last),
        "rows": [recovery_row(r) for r in report.rows],
        "written_off": [
            {"currency": w.currency, "invoices": w.invoices, "amount_minor": w.amount_minor}
            for w in report.written_off
        ],
    }


@router.get("/dunning", summary="Dunning recovery per currency")
async def dunning(
    months: Annotated[reporting.MonthRange, Depends(month_range)],
    deps: Annotated[Dependencies, Depends(get_deps)],
) -> dict[str, Any]:
    """Invoices issued in the months whose first charge failed: how many were recovered, by
    the attempt number that paid them and by the first failure's decline class, and what was
    written off (uncollectible)."""
    report = await _read(lambda: reporting.dunning(deps.session_factory, months))
    return dunning_body(report, months)


@router.get(
    "/dunning.csv", summary="Dunning recovery as CSV", response_class=Response, responses=_CSV
)
async def dunning_csv(
    months: Annotated[reporting.MonthRange, Depends(month_range)],
    deps: Annotated[Dependencies, Depends(get_deps)],
) -> Response:
    report = await _read(lambda: reporting.dunning(deps.session_factory, months))
    return _csv(DUNNING_CSV_COLUMNS, [recovery_row(r) for r in report.rows], "dunning.csv")


@router.get("/collections", summary="Collected vs invoiced per month and currency")
async def collections(
    months: Annotated[reporting.MonthRange, Depends(month_range)],
    deps: Annotated[Dependencies, Depends(get_deps)],
) -> dict[str, Any]:
    """Invoiced (issued that month, draft and void excluded), collected (settled that month),
    refunded (refunds that succeeded that month), net collected (collected less refunded) and
    the provider's fees (by settlement currency), per month and currency."""
    rows = await _read(lambda: reporting.collections(deps.session_factory, months))
    return mrr_body(months, [collection_row(r) for r in rows])


@router.get(
    "/collections.csv",
    summary="Collected vs invoiced as CSV",
    response_class=Response,
    responses=_CSV,
)
async def collections_csv(
    months: Annotated[reporting.MonthRange, Depends(month_range)],
    deps: Annotated[Dependencies, Depends(get_deps)],
) -> Response:
    rows = await _read(lambda: reporting.collections(deps.session_factory, months))
    return _csv(COLLECTIONS_CSV_COLUMNS, [collection_row(r) for r in rows], "collections.csv")
