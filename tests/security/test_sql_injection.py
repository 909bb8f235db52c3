"""SQL injection in every filter of the finance endpoints and in the ids of the reads: each
attempt is refused with a 4xx or finds nothing, never a 5xx, and the data is untouched.
Queries are built with SQLAlchemy's bound parameters; this proves it from the outside, on
SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
import json
from typing import Any
from urllib.parse import quote

from sqlalchemy import select

from billing.testing.cards import SUCCEEDS
from db.base import Base
from tests.api.support import Api
from tests.conftest import BOTH_BACKENDS

PAYLOADS = [
    "' OR '1'='1",
    "' OR 1=1 --",
    '" OR ""="',
    "1; DROP TABLE invoices; --",
    "'; DELETE FROM payments; --",
    "x' UNION SELECT id, number FROM invoices --",
    "paid' OR status LIKE '%",
    "%",
    "_",
    "') OR ('a'='a",
    "1' AND pg_sleep(3) --",
    "'; UPDATE invoices SET amount_due_minor = 0; --",
    "\\'; SELECT 1; --",
    "2026-01-01T00:00:00Z' OR '1'='1",
    "in_' || (SELECT id FROM customers LIMIT 1) || '",
    "\u02bc OR 1=1 --",  # a look-alike quote
    "\x00' OR 1=1",
    "USD' --",
]

FILTERS = [
    "status",
    "customer_id",
    "subscription_id",
    "currency",
    "issued_from",
    "issued_to",
    "period_from",
    "period_to",
]


def database_dump(api: Api) -> dict[str, list[dict[str, Any]]]:
    with api.harness.session_factory() as session:
        return {
            table.name: [dict(row) for row in session.execute(select(table)).mappings()]
            for table in Base.metadata.sorted_tables
        }


@BOTH_BACKENDS
async def test_injection_in_every_finance_filter_and_id_is_refused_or_finds_nothing(
    api: Api,
) -> None:
    body = await api.signed_up("basic-monthly", card=SUCCEEDS)
    subscription_id = body["id"]
    await api.harness.wait_for(
        subscription_id, lambda v: v.invoices_issued == 1 and v.open_invoice is None
    )
    listing = await api.request("GET", "/v1/invoices", scope="finance")
    [invoice] = listing.json()["data"]
    before = database_dump(api)
    assert before["invoices"] and before["payments"]

    seen: dict[int, int] = {}

    def judge(response: Any, what: str) -> None:
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (what, response.text)
        if response.status_code >= 400:
            error = response.json()["error"]
            assert error["type"] and error["message"], what
            return
        assert response.status_code == 200, (what, response.text)
        if "text/csv" in response.headers["content-type"]:
            rows = list(csv.reader(io.StringIO(response.text)))
            assert len(rows) == 1, (what, rows)  # the header only
        else:
            assert response.json()["data"] == [], (what, response.text)

    for payload in PAYLOADS:
        for name in FILTERS:
            for path in ("/v1/invoices", "/v1/invoices.csv"):
                response = await api.request("GET", path, scope="finance", params={name: payload})
                judge(response, f"{path}?{name}={payload!r}")
            # Injected next to a filter that matches, so "finds nothing" is not for lack of data.
            mixed = await api.request(
                "GET",
                "/v1/invoices",
                scope="finance",
                params=[("subscription_id", subscription_id), (name, payload)],
            )
            judge(mixed, f"subscription_id plus {name}={payload!r}")
        for name in ("limit", "cursor"):
            response = await api.request(
                "GET", "/v1/invoices", scope="admin", params={name: payload}
            )
            judge(response, f"/v1/invoices?{name}={payload!r}")
        for path in ("/v1/invoices/{}", "/v1/subscriptions/{}"):
            for variant in (payload, invoice["id"] + payload, subscription_id + payload):
                url = path.format(quote(variant, safe=""))
                response = await api.request("GET", url, scope="finance")
                if response.status_code == 404 and "no such endpoint" in response.text:
                    seen[404] = seen.get(404, 0) + 1  # the quoted payload left the route
                    continue
                judge(response, f"{url}")

    # Every attempt was refused or empty, and nothing changed.
    assert set(seen) <= {200, 404, 422}, seen
    assert seen.get(422, 0) > 0 and seen.get(200, 0) + seen.get(404, 0) > 0
    after = database_dump(api)
    assert json.dumps(after, default=str, sort_keys=True) == json.dumps(
        before, default=str, sort_keys=True
    )
    # And the honest query still finds the invoice.
    found = await api.request(
        "GET", "/v1/invoices", scope="finance", params={"subscription_id": subscription_id}
    )
    assert [i["id"] for i in found.json()["data"]] == [invoice["id"]]
