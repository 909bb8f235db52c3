"""billing.finance, which the API and the CLI share: filter parsing, the opaque keyset cursor
and the CSV cells. Pure: no database, no HTTP."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from billing.errors import InvalidCurrency, InvalidInput
from billing.finance import (
    INVOICE_CSV_COLUMNS,
    InvoiceCursor,
    InvoiceFilter,
    InvoiceListItem,
    format_instant,
    invoice_csv_row,
)
from billing.invoices import InvoiceStatus
from billing.records import InvoiceRecord

T0 = datetime(2026, 1, 31, 9, 30, tzinfo=UTC)


def test_a_filter_from_text_normalizes_what_it_can() -> None:
    f = InvoiceFilter.parse(
        statuses=["paid,open", " PAID "],
        currency="jpy",
        issued_from="2026-01-31T10:30:00+01:00",
        period_to="2026-02-01T00:00:00Z",
        customer_id="",
    )
    assert f.statuses == (InvoiceStatus.PAID, InvoiceStatus.OPEN)
    assert f.currency == "JPY"
    assert f.issued_from == T0 and f.issued_from.tzinfo == UTC
    assert f.period_to == datetime(2026, 2, 1, tzinfo=UTC)
    assert f.customer_id is None


@pytest.mark.parametrize(
    ("fields", "error", "field", "message"),
    [
        ({"statuses": ["paied"]}, InvalidInput, "status", "unknown invoice status 'paied'"),
        ({"currency": "EURO"}, InvalidCurrency, "currency", "3-letter ISO 4217 code"),
        ({"issued_from": "2026-01-31"}, InvalidInput, "issued_from", "has no time zone"),
        ({"period_to": "31/01/2026"}, InvalidInput, "period_to", "must be an ISO 8601 instant"),
        (
            {"period_from": "2026-02-01T00:00:00Z", "period_to": "2026-01-01T00:00:00Z"},
            InvalidInput,
            "period_from",
            "period_from (2026-02-01T00:00:00Z) is after period_to (2026-01-01T00:00:00Z)",
        ),
        ({"subscription_id": "s" * 41}, InvalidInput, "subscription_id", "1 to 40 characters"),
        # Found by the fuzzer: year 0 in UTC was an OverflowError, a 500.
        (
            {"issued_to": "0001-01-01T01:00:03+02:00"},
            InvalidInput,
            "issued_to",
            "'0001-01-01T01:00:03+02:00' is out of range; use an instant between years 1 and 9999",
        ),
    ],
)
def test_bad_filter_values_name_the_field(
    fields: dict[str, object], error: type[Exception], field: str, message: str
) -> None:
    with pytest.raises(error) as refused:
        InvoiceFilter.parse(**fields)  # type: ignore[arg-type]
    assert message in str(refused.value)
    assert getattr(refused.value, "field", None) == field


def test_the_cursor_round_trips_and_refuses_anything_else() -> None:
    cursor = InvoiceCursor(T0.astimezone(timezone(timedelta(hours=9))), "in_abc")
    text = cursor.encode()
    assert "=" not in text and "+" not in text and "/" not in text  # URL-safe as it is
    assert InvoiceCursor.decode(text) == InvoiceCursor(T0, "in_abc")
    for bad in ("", "!!!", "e30", "WyJ4IiwiaW5fYSJd", "A" * 600):
        with pytest.raises(InvalidInput, match="is not valid; pass the next_cursor"):
            InvoiceCursor.decode(bad)


def invoice(**changes: object) -> InvoiceRecord:
    fields: dict[str, object] = {
        "id": "in_1",
        "number": "ABCD2345-0001",
        "subscription_id": "sub_1",
        "customer_id": "cus_1",
        "period_index": 0,
        "period_start": T0,
        "period_end": T0 + timedelta(days=28),
        "amount_due_minor": 1200,
        "currency": "JPY",
        "status": InvoiceStatus.OPEN,
        "created_at": T0,
        "description": "Tokyo (monthly, JPY)",
    }
    fields.update(changes)
    return InvoiceRecord(**fields)  # type: ignore[arg-type]


def test_a_csv_row_has_a_cell_per_column_in_utc_and_minor_units() -> None:
    row = dict(zip(INVOICE_CSV_COLUMNS, invoice_csv_row(InvoiceListItem(invoice())), strict=True))
    assert row["amount_due_minor"] == "1200" and row["currency"] == "JPY"
    assert row["created_at"] == "2026-01-31T09:30:00Z" == format_instant(T0)
    assert row["paid_at"] == "" and row["payment_id"] == "" and row["fee_minor"] == ""


def test_csv_text_cells_never_start_a_spreadsheet_formula() -> None:
    item = InvoiceListItem(invoice(description='=HYPERLINK("http://x")', status_reason="@x"))
    row = dict(zip(INVOICE_CSV_COLUMNS, invoice_csv_row(item), strict=True))
    assert row["description"] == '\'=HYPERLINK("http://x")'
    assert row["status_reason"] == "'@x"
