"""One invoice as a document (see the package docstring).

Amounts are formatted once, here, from integer minor units with the currency's CLDR exponent
(babel), in the customer's locale: ``1 234,56 €`` for fr_FR, ``€1,234.56`` for en_IE. Dates
are the customer's calendar dates in their time zone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from functools import cache
from zoneinfo import ZoneInfo

from babel import Locale, UnknownLocaleError
from babel.dates import format_date
from babel.numbers import format_currency
from jinja2 import Environment, PackageLoader, select_autoescape

from billing.calendar import resolve_timezone
from billing.money import currency_exponent
from billing.records import CustomerRecord, InvoiceRecord, PaymentRecord
from billing.settings import Settings

_FALLBACK_LOCALE = "en_GB"


@dataclass(frozen=True, slots=True)
class Seller:
    name: str
    address_lines: tuple[str, ...]
    tax_id: str | None = None
    email: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Seller:
        lines = tuple(line.strip() for line in settings.seller_address.splitlines() if line.strip())
        return cls(settings.seller_name, lines, settings.seller_tax_id, settings.seller_email)


@dataclass(frozen=True, slots=True)
class DocumentLine:
    """One line of the document: what was sold, for which period, and its amount (minor
    units of the invoice's currency)."""

    description: str
    period_start: datetime | None
    period_end: datetime | None
    quantity: int
    amount_minor: int


def document_lines(invoice: InvoiceRecord) -> list[DocumentLine]:
    """The invoice's lines. Today an invoice bills one subscription period, so it has one line:
    its description and amount due. When invoices carry their own lines (``invoice_lines``),
    this is the one place to read them instead."""
    return [
        DocumentLine(
            description=invoice.description or "Subscription",
            period_start=invoice.period_start,
            period_end=invoice.period_end,
            quantity=1,
            amount_minor=invoice.amount_due_minor,
        )
    ]


@dataclass(frozen=True, slots=True, kw_only=True)
class InvoiceDocument:
    seller: Seller
    invoice: InvoiceRecord
    customer: CustomerRecord
    lines: list[DocumentLine]
    payments: list[PaymentRecord] = field(default_factory=list)
    locale: str = _FALLBACK_LOCALE

    @property
    def subtotal_minor(self) -> int:
        return sum(line.amount_minor for line in self.lines)

    @property
    def amount_remaining_minor(self) -> int:
        return self.invoice.amount_due_minor - self.invoice.amount_paid_minor


def document_locale(customer: CustomerRecord, default: str) -> str:
    """The customer's locale if CLDR knows it, else ``default``, else en_GB."""
    for candidate in (customer.locale, default, _FALLBACK_LOCALE):
        if candidate:
            try:
                Locale.parse(candidate.replace("-", "_"))
            except (UnknownLocaleError, ValueError):
                continue
            return candidate.replace("-", "_")
    return _FALLBACK_LOCALE


def invoice_document(
    settings: Settings,
    invoice: InvoiceRecord,
    customer: CustomerRecord,
    payments: list[PaymentRecord],
) -> InvoiceDocument:
    return InvoiceDocument(
        seller=Seller.from_settings(settings),
        invoice=invoice,
        customer=customer,
        lines=document_lines(invoice),
        payments=payments,
        locale=document_locale(customer, settings.invoice_locale),
    )


def money(amount_minor: int, currency: str, locale: str) -> str:
    """``amount_minor`` shown in ``locale`` (the currency's own number of decimals)."""
    exponent = currency_exponent(currency)
    value = Decimal(amount_minor).scaleb(-exponent)
    return str(format_currency(value, currency, locale=locale, currency_digits=True))


def _zone(name: str) -> ZoneInfo:
    return resolve_timezone(name)


def local_date(instant: datetime | None, timezone: str, locale: str) -> str:
    if instant is None:
        return ""
    return str(format_date(instant.astimezone(_zone(timezone)).date(), "long", locale=locale))


@cache
def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("billing.documents", "templates"),
        autoescape=select_autoescape(default=True),
    )
    return env


_LABELS: dict[str, dict[str, str]] = {
    "en": {
        "invoice": "Invoice",
        "number": "Invoice number",
        "issued": "Date of issue",
        "due": "Date due",
        "period": "Period",
        "bill_to": "Bill to",
        "description": "Description",
        "qty": "Qty",
        "amount": "Amount",
        "subtotal": "Subtotal",
        "total": "Total",
        "paid": "Amount paid",
        "remaining": "Amount remaining",
        "status": "Status",
        "tax_id": "Tax ID",
    },
    "fr": {
        "invoice": "Facture",
        "number": "Numéro de facture",
        "issued": "Date d'émission",
        "due": "Date d'échéance",
        "period": "Période",
        "bill_to": "Facturé à",
        "description": "Description",
        "qty": "Qté",
        "amount": "Montant",
        "subtotal": "Sous-total",
        "total": "Total",
        "paid": "Montant payé",
        "remaining": "Reste à payer",
        "status": "Statut",
        "tax_id": "N° TVA",
    },
    "de": {
        "invoice": "Rechnung",
        "number": "Rechnungsnummer",
        "issued": "Rechnungsdatum",
        "due": "Fälligkeitsdatum",
        "period": "Zeitraum",
        "bill_to": "Rechnung an",
        "description": "Beschreibung",
        "qty": "Menge",
        "amount": "Betrag",
        "subtotal": "Zwischensumme",
        "total": "Gesamt",
        "paid": "Bezahlt",
        "remaining": "Offener Betrag",
        "status": "Status",
        "tax_id": "USt-IdNr.",
    },
}


def labels(locale: str) -> dict[str, str]:
    """The document's words in the locale's language (English where we have no translation)."""
    return _LABELS.get(locale.split("_")[0].lower(), _LABELS["en"])


def render_invoice_html(document: InvoiceDocument) -> str:
    locale = document.locale
    invoice, customer = document.invoice, document.customer
    currency = invoice.currency

    def fmt(amount_minor: int) -> str:
        return money(amount_minor, currency, locale)

    def day(instant: datetime | None) -> str:
        return local_date(instant, customer.timezone, locale)

    return (
        _environment()
        .get_template("invoice.html")
        .render(
            doc=document,
            invoice=invoice,
            customer=customer,
            seller=document.seller,
            words=labels(locale),
            fmt=fmt,
            day=day,
            lang=locale.split("_")[0],
        )
    )


def render_invoice_pdf(document: InvoiceDocument) -> bytes:
    """The HTML document as PDF (A4). Everything it needs is inline: nothing is fetched."""
    from weasyprint import HTML

    def no_fetch(url: str) -> dict[str, object]:
        raise ValueError(f"invoice documents fetch nothing; refused {url[:80]!r}")

    pdf = HTML(string=render_invoice_html(document), url_fetcher=no_fetch).write_pdf()
    assert pdf is not None
    return bytes(pdf)
