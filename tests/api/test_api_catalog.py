"""The plan catalog and the listings through the API: plans created once (same body twice and
twenty at once), immutable, archived; bad input writes nothing; seats at signup; customers
with their card, subscriptions and credit balance; subscription filters and pages."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import func, select

from billing.balance import BalanceEntryKind
from billing.testing.cards import SUCCEEDS
from db import models
from db.engine import unit_of_work
from db.repositories import balances as balances_repo
from tests.api.support import Api, row_counts
from tests.conftest import BOTH_BACKENDS

SEATS_PLAN: dict[str, Any] = {
    "code": "team-seats-monthly",
    "name": "Team (per seat, monthly)",
    "amount_minor": 1200,
    "currency": "usd",
    "interval": "month",
}


def plan_count(api: Api) -> int:
    with api.harness.session_factory() as session:
        return session.scalar(select(func.count()).select_from(models.PlanRow)) or 0


@BOTH_BACKENDS
async def test_a_plan_is_created_once_and_is_immutable(api: Api) -> None:
    created = await api.request("POST", "/v1/plans", scope="admin", json=SEATS_PLAN)
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["currency"] == "USD" and body["active"] is True
    assert body["amount_display"] == "USD 12.00"
    assert body["retry_offsets_days"] == [1, 3, 5, 7, 9, 11, 14]

    again = await api.request("POST", "/v1/plans", scope="admin", json=SEATS_PLAN)
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == body

    repriced = await api.request(
        "POST", "/v1/plans", scope="admin", json={**SEATS_PLAN, "amount_minor": 1300}
    )
    assert repriced.status_code == 409
    assert "immutable" in repriced.json()["error"]["message"]
    read = await api.request("GET", f"/v1/plans/{SEATS_PLAN['code']}", scope="finance")
    assert read.json()["amount_minor"] == 1200


@BOTH_BACKENDS
async def test_twenty_parallel_creates_write_one_plan(api: Api) -> None:
    before = plan_count(api)
    answers = await asyncio.gather(
        *(api.request("POST", "/v1/plans", scope="admin", json=SEATS_PLAN) for _ in range(20))
    )
    assert sorted(a.status_code for a in answers) == [200] * 19 + [201]
    assert plan_count(api) == before + 1


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"currency": "XYZ"}, "currency"),
        ({"interval": "fortnight"}, "interval"),
        ({"amount_minor": -1}, "amount_minor"),
        ({"amount_minor": 12.5}, "amount_minor"),
        ({"code": "Pro Monthly"}, "code"),
        ({"name": "a\x00b"}, "name"),
        ({"name": "x" * 3_000}, "name"),
        ({"name": "4242 4242 4242 4242"}, "name"),
        ({"interval_count": 0}, "interval_count"),
        ({"trial_days": 10_000}, "trial_days"),
        ({"dunning": {"retry_offsets_days": [3, 1]}}, "dunning.retry_offsets_days"),
        ({"price": 5}, "price"),
    ],
)
async def test_bad_plans_are_refused_and_nothing_is_written(
    api: Api, change: dict[str, Any], field: str
) -> None:
    before = plan_count(api)
    answer = await api.request("POST", "/v1/plans", scope="admin", json={**SEATS_PLAN, **change})
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert field.split(".")[0] in (error.get("field") or "") + error["message"]
    assert "4242 4242" not in answer.text
    assert plan_count(api) == before


async def test_plans_need_the_right_scope(api: Api) -> None:
    assert (await api.request("POST", "/v1/plans", json=SEATS_PLAN)).status_code == 401
    refused = await api.request("POST", "/v1/plans", scope="finance", json=SEATS_PLAN)
    assert refused.status_code == 403


@BOTH_BACKENDS
async def test_an_archived_plan_takes_no_signups_and_its_subscribers_keep_billing(
    api: Api,
) -> None:
    sub = await api.signed_up("basic-monthly", card=SUCCEEDS)
    await api.harness.wait_for(sub["id"], lambda v: v.invoices_issued == 1 and not v.open_invoice)
    archived = await api.request("POST", "/v1/plans/basic-monthly/archive", scope="admin")
    assert archived.status_code == 200 and archived.json()["active"] is False
    again = await api.request("POST", "/v1/plans/basic-monthly/archive", scope="admin")
    assert again.status_code == 200

    before = row_counts(api.harness)
    refused = await api.signup("basic-monthly", card=SUCCEEDS)
    assert refused.status_code == 422
    assert refused.json()["error"]["type"] == "plan_archived"
    assert "archived" in refused.json()["error"]["message"]
    assert row_counts(api.harness) == before

    listed = await api.request("GET", "/v1/plans?active=false", scope="finance")
    assert [p["code"] for p in listed.json()["items"]] == ["basic-monthly"]
    live = await api.request("GET", f"/v1/subscriptions/{sub['id']}", scope="finance")
    assert live.json()["status"] == "active"
    missing = await api.request("POST", "/v1/plans/no-such-plan/archive", scope="admin")
    assert missing.status_code == 404
    assert "known plans" in missing.json()["error"]["message"]


@BOTH_BACKENDS
async def test_seats_are_billed_quantity_times_the_unit_amount(api: Api) -> None:
    created = await api.request("POST", "/v1/plans", scope="admin", json=SEATS_PLAN)
    assert created.status_code == 201
    sub = await api.signed_up("team-seats-monthly", card=SUCCEEDS, quantity=7)
    await api.harness.wait_for(
        sub["id"], lambda v: v.invoices_issued == 1 and v.open_invoice is None
    )
    invoices = await api.request(
        "GET", f"/v1/invoices?subscription_id={sub['id']}", scope="finance"
    )
    [invoice] = invoices.json()["data"]
    assert invoice["amount_due_minor"] == 7 * 1200
    listed = await api.request(
        "GET", f"/v1/subscriptions?plan={SEATS_PLAN['code']}", scope="finance"
    )
    [item] = listed.json()["items"]
    assert item["quantity"] == 7 and item["price"]["amount_minor"] == 1200

    for bad in (0, -1, 1_000_001, "3", 2.5):
        before = row_counts(api.harness)
        answer = await api.signup("team-seats-monthly", card=SUCCEEDS, quantity=bad)
        assert answer.status_code == 422, (bad, answer.text)
        assert answer.json()["error"]["field"] == "quantity"
        assert row_counts(api.harness) == before


@BOTH_BACKENDS
async def test_customers_show_card_subscriptions_and_credit_balance(api: Api) -> None:
    first = await api.signed_up(
        "basic-monthly", card=SUCCEEDS, customer={"external_id": "ada", "timezone": "UTC"}
    )
    await api.signed_up(
        "pro-annual", customer_id=first["customer_id"], idempotency_key="second-sub"
    )
    other = await api.signed_up(
        "basic-monthly", card=SUCCEEDS, customer={"external_id": "bob", "timezone": "UTC"}
    )
    customer_id = first["customer_id"]
    now = await api.harness.now()
    with unit_of_work(api.harness.session_factory) as session:
        balances_repo.record_entry(
            session,
            customer_id=customer_id,
            currency="USD",
            amount_minor=250,
            kind=BalanceEntryKind.ADJUSTMENT,
            source_key="test-grant",
            description="goodwill",
            at=now,
        )

    shown = await api.request("GET", f"/v1/customers/{customer_id}", scope="finance")
    assert shown.status_code == 200, shown.text
    body = shown.json()
    assert body["external_id"] == "ada"
    assert body["card"]["brand"] == "visa" and body["card"]["last4"] == "4242"
    assert body["credit_balance"] == [
        {"currency": "USD", "amount_minor": 250, "amount_display": "USD 2.50"}
    ]
    assert sorted(s["plan"] for s in body["subscriptions"]) == ["basic-monthly", "pro-annual"]

    page1 = await api.request("GET", "/v1/customers?limit=1", scope="finance")
    page2 = await api.request(
        "GET", f"/v1/customers?limit=1&cursor={page1.json()['next_cursor']}", scope="finance"
    )
    ids = {page1.json()["items"][0]["id"], page2.json()["items"][0]["id"]}
    assert ids == {customer_id, other["customer_id"]}
    assert page2.json()["next_cursor"] is None

    mine = await api.request(
        "GET", f"/v1/subscriptions?customer_id={customer_id}&limit=1", scope="finance"
    )
    rest = await api.request(
        "GET",
        f"/v1/subscriptions?customer_id={customer_id}&cursor={mine.json()['next_cursor']}",
        scope="finance",
    )
    listed = mine.json()["items"] + rest.json()["items"]
    assert {s["customer_id"] for s in listed} == {customer_id} and len(listed) == 2

    assert (await api.request("GET", "/v1/customers/cus_nope", scope="finance")).status_code == 404
    bad = await api.request("GET", "/v1/customers?email=x", scope="finance")
    assert bad.status_code == 422
    assert (await api.request("GET", "/v1/customers", scope="signup")).status_code == 403


@BOTH_BACKENDS
async def test_emoji_names_are_kept_and_oversized_totals_refused(api: Api) -> None:
    emoji = {**SEATS_PLAN, "code": "rocket", "name": "Rocket 🚀 plan", "amount_minor": 10**12}
    created = await api.request("POST", "/v1/plans", scope="admin", json=emoji)
    assert created.status_code == 201, created.text
    read = await api.request("GET", "/v1/plans/rocket", scope="finance")
    assert read.json()["name"] == "Rocket 🚀 plan"

    # 10^6 seats x 10^12 = 10^18 minor units a period: over the maximum amount (and near the
    # database's 64-bit limit): refused before anything is written.
    before = row_counts(api.harness)
    answer = await api.signup("rocket", card=SUCCEEDS, quantity=1_000_000)
    assert answer.status_code == 422 and "would bill" in answer.json()["error"]["message"]
    assert row_counts(api.harness) == before

    sub = await api.signed_up("rocket", card=SUCCEEDS, quantity=1)
    await api.harness.wait_for(sub["id"], lambda v: v.invoices_issued == 1 and not v.open_invoice)
    change = await api.request(
        "POST",
        f"/v1/subscriptions/{sub['id']}/change-plan",
        scope="admin",
        json={"quantity": 1_000_000},
    )
    assert change.status_code == 422 and "would bill" in change.json()["error"]["message"]
