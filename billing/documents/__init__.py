"""Invoice documents: the invoice as the customer receives it, as HTML and as PDF (WeasyPrint),
in the customer's locale and currency format. ``invoice_document`` gathers what the page shows;
``render_invoice_html`` and ``render_invoice_pdf`` draw it."""

from __future__ import annotations

from billing.documents.invoice import (
    DocumentCreditNote,
    DocumentLine,
    DocumentRefund,
    InvoiceDocument,
    Seller,
    document_credit_notes,
    document_lines,
    invoice_document,
    render_invoice_html,
    render_invoice_pdf,
)

__all__ = [
    "DocumentCreditNote",
    "DocumentLine",
    "DocumentRefund",
    "InvoiceDocument",
    "Seller",
    "document_credit_notes",
    "document_lines",
    "invoice_document",
    "render_invoice_html",
    "render_invoice_pdf",
]
