"""Credit notes: issue one on an invoice (scope ``admin``), preview it, list and read them and
their refunds (``finance`` or ``admin``), and the finance CSV.

Issuing answers once the credit note is accepted: it, its lines, its credit to the customer's
balance and its refund (``pending``) are written in one transaction under the customer's lock,
then the refund's workflow (``refund-{id}``) is started. The refund itself runs there, never in
the request; its state shows in the answer and in later reads. A start Temporal does not
confirm is not an error: the refund sweep starts it within minutes.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import logging
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, StrictInt

from activities import event_log
from activities.settlement import signal_invoice_credited, start_refund_workflow
from billing.api.auth import Caller, require_scope
from billing.api.dependencies import get_deps, get_settings, require_json_body
from billing.api.errors import ApiError
from billing.api.schemas import (
    ID_PATTERN,
    CreditNoteLineOut,
    CreditNoteOut,
    ReasonIn,
    RequestIn,
    error_responses,
)
from billing.credit_notes import (
    MAX_CREDIT_NOTE_LINES,
    CreditNoteReason,
    CreditNoteRequest,
    LineRequest,
    RefundStatus,
)
from billing.errors import NotFound
from billing.finance import InvoiceCursor, format_instant
from billing.records import RefundRecord
from billing.settings import Settings
from billing.text import IDEMPOTENCY_KEY
from billing.worker import Dependencies
from db.engine import unit_of_work
from db.repositories import credit_notes as credit_notes_repo

logger = logging.getLogger("billing.api")

router = APIRouter(prefix="/v1", tags=["credit notes"])

#: Largest amount a request may name (minor units): far above any invoice, well inside BIGINT.
MAX_AMOUNT_MINOR = 10**15
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200

InvoiceId = Annotated[
    str, Path(min_length=1, max_length=40, pattern=ID_PATTERN, description="Invoice id, 'in_...'.")
]
Amount = Annotated[StrictInt, Field(ge=1, le=MAX_AMOUNT_MINOR)]
Part = Annotated[StrictInt, Field(ge=0, le=MAX_AMOUNT_MINOR)]


class CreditNoteLineIn(RequestIn):
    invoice_line_id: str = Field(
        min_length=1, max_length=48, pattern=ID_PATTERN.replace("{1,40}", "{1,48}")
    )
    amount_minor: Amount | None = Field(
        None, description="Minor units to credit on the line; default: all that is left of it."
    )


class CreditNoteIn(RequestIn):
    """Stripe's credit note: ``amount_minor`` (the invoice as a whole) or ``lines``; on a paid
    invoice, the split into ``refund_amount_minor`` (to the card), ``credit_amount_minor`` (to
    the customer's balance) and ``out_of_band_amount_minor`` (settled outside), which must add
    up to the total. Nothing but the split: the credit note is its sum. Nothing at all: the
    rest of the invoice, to the customer's balance."""

    reason: CreditNoteReason | None = None
    amount_minor: Amount | None = None
    lines: list[CreditNoteLineIn] | None = Field(
        None, min_length=1, max_length=MAX_CREDIT_NOTE_LINES
    )
    refund_amount_minor: Part | None = None
    credit_amount_minor: Part | None = None
    out_of_band_amount_minor: Part | None = None
    memo: ReasonIn | None = None

    def request(self) -> CreditNoteRequest:
        return CreditNoteRequest(
            reason=self.reason,
            amount_minor=self.amount_minor,
            lines=tuple(
                LineRequest(line.invoice_line_id, line.amount_minor) for line in self.lines or ()
            ),
            refund_amount_minor=self.refund_amount_minor,
            credit_amount_minor=self.credit_amount_minor,
            out_of_band_amount_minor=self.out_of_band_amount_minor,
            memo=self.memo,
        )


class CreditNotePreviewOut(BaseModel):
    invoice_id: str
    invoice_number: str
    currency: str
    amount_minor: int
    refund_amount_minor: int
    credit_amount_minor: int
    out_of_band_amount_minor: int
    amount_due_reduction_minor: int
    lines: list[CreditNoteLineOut]


class CreditNoteListOut(BaseModel):
    data: list[CreditNoteOut]
    next_cursor: str | None = Field(None, description="Pass as cursor for the next page.")


def _request_hash(invoice_id: str, body: CreditNoteIn) -> str:
    canonical = json.dumps(
        {"invoice_id": invoice_id, **body.model_dump(mode="json")},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _temporal(request: Request) -> Any:
    return getattr(request.app.state, "temporal", None)


@router.post(
    "/invoices/{id}/credit-notes",
    status_code=201,
    summary="Issue a credit note (refund, credit to the balance, or settled outside)",
    dependencies=[require_scope("admin"), Depends(require_json_body)],
    responses={
        200: {"model": CreditNoteOut, "description": "Replayed: same Idempotency-Key and body."},
        **error_responses(400, 401, 403, 404, 409, 413, 415, 422, 503),
    },
)
async def issue_credit_note(
    id: InvoiceId,
    body: CreditNoteIn,
    request: Request,
    response: Response,
    deps: Annotated[Dependencies, Depends(get_deps)],
    settings: Annotated[Settings, Depends(get_settings)],
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=200,
            description="Retry-safe: the same key and body answer the same credit note.",
        ),
    ] = None,
) -> CreditNoteOut:
    """Caps: every credit note of an invoice together at most its total (each line at most
    its amount); refunds at most what was captured minus what was refunded (here or
    elsewhere) minus what is disputed. Over a cap: 422 naming the field, nothing written.
    An open invoice's credit note lowers its amount due (409 while a charge is in flight);
    one that brings it to 0 pays the invoice, and its dunning stops."""
    IDEMPOTENCY_KEY.check_optional(idempotency_key, field="Idempotency-Key")
    caller: Caller | None = getattr(request.state, "caller", None)
    request_hash = _request_hash(id, body)

    def write() -> credit_notes_repo.IssuedCreditNote:
        with unit_of_work(deps.session_factory) as session:
            at = deps.clock.now()
            issued = credit_notes_repo.issue_credit_note(
                session,
                id,
                body.request(),
                at=at,
                idempotency_key=idempotency_key,
                key_scope=caller.key_id if caller else "",
                request_hash=request_hash,
                created_by=caller.key_name if caller else None,
                allow_open_invoices=True,
            )
            # Its events in its transaction (a replay found it issued: none again).
            if issued.created:
                event_log.credit_note_issued(
                    session, issued.credit_note, issued.lines, issued.refunds, issued.invoice, at
                )
            return issued

    issued = await asyncio.to_thread(write)
    temporal = _temporal(request)
    await _tell_subscription(temporal, issued)
    for refund in issued.refunds:
        if refund.status.final or temporal is None:
            continue
        try:
            await start_refund_workflow(
                temporal,
                refund.id,
                task_queue=settings.task_queue,
                payments_task_queue=settings.payments_queue(),
            )
        except Exception as error:  # the sweep starts it; the credit note stands
            logger.warning(
                "credit note %s: refund %s recorded pending, its workflow start was not "
                "confirmed (%s); the refund sweep starts it",
                issued.credit_note.number,
                refund.id,
                error,
            )
    if not issued.created:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    else:
        logger.info(
            "credit note %s on invoice %s issued by %r: %d %s (refund %d, credit %d, outside %d)",
            issued.credit_note.number,
            id,
            caller.key_name if caller else None,
            issued.credit_note.amount_minor,
            issued.credit_note.currency,
            issued.credit_note.refund_amount_minor,
            issued.credit_note.credit_amount_minor,
            issued.credit_note.out_of_band_amount_minor,
        )
    return CreditNoteOut.of(issued.credit_note, issued.lines, issued.refunds)


