"""Finance reads, independent of HTTP and SQL: the invoice filter, the keyset cursor, a page of
invoices, and the CSV export's columns. The API (``billing/api``) and the CLI both build an
``InvoiceFilter`` here and hand it to ``db.repositories.finance``.

Amounts are integer minor units plus an ISO 4217 currency; instants are aware UTC datetimes
and are written as ISO 8601 with ``Z``. Ranges are half-open: ``from`` inclusive, ``to``
exclusive.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from billing.errors import InvalidInput
from billing.invoices import InvoiceStatus
from billing.money import Money, normalize_currency
from billing.records import (
    InvoiceLineRecord,
    InvoiceRecord,
    PaymentAttemptRecord,
    PaymentRecord,
)
from billing.text import text_problem

#: Page size bounds for invoice listings.
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
#: Rows per database round trip when exporting (each page is its own short transaction).
EXPORT_PAGE_SIZE = 500

_MAX_ID_LENGTH = 40


def format_instant(instant: datetime | None) -> str:
    """ISO 8601 in UTC with a ``Z`` suffix (``2025-01-31T09:00:00Z``); empty for None."""
    if instant is None:
        return ""
    return instant.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_instant(value: str | datetime | None, *, field: str) -> datetime | None:
    """An aware instant from ISO 8601 text (or a datetime), converted to UTC.

    A value without a zone is refused: ``2025-01-31T00:00:00`` could be any of 24 instants.
    """
    if value is None:
        return None
    if isinstance(value, datetime):
        parsed = value
    else:
        text = value.strip()
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise InvalidInput(
                f"{field} must be an ISO 8601 instant with a time zone such as "
                f"'2025-01-31T00:00:00Z'; got {value!r}",
                field=field,
            ) from None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise InvalidInput(
            f"{field} {value!r} has no time zone; add one, e.g. 'Z' or '+02:00' "
            "('2025-01-31T00:00:00Z')",
            field=field,
        )
    try:
        return parsed.astimezone(UTC)
    except OverflowError:
        # 0001-01-01T01:00:00+02:00 is in year 0 in UTC, which no datetime can hold.
        raise InvalidInput(
            f"{field} {value!r} is out of range; use an instant between years 1 and 9999 UTC",
            field=field,
        ) from None


def parse_invoice_status(value: str, *, field: str = "status") -> InvoiceStatus:
    try:
        return InvoiceStatus(value.strip().lower())
    except ValueError:
        known = ", ".join(s.value for s in InvoiceStatus)
        raise InvalidInput(
            f"unknown invoice status {value!r}; known statuses: {known}", field=field
        ) from None


def check_page_size(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidInput(
            f"limit must be a whole number between 1 and {MAX_PAGE_SIZE}; got {limit!r}",
            field="limit",
        )
    return limit


def _check_id(value: str | None, field: str) -> str | None:
    if value is None:
        return None
    if not value or len(value) > _MAX_ID_LENGTH or not value.isprintable():
        # billing.text says what is wrong (a NUL, a lone surrogate, ...), when it is one.
        problem = text_problem(value, max_length=_MAX_ID_LENGTH)
        raise InvalidInput(
            f"{field} must be an id of 1 to {_MAX_ID_LENGTH} characters"
            + (f" ({field} {problem})" if problem else "")
            + f"; got {value!r}",
            field=field,
        )
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class InvoiceFilter:
    """Which invoices to list. Every condition given must hold; an empty filter lists all.

    ``issued_*`` bound the invoice's ``created_at``; ``period_*`` bound its ``period_start``.
    Both ranges are half-open, UTC: ``from <= value < to``.
    """

    statuses: tuple[InvoiceStatus, ...] = ()
    customer_id: str | None = None
    subscription_id: str | None = None
    currency: str | None = None
    issued_from: datetime | None = None
    issued_to: datetime | None = None
    period_from: datetime | None = None
    period_to: datetime | None = None

    def __post_init__(self) -> None:
        statuses = tuple(
            s if isinstance(s, InvoiceStatus) else parse_invoice_status(s) for s in self.statuses
        )
        object.__setattr__(self, "statuses", tuple(dict.fromkeys(statuses)))
        _check_id(self.customer_id, "customer_id")
        _check_id(self.subscription_id, "subscription_id")
        if self.currency is not None:
            object.__setattr__(self, "currency", normalize_currency(self.currency))
        for name in ("issued_from", "issued_to", "period_from", "period_to"):
            object.__setattr__(self, name, parse_instant(getattr(self, name), field=name))
        for low, high in (("issued_from", "issued_to"), ("period_from", "period_to")):
            start, end = getattr(self, low), getattr(self, high)
            if start is not None and end is not None and start > end:
                raise InvalidInput(
                    f"{low} ({format_instant(start)}) is after {high} ({format_instant(end)}); "
                    f"{low} must not be later than {high}",
                    field=low,
                )

    @classmethod
    def parse(
        cls,
        *,
        statuses: Iterable[str] = (),
        customer_id: str | None = None,
        subscription_id: str | None = None,
        currency: str | None = None,
        issued_from: str | datetime | None = None,
        issued_to: str | datetime | None = None,
        period_from: str | datetime | None = None,
        period_to: str | datetime | None = None,
    ) -> InvoiceFilter:
        """A filter from user input (query string, CLI options). ``statuses`` may repeat and
        each may hold a comma-separated list (``paid,open``). Raises InvalidInput (or
        InvalidCurrency) naming the bad field and saying what is accepted."""
        parsed = tuple(
            parse_invoice_status(part)
            for value in statuses
            for part in value.split(",")
            if part.strip()
        )
        return cls(
            statuses=parsed,
            customer_id=customer_id or None,
            subscription_id=subscription_id or None,
            currency=currency or None,
            issued_from=parse_instant(issued_from or None, field="issued_from"),
            issued_to=parse_instant(issued_to or None, field="issued_to"),
            period_from=parse_instant(period_from or None, field="period_from"),
            period_to=parse_instant(period_to or None, field="period_to"),
        )


@dataclass(frozen=True, slots=True)
class InvoiceCursor:
    """A position in the (created_at, id) order: the last invoice of the previous page.

    On the wire it is opaque: base64url (no padding) of ``["<created_at ISO>", "<id>"]``.
    """

    created_at: datetime
    invoice_id: str

    def encode(self) -> str:
        raw = json.dumps([format_instant(self.created_at), self.invoice_id], separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> InvoiceCursor:
        """The cursor from ``encode``; InvalidInput (field ``cursor``) if it is not one."""
        problem = (
            f"cursor {text[:60]!r} is not valid; pass the next_cursor of the previous page "
            "unchanged, or leave it out to start from the first invoice"
        )
        if not text or len(text) > 512:
            raise InvalidInput(problem, field="cursor")
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            created_text, invoice_id = json.loads(raw)
            if not isinstance(created_text, str) or not isinstance(invoice_id, str):
                raise ValueError("cursor parts must be strings")
            created_at = parse_instant(created_text, field="cursor")
        except (binascii.Error, ValueError, TypeError, InvalidInput):
            # ValueError covers bad JSON, bad UTF-8 and a wrong number of parts.
            raise InvalidInput(problem, field="cursor") from None
        if (
            created_at is None
            or not invoice_id
            or text_problem(invoice_id, max_length=_MAX_ID_LENGTH) is not None
        ):
            # The id reaches a query: nothing the database would refuse (a NUL) may.
            raise InvalidInput(problem, field="cursor")
        return cls(created_at, invoice_id)

    @classmethod
    def after(cls, invoice: InvoiceRecord) -> InvoiceCursor:
        return cls(invoice.created_at, invoice.id)


@dataclass(frozen=True, slots=True)
class InvoiceListItem:
    """One invoice of a listing with its settlement, if it has one (at most one per invoice)."""

    invoice: InvoiceRecord
    payment: PaymentRecord | None = None
    #: Its lines in order (the subscription line, prorations); filled by API listings.
    lines: list[InvoiceLineRecord] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class InvoicePage:
    """One page in (created_at, id) order. ``next_cursor`` is set exactly when ``has_more``."""

    items: list[InvoiceListItem]
    has_more: bool
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class InvoiceDetail:
    """An invoice with every charge attempt (by number) and its settlement."""

    invoice: InvoiceRecord
    attempts: list[PaymentAttemptRecord] = field(default_factory=list)
    payments: list[PaymentRecord] = field(default_factory=list)
    lines: list[InvoiceLineRecord] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class SubscriptionInvoicing:
    """What the database says about a subscription's invoices (used when its workflow cannot
    be asked): how many were issued, and the open one being collected, if any."""

    invoices_issued: int
    open_invoice: InvoiceRecord | None = None
    #: Charge attempts made on ``open_invoice`` so far (its dunning attempt count).
    open_invoice_attempts: int = 0


def amount_display(amount_minor: int | None, currency: str | None) -> str | None:
    """'USD 9.00', 'JPY 1200'. For people only; machines use the minor units."""
    if amount_minor is None or currency is None:
        return None
    return Money(amount_minor, currency).format()


# ---- CSV export ------------------------------------------------------------------------------

#: The export's columns, in order. Amounts are minor units; their currency is in the row.
INVOICE_CSV_COLUMNS: tuple[str, ...] = (
    "invoice_id",
    "number",
    "status",
    "customer_id",
    "subscription_id",
    "currency",
    "amount_due_minor",
    "amount_paid_minor",
    "period_start",
    "period_end",
    "created_at",
    "finalized_at",
    "paid_at",
    "voided_at",
    "marked_uncollectible_at",
    "status_reason",
    "description",
    "payment_id",
    "stripe_payment_intent_id",
    "stripe_charge_id",
    "fee_minor",
    "net_minor",
    "settlement_amount_minor",
    "settlement_currency",
    "settled_at",
)

# Spreadsheet programs run a cell that starts with one of these as a formula.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _text(value: str | None) -> str:
    """Free text for a CSV cell, neutralised so a spreadsheet never evaluates it."""
    if not value:
        return ""
    return "'" + value if value.startswith(_FORMULA_START) else value


def _number(value: int | None) -> str:
    return "" if value is None else str(value)


#: The lines export's columns (``GET /v1/invoice-lines.csv``, ``billing invoices list --csv
#: --lines``): one row per invoice line, with its invoice's identity, so finance can sum any
#: column by invoice, kind or plan. ``amount_minor`` is signed (a credit is negative); the
#: lines of an invoice add up to its ``subtotal_minor``; ``unit_amount_minor`` is the price of
#: one seat for a whole period of the terms the line bills (a proration bills part of it).
INVOICE_LINE_CSV_COLUMNS: tuple[str, ...] = (
    "invoice_id",
    "invoice_number",
    "invoice_status",
    "customer_id",
    "subscription_id",
    "line_id",
    "position",
    "kind",
    "description",
    "plan_code",
    "period_start",
    "period_end",
    "quantity",
    "unit_amount_minor",
    "amount_minor",
    "currency",
    "change_id",
    "invoice_subtotal_minor",
    "invoice_credit_applied_minor",
    "invoice_amount_due_minor",
)


def invoice_line_csv_rows(item: InvoiceListItem) -> list[list[str]]:
    """The cells of each of the invoice's lines, in ``INVOICE_LINE_CSV_COLUMNS`` order."""
    i = item.invoice
    return [
        [
            i.id,
            i.number,
            i.status.value,
            i.customer_id,
            i.subscription_id,
            line.id,
            str(line.position),
            line.kind.value,
            _text(line.description),
            _text(line.plan_code),
            format_instant(line.period_start),
            format_instant(line.period_end),
            str(line.quantity),
            _number(line.unit_amount_minor),
            str(line.amount_minor),
            line.currency,
            _text(line.change_id),
            str(i.subtotal_minor),
            str(i.credit_applied_minor),
            str(i.amount_due_minor),
        ]
        for line in item.lines
    ]


def invoice_csv_row(item: InvoiceListItem) -> list[str]:
    """The cells of one invoice, in ``INVOICE_CSV_COLUMNS`` order."""
    i, p = item.invoice, item.payment
    return [
        i.id,
        i.number,
        i.status.value,
        i.customer_id,
        i.subscription_id,
        i.currency,
        str(i.amount_due_minor),
        str(i.amount_paid_minor),
        format_instant(i.period_start),
        format_instant(i.period_end),
        format_instant(i.created_at),
        format_instant(i.finalized_at),
        format_instant(i.paid_at),
        format_instant(i.voided_at),
        format_instant(i.marked_uncollectible_at),
        _text(i.status_reason),
        _text(i.description),
        p.id if p else "",
        p.stripe_payment_intent_id if p else "",
        (p.stripe_charge_id or "") if p else "",
        _number(p.fee_minor if p else None),
        _number(p.net_minor if p else None),
        _number(p.settlement_amount_minor if p else None),
        (p.settlement_currency or "") if p else "",
        format_instant(p.settled_at if p else None),
    ]
