"""Payouts and reconciliation for finance (scope ``finance`` or ``admin``): the payouts Stripe
made, each one's reconciliation against our payments, refunds and disputes, a period's report
(with what is in no payout after the expected delay), the CSVs, and the findings of the daily
charge reconciliation. Reads only; the imports run in workflows (``payout.*`` webhooks and the
daily Schedule)."""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import Iterator
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel

from billing.api.auth import Caller, require_scope
from billing.api.dependencies import get_deps, require_json_body
from billing.api.errors import ApiError
from billing.api.schemas import (
    ID_PATTERN,
    FindingOut,
    Instant,
    PayoutOut,
    PayoutReconciliationOut,
    RequestIn,
    ResolutionNoteIn,
    error_responses,
)
from billing.charge_reconciliation import FindingStatus
from billing.errors import NotFound
from billing.finance import format_instant, parse_instant
from billing.ledger import Finding, PayoutReconciliation, PeriodReconciliation
from billing.records import ReconciliationFindingRecord
from billing.text import RESOLVED_BY
from billing.worker import Dependencies
from db.engine import unit_of_work
from db.repositories import ledger as ledger_repo

router = APIRouter(
    prefix="/v1",
    tags=["payouts"],
    dependencies=[require_scope("finance", "admin")],
    responses=error_responses(401, 403, 422, 503),
)

#: Finance's writes here (resolving a finding): admin only. A router of their own, because a
#: router's scope requirement and a route's are both required, while the OpenAPI document
#: would list the union (finance would be told it may, then refused).
admin_router = APIRouter(
    prefix="/v1",
    tags=["payouts"],
    dependencies=[require_scope("admin")],
    responses=error_responses(401, 403, 422, 503),
)

_INSTANT = "ISO 8601 instant with a zone, e.g. 2025-01-31T00:00:00Z"
PayoutId = Annotated[
    str,
    Path(
        min_length=1,
        max_length=40,
        pattern=ID_PATTERN,
        description="Our payout id ('pout_...') or Stripe's ('po_...').",
    ),
]


class PayoutListOut(BaseModel):
    data: list[PayoutOut]


class PeriodReconciliationOut(BaseModel):
    since: Instant | None
    until: Instant
    expected_delay_days: int
    payouts: list[PayoutReconciliationOut]
    missing_from_payouts: list[FindingOut]
    differences: int
    totals: dict[str, dict[str, int]]


class FindingResolutionOut(BaseModel):
    resolved_at: Instant
    resolved_by: str
    note: str


class ChargeFindingOut(BaseModel):
    id: str
    kind: str
    severity: str
    detail: str
    invoice_id: str | None
    payment_intent_id: str | None
    charge_id: str | None
    amount_minor: int | None
    currency: str | None
    found_at: Instant
    run_id: str
    status: FindingStatus
    resolution: FindingResolutionOut | None

    @classmethod
    def of(cls, f: ReconciliationFindingRecord) -> ChargeFindingOut:
        return cls(
            id=f.id,
            kind=f.kind,
            severity=f.severity,
            detail=f.detail,
            invoice_id=f.invoice_id,
            payment_intent_id=f.payment_intent_id,
            charge_id=f.charge_id,
            amount_minor=f.amount_minor,
            currency=f.currency,
            found_at=f.found_at,
            run_id=f.run_id,
            status=FindingStatus.OPEN if f.resolved_at is None else FindingStatus.RESOLVED,
            resolution=(
                FindingResolutionOut(
                    resolved_at=f.resolved_at,
                    resolved_by=f.resolved_by or "",
                    note=f.resolution_note or "",
                )
                if f.resolved_at is not None
                else None
            ),
        )


class ChargeFindingListOut(BaseModel):
    data: list[ChargeFindingOut]
    #: Open (unresolved) findings per severity, as the metric counts them.
    by_severity: dict[str, int]


class ResolveFindingIn(RequestIn):
    """Why the finding needs nothing more (refunded, booked by hand, a known test charge)."""

    note: ResolutionNoteIn