async def _tell_subscription(temporal: Any, issued: credit_notes_repo.IssuedCreditNote) -> None:
    """A pre-payment credit note (a replay too: it re-sends a signal that may have been lost)
    tells the invoice's subscription workflow its new amount due; 0 stops dunning now. A
    signal Temporal does not confirm is not an error: the next charge attempt reads the
    invoice (lower amount, or paid) under the customer's lock."""
    note, invoice = issued.credit_note, issued.invoice
    if note.type != "pre_payment" or invoice is None or temporal is None:
        return
    try:
        await signal_invoice_credited(temporal, invoice, note.id)
    except Exception as error:
        logger.warning(
            "credit note %s: invoice %s is due %d, and its subscription %s was not told (%s); "
            "its next charge attempt reads it",
            note.number,
            invoice.id,
            invoice.amount_due_minor,
            invoice.subscription_id,
            error,
        )


@router.post(
    "/invoices/{id}/credit-notes/preview",
    summary="Preview a credit note (writes nothing)",
    dependencies=[require_scope("finance", "admin"), Depends(require_json_body)],
    responses=error_responses(400, 401, 403, 404, 409, 413, 415, 422, 503),
)
async def preview_credit_note(
    id: InvoiceId,
    body: CreditNoteIn,
    deps: Annotated[Dependencies, Depends(get_deps)],
) -> CreditNotePreviewOut:
    """What ``POST /v1/invoices/{id}/credit-notes`` would issue now, with the same checks."""

    def read() -> CreditNotePreviewOut:
        with unit_of_work(deps.session_factory) as session:
            invoice, plan = credit_notes_repo.preview_credit_note(session, id, body.request())
        return CreditNotePreviewOut(
            invoice_id=invoice.id,
            invoice_number=invoice.number,
            currency=invoice.currency,
            amount_minor=plan.amount_minor,
            refund_amount_minor=plan.refund_amount_minor,
            credit_amount_minor=plan.credit_amount_minor,
            out_of_band_amount_minor=plan.out_of_band_amount_minor,
            amount_due_reduction_minor=plan.amount_due_reduction_minor,
            lines=[
                CreditNoteLineOut(
                    position=position,
                    invoice_line_id=line.invoice_line_id,
                    description=line.description,
                    amount_minor=line.amount_minor,
                )
                for position, line in enumerate(plan.lines, start=1)
            ],
        )

    return await asyncio.to_thread(read)


