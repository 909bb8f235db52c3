"""One invoice as a document (see the package docstring).

Amounts are formatted once, here, from integer minor units with the currency's CLDR exponent
(babel), in the customer's locale: ``1 234,56 €`` for fr_FR, ``€1,234.56`` for en_IE. Dates
are the customer's calendar dates in their time zone.
"""

from __future__ import annotations

from collections.abc import Sequence
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
from billing.credit_notes import RefundStatus
from billing.invoices import InvoiceLineKind
from billing.money import currency_exponent
from billing.records import (
    CreditNoteRecord,
    CustomerRecord,
    InvoiceLineRecord,
    InvoiceRecord,
    PaymentRecord,
    RefundRecord,
)
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
    """One line of the document: what was sold, for which period, and its amount (signed minor
    units of the invoice's currency: a proration credit is negative)."""

    description: str
    period_start: datetime | None
    period_end: datetime | None
    quantity: int
    amount_minor: int
    kind: str = InvoiceLineKind.SUBSCRIPTION.value
    #: Price per unit for the whole period (minor units), when the line has one.
    unit_amount_minor: int | None = None


@dataclass(frozen=True, slots=True)
class DocumentRefund:
    """A refund a credit note sent back to the card (minor units)."""

    amount_minor: int
    status: str
    #: When the provider confirmed it, else when it was recorded (UTC).
    at: datetime


@dataclass(frozen=True, slots=True)
class DocumentCreditNote:
    """A credit note issued against the invoice (minor units): its total and where it went."""

    number: str
    issued_at: datetime
    amount_minor: int
    reason: str | None
    memo: str | None
    refund_amount_minor: int
    credit_amount_minor: int
    out_of_band_amount_minor: int
    #: What it took off the amount due of the open invoice (a pre-payment credit note).
    amount_due_reduction_minor: int
    refunds: tuple[DocumentRefund, ...] = ()


def document_lines(
    invoice: InvoiceRecord,
    lines: Sequence[InvoiceLineRecord] = (),
    credit_notes: Sequence[CreditNoteRecord] = (),
) -> list[DocumentLine]:
    """The invoice's lines as ``invoice_lines`` holds them (subscription line, prorations with
    their own periods). An invoice written without lines (only hand-made rows: the migration
    that added lines gave every invoice its own) shows one line for its period, of what it
    billed before credit: the amount due plus the credit applied and any pre-payment credit
    notes."""
    if lines:
        return [
            DocumentLine(
                description=line.description,
                period_start=line.period_start,
                period_end=line.period_end,
                quantity=line.quantity,
                amount_minor=line.amount_minor,
                kind=InvoiceLineKind(line.kind).value,
                unit_amount_minor=line.unit_amount_minor,
            )
            for line in sorted(lines, key=lambda x: x.position)
        ]
    billed = (
        invoice.amount_due_minor
        + invoice.credit_applied_minor
        + sum(note.amount_due_reduction_minor for note in credit_notes)
    )
    return [
        DocumentLine(
            description=invoice.description or "Subscription",
            period_start=invoice.period_start,
            period_end=invoice.period_end,
            quantity=1,
            amount_minor=billed,
        )
    ]


def document_credit_notes(
    credit_notes: Sequence[CreditNoteRecord], refunds: Sequence[RefundRecord]
) -> list[DocumentCreditNote]:
    """The credit notes oldest first, each with its refunds (a refund the provider failed or
    canceled is shown with that status: no money went back)."""
    by_note: dict[str, list[DocumentRefund]] = {}
    for refund in sorted(refunds, key=lambda r: (r.created_at, r.id)):
        if refund.credit_note_id is not None:
            by_note.setdefault(refund.credit_note_id, []).append(
                DocumentRefund(
                    amount_minor=refund.amount_minor,
                    status=RefundStatus(refund.status).value,
                    at=refund.completed_at or refund.created_at,
                )
            )
    return [
        DocumentCreditNote(
            number=note.number,
            issued_at=note.created_at,
            amount_minor=note.amount_minor,
            reason=str(note.reason) if note.reason is not None else None,
            memo=note.memo,
            refund_amount_minor=note.refund_amount_minor,
            credit_amount_minor=note.credit_amount_minor,
            out_of_band_amount_minor=note.out_of_band_amount_minor,
            amount_due_reduction_minor=note.amount_due_reduction_minor,
            refunds=tuple(by_note.get(note.id, ())),
        )
        for note in sorted(credit_notes, key=lambda n: (n.created_at, n.id))
    ]


