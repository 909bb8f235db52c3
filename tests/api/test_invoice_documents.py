"""Invoice documents (``GET /v1/invoices/{id}.pdf`` and ``.html``) from the invoice's own
records: its lines (subscription line, prorations with their periods), totals (subtotal,
credit applied, amount due), amount paid, and the credit notes issued against it with their
refunds, in the customer's locale and currency format. Read back with pdftotext; the expected
figures are worked out here by hand, not by the code under test.

Two ways in: a real plan change and a real credit note with its refund through the API (the
worker on the time-skipping server, localstripe), and invoices issued by the invoice
repository (the same code the billing activity runs) in JPY and KWD."""

from __future__ import annotations

import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from billing.balance import BalanceEntryKind
from billing.calendar import IntervalUnit
from billing.credit_notes import CreditNoteReason, CreditNoteRequest, RefundStatus
from billing.invoices import InvoiceLine, InvoiceLineKind, InvoiceStatus, invoice_prefix_for
from billing.plans import Plan
from billing.records import CustomerRecord, InvoiceRecord, SubscriptionRecord
from billing.subscription import SubscriptionStatus
from billing.testing.cards import SUCCEEDS
from db.engine import unit_of_work
from db.repositories import balances as balances_repo
from db.repositories import credit_notes as credit_notes_repo
from db.repositories import customers as customers_repo
from db.repositories import invoices as invoices_repo
from db.repositories import plans as plans_repo
from db.repositories import subscriptions as subscriptions_repo
from tests.api.support import Api, eventually
from tests.conftest import BOTH_BACKENDS

DAY = timedelta(days=1)
#: The document joins a period's two dates with an en dash.
DASH = "\u2013"
MONTHS = [
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
]  # fmt: skip


def pdf_text(pdf: bytes, tmp_path: Path, name: str = "invoice") -> str:
    """The PDF's text, whitespace (and CLDR's no-break spaces) collapsed to single spaces."""
    assert shutil.which("pdftotext"), "pdftotext is missing: apt-get install poppler-utils"
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{name}.pdf"
    path.write_bytes(pdf)
    text = subprocess.run(
        ["pdftotext", "-layout", str(path), "-"], check=True, capture_output=True, text=True
    ).stdout
    return " ".join(text.replace("\u202f", " ").replace("\xa0", " ").split())


def usd_en_us(amount_minor: int) -> str:
    """How en-US writes USD: $1,234.56 and -$1,234.56 (by hand, not babel)."""
    sign = "-" if amount_minor < 0 else ""
    return f"{sign}${abs(amount_minor) / 100:,.2f}"


def en_us_day(instant: str, zone: str) -> str:
    local = datetime.fromisoformat(instant.replace("Z", "+00:00")).astimezone(ZoneInfo(zone))
    return f"{MONTHS[local.month - 1]} {local.day}, {local.year}"