_LIST_PARAMS = frozenset({"invoice_id", "customer_id", "limit", "cursor"})


def _refuse_unknown_params(request: Request, allowed: frozenset[str]) -> None:
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        raise ApiError(
            422,
            "invalid_input",
            f"unknown query parameter {unknown[0]!r}; known: {', '.join(sorted(allowed))}",
            field=unknown[0],
        )
    for name in sorted(allowed):
        given = len(request.query_params.getlist(name))
        if given > 1:
            raise ApiError(
                422,
                "invalid_input",
                f"query parameter {name!r} was given {given} times; give it once",
                field=name,
            )


def _page(
    deps: Dependencies,
    *,
    invoice_id: str | None,
    customer_id: str | None,
    limit: int,
    after: tuple[datetime, str] | None,
) -> list[CreditNoteOut]:
    with unit_of_work(deps.session_factory) as session:
        notes = credit_notes_repo.list_credit_notes(
            session, invoice_id=invoice_id, customer_id=customer_id, limit=limit, after=after
        )
        refunds = credit_notes_repo.list_refunds(session, credit_note_ids=[n.id for n in notes])
        lines = {n.id: credit_notes_repo.list_credit_note_lines(session, n.id) for n in notes}
    by_note: dict[str, list[RefundRecord]] = {}
    for refund in refunds:
        by_note.setdefault(refund.credit_note_id or "", []).append(refund)
    return [CreditNoteOut.of(n, lines[n.id], by_note.get(n.id, [])) for n in notes]


_FilterId = Annotated[str | None, Query(max_length=40, pattern=ID_PATTERN)]


@router.get(
    "/credit-notes",
    summary="List credit notes",
    dependencies=[require_scope("finance", "admin")],
    responses=error_responses(401, 403, 422, 503),
)
async def list_credit_notes(
    request: Request,
    deps: Annotated[Dependencies, Depends(get_deps)],
    invoice_id: _FilterId = None,
    customer_id: _FilterId = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = DEFAULT_PAGE_SIZE,
    cursor: Annotated[
        str | None, Query(max_length=512, description="next_cursor of the previous page.")
    ] = None,
) -> CreditNoteListOut:
    """Credit notes oldest first, each with its lines and refunds (and their state)."""
    _refuse_unknown_params(request, _LIST_PARAMS)
    after = None
    if cursor is not None:
        decoded = InvoiceCursor.decode(cursor)  # the same opaque (created_at, id) cursor
        after = (decoded.created_at, decoded.invoice_id)
    data = await asyncio.to_thread(
        _page, deps, invoice_id=invoice_id, customer_id=customer_id, limit=limit, after=after
    )
    next_cursor = (
        InvoiceCursor(data[-1].created_at, data[-1].id).encode() if len(data) == limit else None
    )
    return CreditNoteListOut(data=data, next_cursor=next_cursor)


