"""Finance reads after the harness has billed a few periods: invoice filters, keyset pagination,
one invoice with its attempts and payment, the CSV export, and a subscription's live view."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import pytest
from dateutil.relativedelta import relativedelta
from fastapi import FastAPI
from temporalio.client import Client

from billing.calendar import IntervalUnit
from billing.finance import INVOICE_CSV_COLUMNS, InvoiceCursor
from billing.invoices import InvoiceStatus
from billing.records import CustomerRecord, InvoiceRecord, SubscriptionRecord
from billing.subscription import SubscriptionStatus
from billing.testing.cards import DECLINES_AFTER_ATTACH, SUCCEEDS
from db.engine import unit_of_work
from db.repositories import customers as customers_repo
from db.repositories import invoices as invoices_repo
from db.repositories import subscriptions as subscriptions_repo
from tests.api.support import Api, row_counts
from tests.conftest import BOTH_BACKENDS

DAY = timedelta(days=1)


def z(instant: datetime) -> str:
    return instant.isoformat().replace("+00:00", "Z")


def at(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


@dataclass
class Billed:
    anchor: datetime
    usd: str  # basic-monthly, card works: 3 paid invoices
    eur: str  # team-weekly in Paris, card works: weekly paid invoices
    jpy: str  # tokyo-monthly, card declines: dunning runs out, invoice uncollectible
    late: str  # basic-monthly, card declines, first billed at the end: open, in dunning


async def bill_a_few_periods(api: Api, *, months: int = 2, declining: bool = True) -> Billed:
    now = await api.harness.now()
    anchor = now.replace(minute=0, second=0, microsecond=0) + DAY

    async def sign(plan: str, card: str, first: datetime, timezone: str = "UTC") -> str:
        body = await api.signed_up(
            plan,
            card=card,
            billing_anchor_at=z(first),
            customer={"email": f"{plan}@example.com", "timezone": timezone},
        )
        return str(body["id"])

    usd = await sign("basic-monthly", SUCCEEDS, anchor)
    eur = await sign("team-weekly", SUCCEEDS, anchor, "Europe/Paris")
    jpy = late = ""
    if declining:
        jpy = await sign("tokyo-monthly", DECLINES_AFTER_ATTACH, anchor)
        late = await sign("basic-monthly", DECLINES_AFTER_ATTACH, anchor + relativedelta(months=2))
    end = anchor + relativedelta(months=months) + DAY / 2
    await api.harness.advance_to(end)

    def settled(view: Any) -> bool:
        return bool(view.open_invoice is None and view.next_billing_at > end)

    await api.harness.wait_for(usd, settled)
    await api.harness.wait_for(eur, settled)
    if declining:
        await api.harness.wait_for(jpy, lambda v: v.status == SubscriptionStatus.CANCELED)
        await api.harness.wait_for(late, lambda v: v.status == SubscriptionStatus.PAST_DUE)
    return Billed(anchor, usd, eur, jpy, late)


def all_invoices(api: Api) -> list[InvoiceRecord]:
    """Every invoice in the database, in the API's order."""
    with unit_of_work(api.harness.session_factory) as session:
        subs = [s for s in api.harness.started_subscription_ids]
        found = [i for s in subs for i in invoices_repo.list_invoices_for_subscription(session, s)]
    return sorted(found, key=lambda i: (i.created_at, i.id))


