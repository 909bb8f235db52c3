"""Invoice documents (scope ``finance`` or ``admin``): ``GET /v1/invoices/{id}.pdf`` and
``GET /v1/invoices/{id}.html``, as the customer receives them (billing.documents)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Path
from fastapi.responses import HTMLResponse, Response
from sqlalchemy.orm import Session, sessionmaker

from billing.api.auth import require_scope
from billing.api.dependencies import get_deps, get_settings
from billing.api.schemas import ID_PATTERN, error_responses
from billing.documents import InvoiceDocument, invoice_document, render_invoice_html
from billing.documents import render_invoice_pdf as render_pdf
from billing.errors import NotFound
from billing.settings import Settings
from billing.worker import Dependencies
from db.engine import unit_of_work
from db.repositories import credit_notes as credit_notes_repo
from db.repositories import customers as customers_repo
from db.repositories import invoices as invoices_repo
from db.repositories import payments as payments_repo

router = APIRouter(
    prefix="/v1",
    tags=["invoices"],
    dependencies=[require_scope("finance", "admin")],
    responses=error_responses(401, 403, 404, 422, 503),
)

InvoiceId = Annotated[
    str, Path(min_length=1, max_length=40, pattern=ID_PATTERN, description="Invoice id, 'in_...'.")
]


def load_document(
    session_factory: sessionmaker[Session], settings: Settings, invoice_id: str
) -> InvoiceDocument:
    """The invoice's document; NotFound (404) if there is no such invoice."""
    with unit_of_work(session_factory) as session:
        invoice = invoices_repo.get_invoice(session, invoice_id)
        customer = customers_repo.get_customer(session, invoice.customer_id) if invoice else None
        if invoice is None or customer is None:
            raise NotFound(f"invoice {invoice_id!r} not found", field="id")
        payments = payments_repo.list_payments_for_invoice(session, invoice_id)
        lines = invoices_repo.list_invoice_lines(session, invoice_id)
        notes = credit_notes_repo.list_credit_notes_for_invoice(session, invoice_id)
        refunds = credit_notes_repo.list_refunds(session, credit_note_ids=[n.id for n in notes])
    return invoice_document(
        settings, invoice, customer, payments, lines=lines, credit_notes=notes, refunds=refunds
    )


def pdf_response(document: InvoiceDocument, pdf: bytes) -> Response:
    return Response(
        pdf,
        media_type="application/pdf",
        headers={
            "Content-Disposition": f'inline; filename="invoice-{document.invoice.number}.pdf"'
        },
    )


@router.get(
    "/invoices/{id}.pdf",
    summary="The invoice as a PDF document",
    response_class=Response,
    responses={200: {"content": {"application/pdf": {}}, "description": "The document."}},
)
async def invoice_pdf(
    id: InvoiceId,
    deps: Annotated[Dependencies, Depends(get_deps)],
    settings: Annotated[Settings, Depends(get_settings)],
) -> Response:
    """Seller, customer, number, dates, the invoice's lines (prorations with their periods),
    totals (subtotal, credit applied, amount due), amount paid and the credit notes issued
    against it with their refunds, in the customer's locale and currency format."""

    def build() -> Response:
        document = load_document(deps.session_factory, settings, id)
        return pdf_response(document, render_pdf(document))

    return await asyncio.to_thread(build)


@router.get(
    "/invoices/{id}.html",
    summary="The invoice as an HTML document",
    # Documented as text/html for 200 only: errors keep the API's JSON shape.
    response_class=Response,
    responses={200: {"content": {"text/html": {}}, "description": "The document."}},
)
async def invoice_html(
    id: InvoiceId,
    deps: Annotated[Dependencies, Depends(get_deps)],
    settings: Annotated[Settings, Depends(get_settings)],
) -> Response:
    def build() -> str:
        return render_invoice_html(load_document(deps.session_factory, settings, id))

    return HTMLResponse(await asyncio.to_thread(build))