#: The finance CSV: one line per credit note. Amounts are minor units next to a currency.
CREDIT_NOTE_CSV_COLUMNS = (
    "credit_note_id",
    "number",
    "invoice_id",
    "customer_id",
    "type",
    "reason",
    "currency",
    "amount_minor",
    "refund_amount_minor",
    "credit_amount_minor",
    "out_of_band_amount_minor",
    "amount_due_reduction_minor",
    "refund_status",
    "refunded_minor",
    "stripe_refund_ids",
    "created_at",
    "created_by",
    "memo",
)


def credit_note_csv_row(note: CreditNoteOut) -> list[str]:
    succeeded = [r for r in note.refunds if r.status == RefundStatus.SUCCEEDED]
    statuses = sorted({r.status.value for r in note.refunds})
    return [
        note.id,
        note.number,
        note.invoice_id,
        note.customer_id,
        note.type,
        note.reason.value if note.reason else "",
        note.currency,
        str(note.amount_minor),
        str(note.refund_amount_minor),
        str(note.credit_amount_minor),
        str(note.out_of_band_amount_minor),
        str(note.amount_due_reduction_minor),
        "/".join(statuses),
        str(sum(r.amount_minor for r in succeeded)),
        " ".join(r.stripe_refund_id for r in note.refunds if r.stripe_refund_id),
        format_instant(note.created_at),
        note.created_by or "",
        # A formula-looking memo must not run in a spreadsheet.
        _csv_safe(note.memo or ""),
    ]


def _csv_safe(text: str) -> str:
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


@router.get(
    "/credit-notes.csv",
    summary="Export credit notes as CSV",
    response_class=StreamingResponse,
    dependencies=[require_scope("finance", "admin")],
    responses={
        200: {"content": {"text/csv": {}}, "description": "One line per credit note."},
        **error_responses(401, 403, 422, 503),
    },
)
async def export_credit_notes(
    request: Request,
    deps: Annotated[Dependencies, Depends(get_deps)],
    invoice_id: _FilterId = None,
    customer_id: _FilterId = None,
) -> StreamingResponse:
    """Every credit note ``GET /v1/credit-notes`` lists for the same filters, streamed."""
    _refuse_unknown_params(request, frozenset({"invoice_id", "customer_id"}))
    first = await asyncio.to_thread(
        _page, deps, invoice_id=invoice_id, customer_id=customer_id, limit=MAX_PAGE_SIZE, after=None
    )

    async def lines() -> AsyncIterator[str]:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\r\n")
        writer.writerow(CREDIT_NOTE_CSV_COLUMNS)
        page = first
        while True:
            writer.writerows(credit_note_csv_row(note) for note in page)
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
            if len(page) < MAX_PAGE_SIZE:
                return
            after = (page[-1].created_at, page[-1].id)
            page = await asyncio.to_thread(
                _page,
                deps,
                invoice_id=invoice_id,
                customer_id=customer_id,
                limit=MAX_PAGE_SIZE,
                after=after,
            )

    return StreamingResponse(
        lines(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="credit-notes.csv"'},
    )


@router.get(
    "/credit-notes/{id}",
    summary="One credit note with its lines and refunds",
    dependencies=[require_scope("finance", "admin")],
    responses=error_responses(401, 403, 404, 422, 503),
)
async def get_credit_note(
    id: Annotated[
        str,
        Path(
            min_length=1, max_length=40, pattern=ID_PATTERN, description="Credit note id, 'cn_...'."
        ),
    ],
    deps: Annotated[Dependencies, Depends(get_deps)],
) -> CreditNoteOut:
    def read() -> CreditNoteOut:
        with unit_of_work(deps.session_factory) as session:
            note = credit_notes_repo.get_credit_note(session, id)
            if note is None:
                raise NotFound(f"credit note {id!r} not found", field="id")
            return CreditNoteOut.of(
                note,
                credit_notes_repo.list_credit_note_lines(session, id),
                credit_notes_repo.list_refunds(session, credit_note_ids=[id]),
            )

    return await asyncio.to_thread(read)
