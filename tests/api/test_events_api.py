"""Event endpoints, events, deliveries and customer mails through the HTTP API, on the real
app, harness and database."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fastapi import FastAPI

from billing.testing.cards import DECLINES_AFTER_ATTACH, SUCCEEDS
from tests.api.support import Api
from tests.conftest import BOTH_BACKENDS

HOSTS = {
    "hooks.example.com": ["93.184.216.34"],
    "sneaky.example.com": ["93.184.216.34", "10.1.2.3"],
    "metadata.example.com": ["169.254.169.254"],
}


@pytest.fixture(autouse=True)
def fake_dns(app: FastAPI) -> None:
    """Host names resolve from this table (the sandbox has no DNS); IP literals are checked
    without any."""
    app.state.resolve_host = lambda host: HOSTS[host]


async def register(api: Api, url: str, events: Any = None, **extra: Any) -> Any:
    return await api.request(
        "POST",
        "/v1/event-endpoints",
        scope="admin",
        json={"url": url, "enabled_events": events or ["*"], **extra},
    )


async def test_register_shows_the_secret_once_and_refuses_the_same_url_again(api: Api) -> None:
    created = await register(api, "https://hooks.example.com/billing", ["invoice.paid"])
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["secret"].startswith("bwhsec_") and len(body["secret"]) > 40
    assert body["enabled"] is True and body["enabled_events"] == ["invoice.paid"]
    listed = await api.request("GET", "/v1/event-endpoints", scope="admin")
    assert listed.status_code == 200
    assert [e["id"] for e in listed.json()["data"]] == [body["id"]]
    assert "secret" not in listed.text and body["secret"] not in listed.text
    # Twenty at once for the same URL: one endpoint, every other answer names it.
    answers = await asyncio.gather(
        *(register(api, "https://hooks.example.com/other") for _ in range(20))
    )
    codes = sorted(a.status_code for a in answers)
    assert codes == [201] + [409] * 19
    winner = next(a.json()["id"] for a in answers if a.status_code == 201)
    assert all(winner in a.json()["error"]["message"] for a in answers if a.status_code == 409)
    listed = await api.request("GET", "/v1/event-endpoints", scope="admin")
    assert len(listed.json()["data"]) == 2
    # Disable and enable.
    patched = await api.request(
        "PATCH", f"/v1/event-endpoints/{body['id']}", scope="admin", json={"enabled": False}
    )
    assert patched.status_code == 200 and patched.json()["enabled"] is False
    assert patched.json()["disabled_reason"] == "disabled through the API"


@pytest.mark.parametrize(
    ("url", "events", "message"),
    [
        ("http://hooks.example.com/x", ["*"], "url must use https:// outside dev"),
        ("ftp://hooks.example.com/x", ["*"], "url must start with https://"),
        ("https://127.0.0.1/x", ["*"], "private, loopback or link-local"),
        ("https://10.0.0.8/x", ["*"], "private, loopback or link-local"),
        ("https://[::1]/x", ["*"], "private, loopback or link-local"),
        ("https://[::ffff:192.168.0.1]/x", ["*"], "private, loopback or link-local"),
        ("https://localhost/x", ["*"], "localhost"),
        ("https://sneaky.example.com/x", ["*"], "resolves to 10.1.2.3"),
        ("https://metadata.example.com/x", ["*"], "resolves to 169.254.169.254"),
        ("https://user:pw@hooks.example.com/x", ["*"], "must not contain credentials"),
        ("https://hooks.example.com/\x00", ["*"], "control characters"),
        # (10,000 characters are over this app's body limit: 413 before any field is read.)
        ("https://hooks.example.com/" + "a" * 2_500, ["*"], "at most 2000 characters"),
        ("https://hooks.example.com/x", ["invoice.pai"], "unknown event type 'invoice.pai'"),
        ("https://hooks.example.com/x", [], "at least 1 item"),
    ],
)
async def test_bad_endpoints_are_refused_clearly_and_write_nothing(
    api: Api, url: str, events: list[str], message: str
) -> None:
    answer = await api.request(
        "POST",
        "/v1/event-endpoints",
        scope="admin",
        json={"url": url, "enabled_events": events},
    )
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert message in error["message"], error
    listed = await api.request("GET", "/v1/event-endpoints", scope="admin")
    assert listed.json()["data"] == []


async def test_endpoints_need_the_admin_scope(api: Api) -> None:
    for scope in ("finance", "signup"):
        answer = await api.request(
            "POST",
            "/v1/event-endpoints",
            scope=scope,
            json={"url": "https://hooks.example.com/y", "enabled_events": ["*"]},
        )
        assert answer.status_code == 403, answer.text


@BOTH_BACKENDS
async def test_events_page_by_keyset_with_the_objects_the_api_shows(api: Api) -> None:
    endpoint = (await register(api, "https://hooks.example.com/billing")).json()
    sub = await api.signed_up(card=SUCCEEDS)
    await api.harness.wait_for(sub["id"], lambda v: v.invoices_issued == 1 and not v.open_invoice)

    async def page_through(limit: int) -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": limit, "subscription_id": sub["id"]}
            if cursor:
                params["cursor"] = cursor
            answer = await api.request("GET", "/v1/events", scope="finance", params=params)
            assert answer.status_code == 200, answer.text
            body = answer.json()
            seen += body["data"]
            cursor = body["next_cursor"]
            if not body["has_more"]:
                return seen

    events = await page_through(2)
    assert [e["type"] for e in events][:4] == [
        "subscription.created",
        "invoice.created",
        "invoice.finalized",
        "invoice.paid",
    ]
    assert [e["sequence"] for e in events] == list(range(1, len(events) + 1))
    assert len({e["id"] for e in events}) == len(events)
    paid = next(e for e in events if e["type"] == "invoice.paid")
    invoice = (
        await api.request("GET", f"/v1/invoices/{paid['data']['object']['id']}", scope="finance")
    ).json()
    shown = paid["data"]["object"]
    assert shown["status"] == "paid" and shown["amount_paid_minor"] == invoice["amount_paid_minor"]
    assert {k: v for k, v in invoice.items() if k not in ("attempts", "payments")} == shown
    # Deliveries: one per event for the endpoint, pending (no delivery worker here).
    detail = (await api.request("GET", f"/v1/events/{paid['id']}", scope="finance")).json()
    assert [(d["endpoint_id"], d["status"]) for d in detail["deliveries"]] == [
        (endpoint["id"], "pending")
    ]
    again = await api.request("POST", f"/v1/events/{paid['id']}/redeliver", scope="admin", json={})
    assert again.status_code == 200 and len(again.json()["deliveries"]) == 1
    missing = await api.request("GET", "/v1/events/evt_nope", scope="finance")
    assert missing.status_code == 404
    bad = await api.request("GET", "/v1/events", scope="finance", params={"cursor": "x\x00"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "cursor"
    wrong_type = await api.request(
        "GET", "/v1/events", scope="finance", params={"type": "invoice.pai"}
    )
    assert wrong_type.status_code == 422


async def test_mails_are_visible_with_their_status_and_preferences_can_be_set(api: Api) -> None:
    sub = await api.signed_up(card=DECLINES_AFTER_ATTACH)
    await api.harness.wait_for(sub["id"], lambda v: v.status == "past_due")
    customer_id = sub["customer_id"]
    mails = await api.request(
        "GET", "/v1/notifications", scope="finance", params={"customer_id": customer_id}
    )
    assert mails.status_code == 200, mails.text
    kinds = [(m["kind"], m["status"], m["attempts"]) for m in mails.json()["data"]]
    assert kinds == [("payment_failed", "pending", 0)]
    nothing = await api.request("GET", "/v1/notifications", scope="finance")
    assert nothing.status_code == 422
    prefs = await api.request(
        "PUT",
        f"/v1/customers/{customer_id}/mail-preferences",
        scope="admin",
        json={"locale": "de-CH", "opt_out_non_essential": True},
    )
    assert prefs.status_code == 200, prefs.text
    assert prefs.json() == {
        "customer_id": customer_id,
        "locale": "de-CH",
        "opt_out_non_essential": True,
    }
    for body, field in (
        ({"locale": "de\x00"}, "locale"),
        ({"locale": "x" * 3_000}, "locale"),
        ({"locale": "zz-ZZ"}, "locale"),  # a tag's shape, but no CLDR locale
        ({"opt_out_non_essential": "yes"}, "opt_out_non_essential"),
        ({"opt_in": True}, "opt_in"),
    ):
        refused = await api.request(
            "PUT", f"/v1/customers/{customer_id}/mail-preferences", scope="admin", json=body
        )
        assert refused.status_code == 422, (body, refused.text)
        assert field in (refused.json()["error"]["field"] or ""), refused.json()
    unknown = await api.request(
        "PUT", "/v1/customers/cus_nope/mail-preferences", scope="admin", json={}
    )
    assert unknown.status_code == 404


BODY_ROUTES = [
    ("POST", "/v1/event-endpoints"),
    ("PATCH", "/v1/event-endpoints/{id}"),
    ("POST", "/v1/events/{id}/redeliver"),
    ("PUT", "/v1/customers/{id}/mail-preferences"),
]


@pytest.mark.parametrize(("method", "route"), BODY_ROUTES)
async def test_bodies_that_are_not_json_are_refused_as_documented(
    api: Api, app: FastAPI, method: str, route: str
) -> None:
    """Every route that reads a body answers JSON that does not parse with 400, a body that
    is not JSON with 415, and documents both (and 413), as the other write routes do; the
    event types are documented as the enum they are checked against."""
    path = route.replace("{id}", "evt_0")
    broken = await api.request(
        method,
        path,
        scope="admin",
        content=b"\x00",
        headers={"Content-Type": "application/json"},
    )
    assert broken.status_code == 400, broken.text
    assert broken.json()["error"]["type"] == "malformed_json"
    not_json = await api.request(
        method, path, scope="admin", content=b"url=x", headers={"Content-Type": "text/plain"}
    )
    assert not_json.status_code == 415, not_json.text
    documented = app.openapi()["paths"][route][method.lower()]["responses"]
    assert {"400", "413", "415", "422"} <= set(documented), sorted(documented)
    listed = await api.request("GET", "/v1/event-endpoints", scope="admin")
    assert listed.json()["data"] == []


async def test_the_document_lists_the_event_types_an_endpoint_accepts(
    api: Api, app: FastAPI
) -> None:
    schemas = app.openapi()["components"]["schemas"]
    for name in ("EndpointIn", "EndpointPatchIn"):
        field = schemas[name]["properties"]["enabled_events"]
        [items] = [f["items"] for f in field.get("anyOf", [field]) if f.get("type") == "array"]
        assert "invoice.paid" in items["enum"] and "*" in items["enum"]
        # Each listed type is accepted.
        created = await register(api, f"https://hooks.example.com/{name}", items["enum"])
        assert created.status_code == 201, created.text


SETTLEMENT_TYPES = [
    "credit_note.created",
    "refund.created",
    "refund.updated",
    "refund.succeeded",
    "refund.failed",
    "dispute.created",
    "dispute.updated",
    "dispute.closed",
    "payout.paid",
    "payout.failed",
    "payout.canceled",
    "payout.reconciliation_completed",
]


async def test_endpoints_take_the_settlement_event_types_and_refuse_unknown_ones_clearly(
    api: Api, app: FastAPI
) -> None:
    created = await register(api, "https://hooks.example.com/settlement", SETTLEMENT_TYPES)
    assert created.status_code == 201, created.text
    assert created.json()["enabled_events"] == SETTLEMENT_TYPES
    patched = await api.request(
        "PATCH",
        f"/v1/event-endpoints/{created.json()['id']}",
        scope="admin",
        json={"enabled_events": ["payout.paid", "dispute.closed"]},
    )
    assert patched.status_code == 200, patched.text
    schemas = app.openapi()["components"]["schemas"]
    field = schemas["EndpointIn"]["properties"]["enabled_events"]
    assert set(SETTLEMENT_TYPES) <= set(field["items"]["enum"])
    # Stripe's names for what we call dispute.* and refund.*: refused, naming ours.
    for unknown in ("charge.dispute.created", "charge.refunded", "payout.created"):
        refused = await register(api, "https://hooks.example.com/stripe-names", [unknown])
        assert refused.status_code == 422, refused.text
        message = refused.json()["error"]["message"]
        assert f"unknown event type {unknown!r}" in message
        assert "dispute.created" in message and "payout.reconciliation_completed" in message
        again = await api.request(
            "PATCH",
            f"/v1/event-endpoints/{created.json()['id']}",
            scope="admin",
            json={"enabled_events": [unknown]},
        )
        assert again.status_code == 422 and unknown in again.json()["error"]["message"]
    listed = await api.request(
        "GET", "/v1/events", scope="finance", params={"type": "charge.dispute.created"}
    )
    assert listed.status_code == 422


@BOTH_BACKENDS
async def test_contact_email_and_descriptions_are_checked_at_the_edge(api: Api) -> None:
    """The address told when an endpoint is disabled: one bare address, no NUL, bounded;
    emoji and 500-character descriptions are stored as given on both databases; a refusal
    writes nothing."""
    for bad, message in (
        ("not-an-address", "contact_email must be one e-mail address"),
        ("a@b.c, d@e.f", "contact_email must be one e-mail address"),
        ("Ops <ops@shop.example>", "contact_email must be one e-mail address"),
        ("ops\x00@shop.example", "contact_email"),
        ("o" * 400 + "@shop.example", "contact_email"),
    ):
        refused = await register(api, "https://hooks.example.com/c", contact_email=bad)
        assert refused.status_code == 422, (bad, refused.text)
        error = refused.json()["error"]
        assert message in error["message"] or error["field"] == "contact_email", error
    assert (await api.request("GET", "/v1/event-endpoints", scope="admin")).json()["data"] == []
    description = "Ünïcödé \U0001f600 " + "d" * 480
    created = await register(
        api,
        "https://hooks.example.com/c",
        contact_email="ops@shop.example",
        description=description,
    )
    assert created.status_code == 201, created.text
    endpoint = created.json()
    assert endpoint["contact_email"] == "ops@shop.example"
    assert endpoint["description"] == description
    path = f"/v1/event-endpoints/{endpoint['id']}"
    for body in (
        {"contact_email": "x\x00y@shop.example"},
        {"contact_email": "two@a.example three@b.example"},
        {"description": "no NUL \x00 here"},
        {"description": "d" * 10_000},
    ):
        refused = await api.request("PATCH", path, scope="admin", json=body)
        assert refused.status_code in (413, 422), (body, refused.text)
    listed = (await api.request("GET", "/v1/event-endpoints", scope="admin")).json()["data"]
    assert listed[0]["contact_email"] == "ops@shop.example"
    assert listed[0]["description"] == description
    changed = await api.request(
        "PATCH", path, scope="admin", json={"contact_email": "billing-ops@shop.example"}
    )
    assert changed.status_code == 200 and changed.json()["contact_email"] == (
        "billing-ops@shop.example"
    )
    cleared = await api.request("PATCH", path, scope="admin", json={"contact_email": ""})
    assert cleared.status_code == 200 and cleared.json()["contact_email"] is None
    for body, message in (
        ({"url": "http://hooks.example.com/c2"}, "https://"),
        ({"url": "https://metadata.example.com/c2"}, "169.254.169.254"),
        ({"enabled_events": ["invoice.nope"]}, "invoice.nope"),
        ({"enabled": "yes"}, "enabled"),
    ):
        refused = await api.request("PATCH", path, scope="admin", json=body)
        assert refused.status_code == 422, (body, refused.text)
        assert message in refused.text, (body, refused.text)
    unknown = await api.request(
        "POST", "/v1/events/evt_nope/redeliver", scope="admin", json={"endpoint_id": "we_x"}
    )
    assert unknown.status_code == 404, unknown.text


async def test_redelivery_twenty_times_at_once_queues_one_delivery(api: Api) -> None:
    endpoint = (await register(api, "https://hooks.example.com/r")).json()
    sub = await api.signed_up(card=SUCCEEDS)
    await api.harness.wait_for(sub["id"], lambda v: v.invoices_issued == 1 and not v.open_invoice)
    events = (
        await api.request(
            "GET", "/v1/events", scope="finance", params={"subscription_id": sub["id"]}
        )
    ).json()["data"]
    paid = next(e for e in events if e["type"] == "invoice.paid")
    path = f"/v1/events/{paid['id']}/redeliver"
    answers = await asyncio.gather(
        *(
            api.request("POST", path, scope="admin", json={"endpoint_id": endpoint["id"]})
            for _ in range(20)
        )
    )
    assert {a.status_code for a in answers} == {200}, [a.text for a in answers]
    detail = (await api.request("GET", f"/v1/events/{paid['id']}", scope="finance")).json()
    assert [(d["endpoint_id"], d["status"]) for d in detail["deliveries"]] == [
        (endpoint["id"], "pending")
    ]
    mails = await api.request(
        "GET", "/v1/notifications", scope="finance", params={"kind": "endpoint_disabled"}
    )
    assert mails.status_code == 200 and mails.json()["data"] == []
    unknown_kind = await api.request(
        "GET", "/v1/notifications", scope="finance", params={"kind": "nope"}
    )
    assert unknown_kind.status_code == 422