@dataclass(frozen=True, slots=True, kw_only=True)
class InvoiceDocument:
    seller: Seller
    invoice: InvoiceRecord
    customer: CustomerRecord
    lines: list[DocumentLine]
    payments: list[PaymentRecord] = field(default_factory=list)
    credit_notes: list[DocumentCreditNote] = field(default_factory=list)
    locale: str = _FALLBACK_LOCALE

    @property
    def subtotal_minor(self) -> int:
        """The sum of the lines (negative when credits outweigh charges)."""
        return sum(line.amount_minor for line in self.lines)

    @property
    def credit_applied_minor(self) -> int:
        """What the customer's credit balance paid at finalization."""
        return self.invoice.credit_applied_minor

    @property
    def credited_to_balance_minor(self) -> int:
        """A negative subtotal goes to the customer's credit balance; the invoice owes 0."""
        return max(0, -self.subtotal_minor)

    @property
    def prepayment_credit_minor(self) -> int:
        """What credit notes took off the amount due before it was paid."""
        return sum(note.amount_due_reduction_minor for note in self.credit_notes)

    @property
    def amount_remaining_minor(self) -> int:
        return self.invoice.amount_due_minor - self.invoice.amount_paid_minor

    @property
    def refunded_minor(self) -> int:
        """Refunds that went back, or are on their way (failed and canceled ones are not)."""
        return sum(
            refund.amount_minor
            for note in self.credit_notes
            for refund in note.refunds
            if refund.status not in (RefundStatus.FAILED.value, RefundStatus.CANCELED.value)
        )


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
    *,
    lines: Sequence[InvoiceLineRecord] = (),
    credit_notes: Sequence[CreditNoteRecord] = (),
    refunds: Sequence[RefundRecord] = (),
) -> InvoiceDocument:
    """The document of ``invoice`` from what the database holds about it: its lines, its
    payments, the credit notes issued against it and their refunds."""
    return InvoiceDocument(
        seller=Seller.from_settings(settings),
        invoice=invoice,
        customer=customer,
        lines=document_lines(invoice, lines, credit_notes),
        payments=payments,
        credit_notes=document_credit_notes(credit_notes, refunds),
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
        "credit_applied": "Credit applied",
        "amount_due": "Amount due",
        "credited_to_balance": "Credited to your balance",
        "prepayment_credit": "Credit notes before payment",
        "credit_notes": "Credit notes",
        "credit_note": "Credit note",
        "date": "Date",
        "reason": "Reason",
        "refund": "Refund",
        "to_balance": "To balance",
        "outside": "Settled outside",
        "refunded": "Refunded",
        "refund_status": "Refund of {amount}: {status}, {day}",
        "proration": "Proration",
        "unit_price": "Unit price",
        "payments": "Payments",
        "paid_on": "Paid",
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
        "credit_applied": "Crédit appliqué",
        "amount_due": "Montant dû",
        "credited_to_balance": "Porté à votre crédit",
        "prepayment_credit": "Avoirs avant paiement",
        "credit_notes": "Avoirs",
        "credit_note": "Avoir",
        "date": "Date",
        "reason": "Motif",
        "refund": "Remboursement",
        "to_balance": "Au crédit",
        "outside": "Réglé hors ligne",
        "refunded": "Remboursé",
        "refund_status": "Remboursement de {amount} : {status}, {day}",
        "proration": "Prorata",
        "unit_price": "Prix unitaire",
        "payments": "Paiements",
        "paid_on": "Payé",
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
        "credit_applied": "Angerechnetes Guthaben",
        "amount_due": "Fälliger Betrag",
        "credited_to_balance": "Ihrem Guthaben gutgeschrieben",
        "prepayment_credit": "Gutschriften vor Zahlung",
        "credit_notes": "Gutschriften",
        "credit_note": "Gutschrift",
        "date": "Datum",
        "reason": "Grund",
        "refund": "Erstattung",
        "to_balance": "Als Guthaben",
        "outside": "Anderweitig beglichen",
        "refunded": "Erstattet",
        "refund_status": "Erstattung über {amount}: {status}, {day}",
        "proration": "Anteilig",
        "unit_price": "Einzelpreis",
        "payments": "Zahlungen",
        "paid_on": "Bezahlt",
    },
}


#: Invoice statuses, credit note reasons and refund statuses in the document's language (the
#: code itself where there is no translation).
_TERMS: dict[str, dict[str, str]] = {
    "en": {
        "duplicate": "duplicate",
        "fraudulent": "fraudulent",
        "order_change": "order change",
        "product_unsatisfactory": "product unsatisfactory",
        "pending": "pending",
        "requires_action": "requires action",
        "succeeded": "succeeded",
        "failed": "failed",
        "canceled": "canceled",
        "draft": "draft",
        "open": "open",
        "paid": "paid",
        "void": "void",
        "uncollectible": "uncollectible",
    },
    "fr": {
        "duplicate": "doublon",
        "fraudulent": "frauduleux",
        "order_change": "modification de commande",
        "product_unsatisfactory": "produit insatisfaisant",
        "pending": "en cours",
        "requires_action": "action requise",
        "succeeded": "effectué",
        "failed": "échoué",
        "canceled": "annulé",
        "draft": "brouillon",
        "open": "à payer",
        "paid": "payée",
        "void": "annulée",
        "uncollectible": "irrécouvrable",
    },
    "de": {
        "duplicate": "Duplikat",
        "fraudulent": "betrügerisch",
        "order_change": "Bestelländerung",
        "product_unsatisfactory": "Produkt unbefriedigend",
        "pending": "ausstehend",
        "requires_action": "Aktion erforderlich",
        "succeeded": "erfolgt",
        "failed": "fehlgeschlagen",
        "canceled": "storniert",
        "draft": "Entwurf",
        "open": "offen",
        "paid": "bezahlt",
        "void": "storniert",
        "uncollectible": "uneinbringlich",
    },
}


def term(code: str | None, locale: str) -> str:
    """A reason or status code in the locale's language ("" for None)."""
    if code is None:
        return ""
    return _TERMS.get(locale.split("_")[0].lower(), _TERMS["en"]).get(code, code)


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
            term=lambda code: term(code, locale),
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