def _refuse_unknown_params(request: Request, allowed: frozenset[str]) -> None:
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        known = ", ".join(sorted(allowed)) or "none"
        raise ApiError(
            422,
            "invalid_input",
            f"unknown query parameter {unknown[0]!r}; known: {known}",
            field=unknown[0],
        )
    for name in sorted(allowed):
        if len(request.query_params.getlist(name)) > 1:
            raise ApiError(
                422,
                "invalid_input",
                f"query parameter {name!r} was given more than once",
                field=name,
            )


_Since = Annotated[str | None, Query(max_length=64, description=f"from (inclusive); {_INSTANT}")]
_Until = Annotated[str | None, Query(max_length=64, description=f"to (exclusive); {_INSTANT}")]
_Delay = Annotated[
    int,
    Query(ge=0, le=90, description="Days after which a settled payment must be in a payout."),
]


@router.get("/payouts", summary="List payouts")
async def list_payouts(
    request: Request,
    deps: Annotated[Dependencies, Depends(get_deps)],
    since: _Since = None,
    until: _Until = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> PayoutListOut:
    """Payouts Stripe created in ``[since, until)``, oldest first, as last imported."""
    _refuse_unknown_params(request, frozenset({"since", "until", "limit"}))
    start, end = parse_instant(since, field="since"), parse_instant(until, field="until")

    def read() -> PayoutListOut:
        with unit_of_work(deps.session_factory) as session:
            found = ledger_repo.list_payouts(session, since=start, until=end, limit=limit)
        return PayoutListOut(data=[PayoutOut.of(p) for p in found])

    return await asyncio.to_thread(read)


def _payout_report(deps: Dependencies, payout_id: str) -> PayoutReconciliation:
    with unit_of_work(deps.session_factory) as session:
        payout = ledger_repo.get_payout(session, payout_id)
        if payout is None:
            raise NotFound(f"payout {payout_id!r} not found (not imported yet?)", field="id")
        return ledger_repo.payout_reconciliation(session, payout)


@router.get(
    "/payouts/{id}/reconciliation",
    summary="One payout reconciled",
    responses=error_responses(404),
)
async def payout_reconciliation(
    id: PayoutId, request: Request, deps: Annotated[Dependencies, Depends(get_deps)]
) -> PayoutReconciliationOut:
    """Every balance transaction the payout paid out, matched to our payments, refunds and
    disputes; each difference with its kind and severity; gross, fee and net totals."""
    _refuse_unknown_params(request, frozenset())
    return PayoutReconciliationOut.of(await asyncio.to_thread(_payout_report, deps, id))


#: One line per difference (or per payout without any), for finance.
RECONCILIATION_CSV_COLUMNS = (
    "stripe_payout_id",
    "currency",
    "payout_amount_minor",
    "gross_minor",
    "fee_minor",
    "net_minor",
    "kind",
    "severity",
    "balance_transaction_id",
    "source_id",
    "ours",
    "detail",
)


def csv_rows(reports: list[PayoutReconciliation], missing: list[Finding]) -> Iterator[list[str]]:
    yield list(RECONCILIATION_CSV_COLUMNS)
    for r in reports:
        head = [
            r.payout_id,
            r.currency,
            str(r.amount_minor),
            str(r.gross_minor),
            str(r.fee_minor),
            str(r.net_minor),
        ]
        if not r.findings:
            yield [
                *head,
                "reconciled",
                "info",
                "",
                "",
                "",
                f"{len(r.matched)} transactions matched",
            ]
        for f in r.findings:
            yield [
                *head,
                f.kind.value,
                f.severity.value,
                f.transaction_id or "",
                f.source_id or "",
                f.ours or "",
                f.detail,
            ]
    for f in missing:
        yield [
            "",
            "",
            "",
            "",
            "",
            "",
            f.kind.value,
            f.severity.value,
            f.transaction_id or "",
            "",
            f.ours or "",
            f.detail,
        ]


def _csv(rows: Iterator[list[str]], filename: str) -> Response:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerows(rows)
    return Response(
        buffer.getvalue(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.get(
    "/payouts/{id}/reconciliation.csv",
    summary="One payout reconciled, as CSV",
    response_class=Response,
    responses={
        200: {"content": {"text/csv": {}}, "description": "One line per difference."},
        **error_responses(404),
    },
)
async def payout_reconciliation_csv(
    id: PayoutId, request: Request, deps: Annotated[Dependencies, Depends(get_deps)]
) -> Response:
    _refuse_unknown_params(request, frozenset())
    report = await asyncio.to_thread(_payout_report, deps, id)
    return _csv(csv_rows([report], []), f"payout-{report.payout_id}.csv")


def _period(
    deps: Dependencies, since: str | None, until: str | None, delay_days: int
) -> PeriodReconciliation:
    start = parse_instant(since, field="since")
    now = deps.clock.now()
    end = parse_instant(until, field="until") or now
    if start is not None and start >= end:
        raise ApiError(422, "invalid_input", "since must be before until", field="since")
    with unit_of_work(deps.session_factory) as session:
        return ledger_repo.period_reconciliation(
            session, since=start, until=end, now=now, expected_delay=timedelta(days=delay_days)
        )


@router.get("/reconciliation", summary="Reconcile a period's payouts")
async def period_reconciliation(
    request: Request,
    deps: Annotated[Dependencies, Depends(get_deps)],
    since: _Since = None,
    until: _Until = None,
    expected_delay_days: _Delay = 7,
) -> PeriodReconciliationOut:
    """Every payout created in ``[since, until)`` (until: now) reconciled, and our payments and
    refunds of the period in no payout although ``expected_delay_days`` have passed."""
    _refuse_unknown_params(request, frozenset({"since", "until", "expected_delay_days"}))
    period = await asyncio.to_thread(_period, deps, since, until, expected_delay_days)
    return PeriodReconciliationOut(
        since=period.since,
        until=period.until,
        expected_delay_days=expected_delay_days,
        payouts=[PayoutReconciliationOut.of(r) for r in period.payouts],
        missing_from_payouts=[FindingOut.of(f) for f in period.missing],
        differences=len(period.findings),
        totals=period.totals(),
    )


@router.get(
    "/reconciliation.csv",
    summary="Reconcile a period's payouts, as CSV",
    response_class=Response,
    responses={200: {"content": {"text/csv": {}}, "description": "One line per difference."}},
)
async def period_reconciliation_csv(
    request: Request,
    deps: Annotated[Dependencies, Depends(get_deps)],
    since: _Since = None,
    until: _Until = None,
    expected_delay_days: _Delay = 7,
) -> Response:
    _refuse_unknown_params(request, frozenset({"since", "until", "expected_delay_days"}))
    period = await asyncio.to_thread(_period, deps, since, until, expected_delay_days)
    return _csv(csv_rows(period.payouts, period.missing), "reconciliation.csv")


_FindingStatusQuery = Annotated[
    FindingStatus | None,
    Query(description="open (not resolved yet) or resolved; default: both"),
]
FindingId = Annotated[
    str,
    Path(min_length=1, max_length=40, pattern=ID_PATTERN, description="Finding id, 'rcf_...'."),
]


def _read_findings(
    deps: Dependencies,
    since: str | None,
    severity: str | None,
    status: FindingStatus | None,
    limit: int,
) -> tuple[list[ReconciliationFindingRecord], dict[str, int]]:
    start = parse_instant(since, field="since")
    with unit_of_work(deps.session_factory) as session:
        found = ledger_repo.list_findings(
            session, since=start, severity=severity, status=status, limit=limit
        )
        counts = ledger_repo.count_findings_by_severity(session)
    return found, counts


@router.get("/reconciliation/findings", summary="The daily charge reconciliation's findings")
async def charge_findings(
    request: Request,
    deps: Annotated[Dependencies, Depends(get_deps)],
    since: _Since = None,
    severity: Annotated[str | None, Query(pattern="^(info|warning|error)$")] = None,
    status: _FindingStatusQuery = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> ChargeFindingListOut:
    """Late successes, charges with no attempt of ours, amount mismatches, double charges and
    attempts still of unknown outcome, each once, with its severity and, once finance resolved
    it, the resolution (who, when, why)."""
    _refuse_unknown_params(request, frozenset({"since", "severity", "status", "limit"}))
    found, counts = await asyncio.to_thread(_read_findings, deps, since, severity, status, limit)
    return ChargeFindingListOut(data=[ChargeFindingOut.of(f) for f in found], by_severity=counts)


FINDINGS_CSV_COLUMNS = [
    "id",
    "found_at",
    "severity",
    "kind",
    "status",
    "invoice_id",
    "payment_intent_id",
    "charge_id",
    "amount_minor",
    "currency",
    "detail",
    "resolved_at",
    "resolved_by",
    "resolution_note",
]


def _csv_safe(text: str) -> str:
    # A formula-looking note must not run in a spreadsheet.
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def findings_csv_rows(found: list[ReconciliationFindingRecord]) -> Iterator[list[str]]:
    yield FINDINGS_CSV_COLUMNS
    for f in found:
        yield [
            f.id,
            format_instant(f.found_at),
            f.severity,
            f.kind,
            FindingStatus.OPEN if f.resolved_at is None else FindingStatus.RESOLVED,
            f.invoice_id or "",
            f.payment_intent_id or "",
            f.charge_id or "",
            "" if f.amount_minor is None else str(f.amount_minor),
            f.currency or "",
            _csv_safe(f.detail),
            format_instant(f.resolved_at) if f.resolved_at is not None else "",
            _csv_safe(f.resolved_by or ""),
            _csv_safe(f.resolution_note or ""),
        ]


@router.get(
    "/reconciliation/findings.csv",
    summary="The daily charge reconciliation's findings, as CSV",
    response_class=Response,
    responses={200: {"content": {"text/csv": {}}, "description": "One line per finding."}},
)
async def charge_findings_csv(
    request: Request,
    deps: Annotated[Dependencies, Depends(get_deps)],
    since: _Since = None,
    severity: Annotated[str | None, Query(pattern="^(info|warning|error)$")] = None,
    status: _FindingStatusQuery = None,
) -> Response:
    _refuse_unknown_params(request, frozenset({"since", "severity", "status"}))
    found, _ = await asyncio.to_thread(_read_findings, deps, since, severity, status, 100_000)
    return _csv(findings_csv_rows(found), "reconciliation-findings.csv")


@admin_router.post(
    "/reconciliation/findings/{id}/resolve",
    summary="Resolve a finding with a note (scope admin)",
    dependencies=[Depends(require_json_body)],
    responses=error_responses(400, 404, 409, 413, 415),
)
async def resolve_charge_finding(
    id: FindingId,
    body: ResolveFindingIn,
    request: Request,
    deps: Annotated[Dependencies, Depends(get_deps)],
) -> ChargeFindingOut:
    """Who (the API key's name), when (now) and why (``note``) are recorded once. The same
    resolution again answers the finding unchanged (200); another one of a resolved finding is
    409, naming who resolved it and when. A later run that finds the same difference again
    keeps this one row, resolved."""
    caller: Caller | None = getattr(request.state, "caller", None)
    by = RESOLVED_BY.check(caller.key_name if caller else "api", field="resolved_by")

    def write() -> ReconciliationFindingRecord:
        with unit_of_work(deps.session_factory) as session:
            finding, _ = ledger_repo.resolve_finding(
                session, id, by=by, note=body.note, at=deps.clock.now()
            )
            return finding

    return ChargeFindingOut.of(await asyncio.to_thread(write))


def csv_text(rows: Iterator[list[str]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


__all__ = [
    "FINDINGS_CSV_COLUMNS",
    "RECONCILIATION_CSV_COLUMNS",
    "csv_rows",
    "csv_text",
    "findings_csv_rows",
    "router",
]