async def listed(api: Api, **params: Any) -> list[dict[str, Any]]:
    response = await api.request(
        "GET", "/v1/invoices", scope="finance", params={"limit": 200, **params}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["has_more"] is False and body["next_cursor"] is None
    data: list[dict[str, Any]] = body["data"]
    return data


def ids(items: list[dict[str, Any]]) -> list[str]:
    return [item["id"] for item in items]


async def test_invoice_filters_detail_and_live_subscription(api: Api) -> None:
    b = await bill_a_few_periods(api)
    invoices = all_invoices(api)
    assert len(invoices) == row_counts(api.harness)["invoices"]
    by_sub = {s: [i for i in invoices if i.subscription_id == s] for s in (b.usd, b.eur, b.jpy)}
    assert len(by_sub[b.usd]) == 3 and len(by_sub[b.jpy]) == 1 and len(by_sub[b.eur]) >= 8

    # No filter: everything, in (created_at, id) order.
    assert ids(await listed(api)) == [i.id for i in invoices]

    # Status, repeatable.
    paid = await listed(api, status="paid")
    assert ids(paid) == [i.id for i in invoices if i.status == InvoiceStatus.PAID]
    troubled = await listed(api, status=["open", "uncollectible"])
    assert {(i["subscription_id"], i["status"]) for i in troubled} == {
        (b.jpy, "uncollectible"),
        (b.late, "open"),
    }

    # Subscription and customer.
    usd = await listed(api, subscription_id=b.usd)
    assert [at(i["period_start"]) for i in usd] == [
        b.anchor + relativedelta(months=k) for k in range(3)
    ]
    assert all(i["status"] == "paid" and i["amount_paid_minor"] == 900 for i in usd)
    assert ids(await listed(api, customer_id=usd[0]["customer_id"])) == ids(usd)

    # Currency, case-insensitive; amounts in minor units of their currency.
    assert ids(await listed(api, currency="EUR")) == [i.id for i in by_sub[b.eur]]
    (jpy,) = await listed(api, currency="jpy")
    assert (jpy["amount_due_minor"], jpy["currency"], jpy["amount_due_display"]) == (
        1200,
        "JPY",
        "JPY 1200",
    )

    # Period and issue ranges are half-open: [from, to).
    lo, hi = b.anchor + relativedelta(months=1), b.anchor + relativedelta(months=2)
    in_period = await listed(api, period_from=z(lo), period_to=z(hi))
    assert ids(in_period) == [i.id for i in invoices if lo <= i.period_start < hi]
    assert b.anchor + relativedelta(months=1) in [at(i["period_start"]) for i in in_period]
    assert b.anchor + relativedelta(months=2) not in [at(i["period_start"]) for i in in_period]
    issued = await listed(api, issued_from=z(lo), issued_to=z(hi))
    assert ids(issued) == [i.id for i in invoices if lo <= i.created_at < hi]
    combined = await listed(api, status="paid", currency="USD", period_from=z(lo))
    assert ids(combined) == [
        i.id
        for i in invoices
        if i.status == InvoiceStatus.PAID and i.currency == "USD" and i.period_start >= lo
    ]
    assert len(combined) == 2

    # One paid invoice: its attempt and its payment with fee and net.
    first = usd[0]
    response = await api.request("GET", f"/v1/invoices/{first['id']}", scope="admin")
    assert response.status_code == 200, response.text
    detail = response.json()
    (attempt,) = detail["attempts"]
    assert attempt["attempt_number"] == 1
    assert (attempt["status"], attempt["outcome"], attempt["reason"]) == (
        "succeeded",
        "paid",
        "scheduled",
    )
    assert attempt["idempotency_key"] == f"{first['id']}-attempt-1"
    assert attempt["stripe_payment_intent_id"].startswith("pi_")
    (payment,) = detail["payments"]
    assert payment == detail["payment"]
    assert payment["stripe_payment_intent_id"] == attempt["stripe_payment_intent_id"]
    assert payment["stripe_charge_id"].startswith("ch_")
    assert (payment["amount_minor"], payment["currency"]) == (900, "USD")
    assert payment["fee_minor"] is not None and payment["net_minor"] is not None
    assert payment["fee_minor"] + payment["net_minor"] == payment["settlement_amount_minor"]
    assert payment["settlement_currency"] == "USD"
    assert at(detail["paid_at"]) == at(payment["settled_at"])

    # The written-off invoice: every dunning attempt, each with its own key, no payment.
    response = await api.request("GET", f"/v1/invoices/{jpy['id']}", scope="finance")
    detail = response.json()
    assert detail["status"] == "uncollectible" and detail["payments"] == []
    attempts = detail["attempts"]
    assert [a["attempt_number"] for a in attempts] == list(range(1, 9))  # first try + 7 retries
    assert {a["status"] for a in attempts} == {"failed"}
    assert {a["outcome"] for a in attempts} == {"soft_decline"}
    assert [a["idempotency_key"] for a in attempts] == [
        f"{jpy['id']}-attempt-{n}" for n in range(1, 9)
    ]
    missing = await api.request("GET", "/v1/invoices/in_nope", scope="finance")
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == "invoice 'in_nope' not found"

    # Live subscription views, merged with the database record.
    view = (await api.request("GET", f"/v1/subscriptions/{b.usd}", scope="finance")).json()
    assert view["live"] is True
    assert view["status"] == "active" and view["plan"] == "basic-monthly"
    assert view["price"] == {
        "amount_minor": 900,
        "currency": "USD",
        "amount_display": "USD 9.00",
        "interval": "month",
        "interval_count": 1,
    }
    assert at(view["current_period_start"]) == b.anchor + relativedelta(months=2)
    assert at(view["next_billing_at"]) == b.anchor + relativedelta(months=3)
    assert view["invoices_issued"] == 3 and view["open_invoice"] is None
    assert view["workflow_id"] == f"subscription-{b.usd}"

    late = (await api.request("GET", f"/v1/subscriptions/{b.late}", scope="admin")).json()
    assert late["status"] == "past_due"
    assert late["open_invoice"]["attempts"] == 1
    assert late["open_invoice"]["currency"] == "USD"
    assert late["open_invoice"]["last_decline_code"] == "card_declined"
    # Dunning's first retry is a day after the first failure.
    failed_at = at(late["open_invoice"]["first_failure_at"])
    assert failed_at is not None
    assert at(late["open_invoice"]["next_retry_at"]) == failed_at + DAY

    canceled = (await api.request("GET", f"/v1/subscriptions/{b.jpy}", scope="finance")).json()
    assert canceled["status"] == "canceled" and canceled["ended_at"] is not None
    assert canceled["price"]["amount_display"] == "JPY 1200"


async def test_a_subscription_whose_workflow_cannot_be_asked_is_read_from_the_database(
    api: Api,
) -> None:
    # A signup that crashed between its commit and the workflow start leaves exactly this.
    now = await api.harness.now()
    with unit_of_work(api.harness.session_factory) as session:
        customers_repo.insert_customer(
            session,
            CustomerRecord(
                id="cus_orphan",
                invoice_prefix="ORPHAN00",
                timezone="UTC",
                created_at=now,
                updated_at=now,
            ),
        )
        subscriptions_repo.insert_subscription(
            session,
            SubscriptionRecord(
                id="sub_orphan",
                customer_id="cus_orphan",
                plan_code="basic-monthly",
                status=SubscriptionStatus.PENDING,
                amount_minor=900,
                currency="USD",
                interval=IntervalUnit.MONTH,
                interval_count=1,
                timezone="UTC",
                anchor_at=now,
                next_billing_at=now,
                workflow_id="subscription-sub_orphan",
                created_at=now,
                updated_at=now,
            ),
        )
    response = await api.request("GET", "/v1/subscriptions/sub_orphan", scope="finance")
    assert response.status_code == 200, response.text
    view = response.json()
    assert view["live"] is False
    assert (view["status"], view["invoices_issued"], view["open_invoice"]) == ("pending", 0, None)
    assert at(view["next_billing_at"]) == now

    status = await api.request("POST", "/v1/subscriptions/sub_orphan/pause", scope="admin")
    assert status.status_code == 409
    assert "(pending) has no running workflow" in status.json()["error"]["message"]


@BOTH_BACKENDS
async def test_keyset_pagination_walks_every_invoice_once_in_order_and_csv_matches(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = await bill_a_few_periods(api, months=1, declining=False)
    # Three more invoices created at the very same instant as an existing one, so pages must
    # break ties on id.
    with unit_of_work(api.harness.session_factory) as session:
        template = invoices_repo.list_invoices_for_subscription(session, b.usd)[0]
        for k in range(1, 4):
            invoices_repo.issue_invoice(
                session,
                replace(
                    template,
                    id=f"in_tie{k}",
                    period_index=100 + k,
                    period_start=template.period_start + relativedelta(years=50 + k),
                    period_end=template.period_start + relativedelta(years=50 + k, months=1),
                    status=InvoiceStatus.OPEN,
                    amount_paid_minor=0,
                    paid_at=None,
                    stripe_payment_intent_id=None,  # an invoice's intent is its own
                ),
            )
    invoices = all_invoices(api)
    assert len(invoices) == row_counts(api.harness)["invoices"] >= 9
    assert sum(i.created_at == template.created_at for i in invoices) >= 4

    async def walk(**params: Any) -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            query = {"limit": 2, **params, **({"cursor": cursor} if cursor else {})}
            response = await api.request("GET", "/v1/invoices", scope="finance", params=query)
            assert response.status_code == 200, response.text
            page = response.json()
            assert 1 <= len(page["data"]) <= 2
            seen.extend(page["data"])
            if not page["has_more"]:
                assert page["next_cursor"] is None
                return seen
            cursor = page["next_cursor"]
            assert cursor is not None
            last = page["data"][-1]
            position = InvoiceCursor(datetime.fromisoformat(last["created_at"]), last["id"])
            assert InvoiceCursor.decode(cursor) == position

    walked = await walk()
    assert ids(walked) == [i.id for i in invoices]  # every invoice once, in order
    assert len(set(ids(walked))) == len(walked)
    assert ids(await walk(currency="EUR")) == [i.id for i in invoices if i.currency == "EUR"]

    # The CSV export: the same invoices as the JSON list, streamed page by page.
    monkeypatch.setattr("billing.api.invoices.EXPORT_PAGE_SIZE", 2)
    response = await api.request("GET", "/v1/invoices.csv", scope="finance")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    rows = list(csv.reader(io.StringIO(response.text)))
    assert tuple(rows[0]) == INVOICE_CSV_COLUMNS
    lines = [dict(zip(rows[0], row, strict=True)) for row in rows[1:]]
    listed_json = await listed(api)
    assert len(lines) == len(listed_json) == len(invoices)
    for line, item in zip(lines, listed_json, strict=True):
        payment = item["payment"] or {}
        assert line["invoice_id"] == item["id"]
        assert (line["status"], line["currency"]) == (item["status"], item["currency"])
        assert int(line["amount_due_minor"]) == item["amount_due_minor"]
        assert int(line["amount_paid_minor"]) == item["amount_paid_minor"]
        assert line["created_at"] == item["created_at"]  # the same ISO 8601 UTC text
        assert line["period_start"] == item["period_start"]
        assert line["paid_at"] == (item["paid_at"] or "")
        assert line["fee_minor"] == (
            "" if payment.get("fee_minor") is None else str(payment["fee_minor"])
        )
        assert line["stripe_charge_id"] == (payment.get("stripe_charge_id") or "")
    assert all(line["created_at"].endswith("Z") for line in lines)

    eur_csv = await api.request(
        "GET", "/v1/invoices.csv", scope="admin", params={"currency": "EUR"}
    )
    eur_rows = list(csv.reader(io.StringIO(eur_csv.text)))[1:]
    assert [row[0] for row in eur_rows] == [i.id for i in invoices if i.currency == "EUR"]


BAD_FILTERS: list[Any] = [
    pytest.param(
        {"status": "bogus"},
        "unknown invoice status 'bogus'; known statuses: draft, open, paid, void, uncollectible",
        id="unknown-status",
    ),
    pytest.param({"currency": "ABC"}, "unknown currency 'ABC'", id="unknown-currency"),
    pytest.param({"currency": "dollars"}, "3-letter ISO 4217 code", id="bad-currency"),
    pytest.param(
        [("issued_to", "2026-01-01T00:00:00Z"), ("issued_to", "2027-01-01T00:00:00Z")],
        "query parameter 'issued_to' was given 2 times; give it once",
        id="repeated-single-value",
    ),
    pytest.param(
        {"issued_from": "2026-02-01T00:00:00Z", "issued_to": "2026-01-01T00:00:00Z"},
        "issued_from (2026-02-01T00:00:00Z) is after issued_to (2026-01-01T00:00:00Z)",
        id="issued-from-after-to",
    ),
    pytest.param(
        {"period_from": "2026-02-01T00:00:00+01:00", "period_to": "2026-01-01T00:00:00Z"},
        "period_from (2026-01-31T23:00:00Z) is after period_to",
        id="period-from-after-to",
    ),
    pytest.param(
        {"period_from": "2026-01-01"}, "period_from '2026-01-01' has no time zone", id="naive"
    ),
    pytest.param(
        {"issued_to": "last tuesday"}, "issued_to must be an ISO 8601 instant", id="not-a-date"
    ),
    pytest.param(
        {"cursor": "not-a-cursor!"}, "cursor 'not-a-cursor!' is not valid", id="bad-cursor"
    ),
    pytest.param(
        {"cursor": "WzEsMl0"}, "is not valid; pass the next_cursor", id="cursor-wrong-shape"
    ),
    pytest.param(
        {"limit": 0},
        "query parameter 'limit' input should be greater than or equal to 1",
        id="limit-0",
    ),
    pytest.param(
        {"limit": 201},
        "query parameter 'limit' input should be less than or equal to 200",
        id="limit-201",
    ),
    pytest.param({"statuses": "paid"}, "unknown query parameter 'statuses'", id="misspelt-filter"),
]


@pytest.mark.parametrize(("params", "message"), BAD_FILTERS)
async def test_bad_filters_are_refused_with_a_clear_message(
    api: Api, params: dict[str, Any], message: str
) -> None:
    response = await api.request("GET", "/v1/invoices", scope="finance", params=params)
    assert response.status_code == 422, response.text
    assert message in response.json()["error"]["message"]
    if "cursor" not in params and "limit" not in params:
        csv_response = await api.request("GET", "/v1/invoices.csv", scope="finance", params=params)
        assert csv_response.status_code == 422
        assert message in csv_response.json()["error"]["message"]


async def test_with_temporal_unreachable_reads_fall_back_and_changes_answer_503(
    api: Api, app: FastAPI
) -> None:
    body = await api.signed_up("basic-monthly", card=SUCCEEDS)
    await api.harness.wait_for(body["id"], lambda v: v.invoices_issued == 1 and not v.open_invoice)
    first_billed = at(body["next_billing_at"])
    assert first_billed is not None
    # Nothing listens on port 1: every call to Temporal fails to connect.
    app.state.temporal = await Client.connect("127.0.0.1:1", lazy=True)

    response = await api.request("GET", f"/v1/subscriptions/{body['id']}", scope="finance")
    assert response.status_code == 200, response.text
    view = response.json()
    assert view["live"] is False
    assert (view["status"], view["invoices_issued"], view["open_invoice"]) == ("active", 1, None)
    assert at(view["next_billing_at"]) == first_billed + relativedelta(months=1)

    response = await api.request("POST", f"/v1/subscriptions/{body['id']}/pause", scope="admin")
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "temporal_unavailable"
    assert response.headers["Retry-After"] == "5"