async def test_a_prorated_invoice_with_a_credit_note_shows_its_lines_totals_and_refund(
    api: Api, tmp_path: Path
) -> None:
    zone = "America/New_York"
    sub = await api.signed_up(
        "basic-monthly",
        card=SUCCEEDS,
        customer={"email": "ada@example.com", "name": "Ada Lovelace", "timezone": zone,
                  "locale": "en-US"},
    )  # fmt: skip
    await api.harness.wait_for(sub["id"], lambda v: v.invoices_issued == 1 and not v.open_invoice)
    await api.harness.advance(12 * DAY)
    changed = await api.request(
        "POST",
        f"/v1/subscriptions/{sub['id']}/change-plan",
        scope="admin",
        json={"plan": "pro-monthly", "quantity": 2},
    )
    assert changed.status_code == 200, changed.text
    invoice_id = changed.json()["invoice_id"]
    await api.harness.wait_for(sub["id"], lambda v: v.open_invoice is None)
    shown = (await api.request("GET", f"/v1/invoices/{invoice_id}", scope="finance")).json()
    assert shown["status"] == "paid"
    lines = shown["lines"]
    # Unused time of 1 x basic (a credit), remaining time of 2 x pro: both prorations.
    assert [x["kind"] for x in lines] == ["proration", "proration"]
    assert lines[0]["amount_minor"] < 0 < lines[1]["amount_minor"]
    subtotal = lines[0]["amount_minor"] + lines[1]["amount_minor"]
    assert shown["amount_due_minor"] == subtotal == shown["amount_paid_minor"]

    # A credit note: $5.00 back to the card, $2.00 to the balance, for a changed order.
    issued = await api.request(
        "POST",
        f"/v1/invoices/{invoice_id}/credit-notes",
        scope="admin",
        json={"refund_amount_minor": 500, "credit_amount_minor": 200, "reason": "order_change",
              "memo": "Seat removed"},
    )  # fmt: skip
    assert issued.status_code == 201, issued.text
    note = issued.json()

    def refunded() -> bool:
        with unit_of_work(api.harness.session_factory) as session:
            found = credit_notes_repo.list_refunds(session, credit_note_ids=[note["id"]])
        return [r.status for r in found] == [RefundStatus.SUCCEEDED]

    await eventually(refunded, timeout=30)

    pdf = await api.request("GET", f"/v1/invoices/{invoice_id}.pdf", scope="finance")
    assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF")
    text = pdf_text(pdf.content, tmp_path)

    # Each line with its own period, in the customer's zone, and its amount.
    for line in lines:
        period = (
            f"{en_us_day(line['period_start'], zone)} {DASH} {en_us_day(line['period_end'], zone)}"
        )
        assert f"{period} {line['quantity']}" in text, (period, text)
        assert usd_en_us(line["amount_minor"]) in text
    # Both prorations run from the change (12 days into the period) to the period's end.
    listed = await api.request("GET", f"/v1/invoices?subscription_id={sub['id']}", scope="finance")
    first = listed.json()["data"][0]
    for line in lines:
        assert line["period_end"] == first["period_end"]
        start, began = (
            datetime.fromisoformat(x.replace("Z", "+00:00"))
            for x in (line["period_start"], first["period_start"])
        )
        # The change instant is floored to its second (docs/proration.md), the period's
        # start is not: 12 days, less the start's fraction of a second.
        assert 12 * DAY - timedelta(seconds=1) < start - began <= 12 * DAY + timedelta(minutes=1)
        # By hand: the unused (or remaining) share of quantity x unit price, rounded once.
        ended = datetime.fromisoformat(first["period_end"].replace("Z", "+00:00"))
        share = (ended - start) / (ended - began)
        whole = line["quantity"] * line["unit_amount_minor"]
        assert abs(line["amount_minor"]) == round(whole * share), (line, share)
    assert text.count("Proration") == 2
    assert f"Subtotal {usd_en_us(subtotal)}" in text
    assert "Credit applied" not in text  # the customer had no balance
    assert f"Amount due {usd_en_us(subtotal)}" in text
    assert f"Amount paid {usd_en_us(subtotal)}" in text
    assert "Amount remaining $0.00" in text
    assert "Refunded $5.00" in text
    # The credit note: number, date, reason, total and split; its refund, succeeded.
    today = en_us_day(note["created_at"], zone)
    assert f"{note['number']} {today} order change $7.00 $5.00 $2.00 Seat removed" in text, text
    assert "Seat removed" in text
    assert "Refund of $5.00: succeeded" in text

    html = await api.request("GET", f"/v1/invoices/{invoice_id}.html", scope="finance")
    assert html.status_code == 200
    assert html.text.count('class="line line-proration"') == 2
    assert note["number"] in html.text and 'id="credit-notes"' in html.text


# ---- JPY and KWD, issued by the invoice repository ------------------------------------------

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def _customer_and_subscription(
    session: Any, *, cid: str, currency: str, unit: int, zone: str, locale: str
) -> tuple[CustomerRecord, SubscriptionRecord]:
    code = f"team-{currency.lower()}"
    plans_repo.upsert_plan(
        session, Plan(code, f"Team {currency}", unit, currency, IntervalUnit.MONTH), now=T0
    )
    customer, _ = customers_repo.insert_customer(
        session,
        CustomerRecord(
            id=cid,
            invoice_prefix=invoice_prefix_for(cid),
            timezone=zone,
            email=f"{cid}@example.com",
            name=f"Kunde {currency}",
            created_at=T0,
            updated_at=T0,
            locale=locale,
        ),
    )
    sub, _ = subscriptions_repo.insert_subscription(
        session,
        SubscriptionRecord(
            id=f"sub_{cid}",
            customer_id=cid,
            plan_code=code,
            status=SubscriptionStatus.ACTIVE,
            amount_minor=unit,
            currency=currency,
            interval=IntervalUnit.MONTH,
            interval_count=1,
            timezone=zone,
            anchor_at=T0,
            workflow_id=f"subscription-sub_{cid}",
            created_at=T0,
            updated_at=T0,
            quantity=2,
        ),
    )
    return customer, sub


def _issue(
    session: Any, sub: SubscriptionRecord, lines: list[InvoiceLine], at: datetime
) -> InvoiceRecord:
    invoice, created = invoices_repo.issue_invoice(
        session,
        InvoiceRecord(
            id=f"in_{sub.id}",
            number="",
            subscription_id=sub.id,
            customer_id=sub.customer_id,
            period_index=1,
            period_start=at,
            period_end=datetime(2026, 4, 1, tzinfo=UTC),
            amount_due_minor=0,
            currency=sub.currency,
            status=InvoiceStatus.OPEN,
            description=f"Team {sub.currency}",
            created_at=at,
            finalized_at=at,
        ),
        lines,
    )
    assert created
    return invoice


@BOTH_BACKENDS
async def test_kwd_in_german_with_credit_applied_and_a_credit_note_before_payment(
    api: Api, tmp_path: Path
) -> None:
    """KWD has 3 decimals; de-DE writes 24,690 KWD. 2 seats at 12.345 KWD, a proration credit
    of 3.500 KWD (Mar 16 to Apr 1): subtotal 21.190; the 5.000 KWD balance pays 5.000 of it
    (21.190 - 5.000 = 16.190); a 1.190 KWD credit note before payment leaves 15.000 due."""
    changed_at = datetime(2026, 3, 16, 9, tzinfo=UTC)
    with unit_of_work(api.harness.session_factory) as session:
        customer, sub = _customer_and_subscription(
            session, cid="cus_kwd", currency="KWD", unit=12345, zone="Europe/Berlin",
            locale="de-DE",
        )  # fmt: skip
        balances_repo.record_entry(
            session,
            customer_id=customer.id,
            currency="KWD",
            amount_minor=5000,
            kind=BalanceEntryKind.ADJUSTMENT,
            source_key="goodwill-kwd",
            description="goodwill",
            at=T0,
        )
        invoice = _issue(
            session,
            sub,
            [
                InvoiceLine(
                    kind=InvoiceLineKind.SUBSCRIPTION,
                    description="2 x Team KWD",
                    amount_minor=24690,
                    period_start=T0,
                    period_end=datetime(2026, 4, 1, tzinfo=UTC),
                    quantity=2,
                    unit_amount_minor=12345,
                ),
                InvoiceLine(
                    kind=InvoiceLineKind.PRORATION,
                    description="Unused time on 2 x Team KWD",
                    amount_minor=-3500,
                    period_start=changed_at,
                    period_end=datetime(2026, 4, 1, tzinfo=UTC),
                    quantity=2,
                    unit_amount_minor=12345,
                ),
            ],
            changed_at,
        )
        assert (invoice.subtotal_minor, invoice.credit_applied_minor) == (21190, 5000)
        credit_notes_repo.issue_credit_note(
            session,
            invoice.id,
            CreditNoteRequest(amount_minor=1190, reason=CreditNoteReason.DUPLICATE),
            at=changed_at + DAY,
            allow_open_invoices=True,
        )

    pdf = await api.request("GET", f"/v1/invoices/{invoice.id}.pdf", scope="finance")
    assert pdf.status_code == 200, pdf.text
    text = pdf_text(pdf.content, tmp_path)
    assert "Rechnung" in text and invoice.number in text and "Status: offen" in text
    # Lines: the subscription line for March (Berlin dates), the proration from Mar 16.
    assert f"1. März 2026 {DASH} 1. April 2026 2 12,345 KWD 24,690 KWD" in text, text
    assert f"16. März 2026 {DASH} 1. April 2026 2 12,345 KWD -3,500 KWD" in text, text
    assert "Zwischensumme 21,190 KWD" in text
    assert "Angerechnetes Guthaben -5,000 KWD" in text
    assert "Gutschriften vor Zahlung -1,190 KWD" in text
    assert "Fälliger Betrag 15,000 KWD" in text
    assert "Bezahlt 0,000 KWD" in text and "Offener Betrag 15,000 KWD" in text
    # The credit note: its number, the day (Berlin), the reason in German, its amount.
    assert "17. März 2026 Duplikat 1,190 KWD" in text, text


@BOTH_BACKENDS
async def test_jpy_downgrade_credited_to_the_balance_owes_nothing(api: Api, tmp_path: Path) -> None:
    """JPY has no decimals: a downgrade from 2 seats at ¥1,200 to 1 (credit -¥1,200 x 2 for
    the month, charge ¥1,200) nets -¥1,200: carried to the balance, ¥0 due, paid at once."""
    with unit_of_work(api.harness.session_factory) as session:
        _, sub = _customer_and_subscription(
            session, cid="cus_jpy", currency="JPY", unit=1200, zone="Asia/Tokyo", locale="en-US"
        )
        invoice = _issue(
            session,
            sub,
            [
                InvoiceLine(
                    kind=InvoiceLineKind.PRORATION,
                    description="Unused time on 2 x Team JPY",
                    amount_minor=-2400,
                    period_start=T0,
                    period_end=datetime(2026, 4, 1, tzinfo=UTC),
                    quantity=2,
                    unit_amount_minor=1200,
                ),
                InvoiceLine(
                    kind=InvoiceLineKind.PRORATION,
                    description="Remaining time on Team JPY",
                    amount_minor=1200,
                    period_start=T0,
                    period_end=datetime(2026, 4, 1, tzinfo=UTC),
                    quantity=1,
                    unit_amount_minor=1200,
                ),
            ],
            T0,
        )
    assert invoice.status == InvoiceStatus.PAID and invoice.amount_due_minor == 0

    pdf = await api.request("GET", f"/v1/invoices/{invoice.id}.pdf", scope="finance")
    text = pdf_text(pdf.content, tmp_path)
    # Tokyo dates (UTC midnight is 09:00 there); en-US order; yen without decimals.
    assert f"March 1, 2026 {DASH} April 1, 2026 2 ¥1,200 -¥2,400" in text, text
    assert f"March 1, 2026 {DASH} April 1, 2026 1 ¥1,200 ¥1,200" in text, text
    assert "Subtotal -¥1,200" in text
    assert "Credited to your balance ¥1,200" in text
    assert "Amount due ¥0" in text and "Amount paid ¥0" in text
    assert "Credit notes" not in text  # none issued
