"""POST /v1/subscriptions: a signup starts a workflow that bills; a retried signup with the
same Idempotency-Key answers the same subscription; bad requests are refused with a clear
message and leave nothing behind (database rows, workflows)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import pytest

from billing.api.auth import api_key_id
from billing.calendar import IntervalUnit
from billing.ids import subscription_id_for_signup
from billing.invoices import InvoiceStatus
from billing.plans import Plan
from billing.subscription import SubscriptionStatus
from billing.testing.cards import DECLINED_AT_ATTACH, SUCCEEDS
from tests.api.support import (
    API_KEYS,
    MAX_BODY_BYTES,
    Api,
    auth,
    row_counts,
    workflow_exists,
)
from tests.cldr import cldr_without
from tests.conftest import BOTH_BACKENDS


def parse(instant: str) -> datetime:
    return datetime.fromisoformat(instant)


async def first_run_id(api: Api, subscription_id: str) -> str:
    """The first run of the workflow's execution chain (continue-as-new keeps it)."""
    history = await api.harness.handle(subscription_id).fetch_history()
    started = history.events[0].workflow_execution_started_event_attributes
    return started.first_execution_run_id or started.original_execution_run_id


async def test_signup_answers_201_and_the_workflow_bills_the_first_invoice(api: Api) -> None:
    now = await api.harness.now()
    response = await api.signup("basic-monthly", card=SUCCEEDS)

    assert response.status_code == 201, response.text
    assert "Idempotent-Replayed" not in response.headers
    body = response.json()
    assert body["id"].startswith("sub_")
    assert body["status"] == "active"
    assert body["plan"] == "basic-monthly"
    assert body["workflow_id"] == f"subscription-{body['id']}"
    assert body["trial_end_at"] is None
    # No trial and no anchor: billed at once; instants come back in UTC with a Z.
    assert body["next_billing_at"].endswith("Z")
    assert abs(parse(body["next_billing_at"]) - now) < timedelta(minutes=1)

    view = await api.harness.wait_for(
        body["id"], lambda v: v.invoices_issued == 1 and v.open_invoice is None
    )
    assert view.status == SubscriptionStatus.ACTIVE
    snap = api.harness.snapshot(body["id"])
    assert [(i.status, i.amount_due_minor, i.currency) for i in snap.invoices] == [
        (InvoiceStatus.PAID, 900, "USD")
    ]
    assert snap.subscription.customer_id == body["customer_id"]


async def test_signup_with_a_trial_reports_its_end(api: Api) -> None:
    body = await api.signed_up("pro-monthly", card=SUCCEEDS)
    assert body["status"] == "trialing"
    assert body["trial_end_at"] is not None
    assert body["next_billing_at"] == body["trial_end_at"]
    assert parse(body["trial_end_at"]) - await api.harness.now() == pytest.approx(
        timedelta(days=14), abs=timedelta(minutes=1)
    )


@BOTH_BACKENDS
async def test_same_idempotency_key_answers_the_same_subscription_once(api: Api) -> None:
    pm = await api.harness.to_thread_card(SUCCEEDS)
    request: dict[str, Any] = {
        "plan": "basic-monthly",
        "payment_method_id": pm,
        "customer": {"external_id": "acme-7", "email": "billing@acme.test"},
    }
    headers = {**auth("signup"), "Idempotency-Key": "acme-7-signup"}

    first = await api.request("POST", "/v1/subscriptions", json=request, headers=headers)
    assert first.status_code == 201, first.text
    sub_id = first.json()["id"]
    api.harness.started_subscription_ids.append(sub_id)
    first_run = await first_run_id(api, sub_id)

    again = await api.request("POST", "/v1/subscriptions", json=request, headers=headers)
    assert again.status_code == 200, again.text
    assert again.headers["Idempotent-Replayed"] == "true"
    replay = again.json()
    for key in ("id", "customer_id", "plan", "workflow_id", "trial_end_at"):
        assert replay[key] == first.json()[key]
    # One subscription, one customer, one workflow: the replay started no new execution.
    counts = row_counts(api.harness)
    assert (counts["subscriptions"], counts["customers"]) == (1, 1)
    assert await first_run_id(api, sub_id) == first_run

    changed = await api.request(
        "POST", "/v1/subscriptions", json={**request, "plan": "pro-annual"}, headers=headers
    )
    assert changed.status_code == 409
    error = changed.json()["error"]
    assert error["type"] == "idempotency_conflict"
    assert "'acme-7-signup' was already used with a different request" in error["message"]
    assert row_counts(api.harness)["subscriptions"] == 1

    view = await api.harness.wait_for(sub_id, lambda v: v.invoices_issued == 1)
    assert view.plan_code == "basic-monthly"


# ---- bad requests ------------------------------------------------------------------------------

KEY = "bad-signup-key"


async def _chunks(data: bytes, size: int = 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def _json(body: dict[str, Any]) -> dict[str, Any]:
    return {"json": body}


BAD_SIGNUPS: list[Any] = [
    # (case, request kwargs from a valid body, status, error type, message)
    pytest.param(
        lambda ok: {
            "content": b'{"plan": "basic-monthly",',
            "headers": {"Content-Type": "application/json"},
        },
        400,
        "malformed_json",
        "malformed JSON: Expecting property name enclosed in double quotes",
        id="malformed-json",
    ),
    pytest.param(
        lambda ok: _json({**ok, "plan": "pro-mnthly"}),
        422,
        "unknown_plan",
        "unknown plan 'pro-mnthly'; known plans: basic-monthly, pro-annual, pro-monthly, "
        "team-weekly, tokyo-monthly",
        id="unknown-plan",
    ),
    pytest.param(
        lambda ok: _json({**ok, "customer": {"timezone": "Mars/Olympus"}}),
        422,
        "invalid_timezone",
        "unknown time zone 'Mars/Olympus'; use an IANA name such as 'Europe/Paris'",
        id="bad-timezone",
    ),
    pytest.param(
        lambda ok: _json({**ok, "trial_days": 731}),
        422,
        "invalid_input",
        "field 'trial_days' input should be less than or equal to 730; got 731",
        id="trial-too-long",
    ),
    pytest.param(
        lambda ok: _json({**ok, "trial_days": -1}),
        422,
        "invalid_input",
        "field 'trial_days' input should be greater than or equal to 0; got -1",
        id="trial-negative",
    ),
    pytest.param(
        lambda ok: _json({**ok, "billing_anchor_at": "2031-01-31T09:00:00"}),
        422,
        "invalid_input",
        "field 'billing_anchor_at' has no time zone ('2031-01-31T09:00:00'); send an ISO 8601 "
        "instant with a zone",
        id="naive-anchor",
    ),
    pytest.param(
        lambda ok: _json({**ok, "billing_anchor_at": 1924940400}),
        422,
        "invalid_input",
        "field 'billing_anchor_at' must be an ISO 8601 instant with a time zone",
        id="anchor-not-text",
    ),
    pytest.param(
        lambda ok: _json({**ok, "colour": "gold"}),
        422,
        "invalid_input",
        "field 'colour' is not a known field; remove it",
        id="unknown-field",
    ),
    pytest.param(
        lambda ok: _json({**ok, "amount_minor": 1}),
        422,
        "invalid_input",
        "field 'amount_minor' is not a known field",
        id="amounts-are-not-accepted",
    ),
    pytest.param(
        lambda ok: _json({k: v for k, v in ok.items() if k != "plan"}),
        422,
        "invalid_input",
        "field 'plan' is required",
        id="missing-plan",
    ),
    pytest.param(
        lambda ok: _json({**ok, "customer": {"email": "not-an-email"}}),
        422,
        "invalid_input",
        "field 'customer.email' must be an email address such as 'pat@example.com'; got "
        "'not-an-email'",
        id="bad-email",
    ),
    pytest.param(
        lambda ok: {"json": ok, "headers": {"Idempotency-Key": "k" * 201}},
        422,
        "invalid_input",
        "header 'Idempotency-Key' string should have at most 200 characters",
        id="idempotency-key-too-long",
    ),
    pytest.param(
        lambda ok: {
            "content": b'{"plan": "' + b"x" * MAX_BODY_BYTES + b'"}',
            "headers": {"Content-Type": "application/json"},
        },
        413,
        "payload_too_large",
        f"request body is larger than the limit of {MAX_BODY_BYTES} bytes",
        id="too-large-content-length",
    ),
    pytest.param(
        lambda ok: {
            "content": _chunks(b'{"plan": "' + b"x" * MAX_BODY_BYTES + b'"}'),
            "headers": {"Content-Type": "application/json"},
        },
        413,
        "payload_too_large",
        f"request body is larger than the limit of {MAX_BODY_BYTES} bytes",
        id="too-large-chunked",
    ),
    pytest.param(
        lambda ok: {"content": b"plan=basic-monthly", "headers": {"Content-Type": "text/plain"}},
        415,
        "unsupported_media_type",
        "Content-Type must be application/json; got 'text/plain'",
        id="wrong-content-type",
    ),
    pytest.param(
        lambda ok: _json({k: v for k, v in ok.items() if k != "payment_method_id"}),
        422,
        "missing_payment_method",
        "has no payment method; pass payment_method_id",
        id="no-payment-method",
    ),
    pytest.param(
        "declined",
        402,
        "payment_method_rejected",
        "card_declined",
        id="card-declined-at-attach",
    ),
]


@pytest.mark.parametrize(("make", "status", "error_type", "message"), BAD_SIGNUPS)
async def test_bad_signups_are_refused_and_leave_nothing_behind(
    api: Api, make: Any, status: int, error_type: str, message: str
) -> None:
    pm = await api.harness.to_thread_card(SUCCEEDS)
    valid: dict[str, Any] = {
        "plan": "basic-monthly",
        "payment_method_id": pm,
        "customer": {"external_id": "acme-42", "email": "a@acme.test"},
    }
    if make == "declined":
        valid["payment_method_id"] = await api.harness.to_thread_card(DECLINED_AT_ATTACH)
        kwargs: dict[str, Any] = {"json": valid}
    else:
        kwargs = make(valid)
    headers = {"Idempotency-Key": KEY, **kwargs.pop("headers", {})}
    before = row_counts(api.harness)

    response = await api.request(
        "POST", "/v1/subscriptions", scope="signup", headers=headers, **kwargs
    )

    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == error_type
    assert message in error["message"]
    assert "Traceback" not in response.text
    # Nothing is written, a refused card included: a new customer and its card are one
    # request to the provider, which it refuses as a whole (no provider customer either).
    assert row_counts(api.harness) == before
    # Keys are scoped to the sending API key: the id this signup would have had.
    scope = api_key_id(API_KEYS["signup"])
    assert not await workflow_exists(api.harness, subscription_id_for_signup(KEY, scope))


async def test_a_catalog_plan_whose_currency_babel_now_refuses_is_not_sold(api: Api) -> None:
    # The catalog row was valid when written; a babel upgrade withdrew its currency. Plans
    # decode without validation (running subscriptions must keep decoding), so signup is the
    # edge that checks the plan it is about to snapshot into a new workflow.
    api.harness.add_plan(Plan("kwd-monthly", "KWD (monthly)", 5000, "KWD", IntervalUnit.MONTH))
    pm = await api.harness.to_thread_card(SUCCEEDS)
    before = row_counts(api.harness)

    with cldr_without("KWD"):
        response = await api.request(
            "POST",
            "/v1/subscriptions",
            scope="signup",
            headers={"Idempotency-Key": KEY},
            json={"plan": "kwd-monthly", "payment_method_id": pm, "customer": {"email": "k@w.d"}},
        )

    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_input"
    assert error["field"] == "plan"
    assert error["message"] == (
        "plan 'kwd-monthly' cannot be sold: unknown currency 'KWD'; use an ISO 4217 code such "
        "as 'USD', 'EUR' or 'JPY'; fix the plan in the catalog (create a new plan code) or "
        "choose another plan"
    )
    assert row_counts(api.harness) == before
    assert not await workflow_exists(api.harness, subscription_id_for_signup(KEY))


async def test_a_field_error_names_the_field(api: Api) -> None:
    response = await api.request(
        "POST",
        "/v1/subscriptions",
        scope="signup",
        json={"plan": "basic-monthly", "customer": {"timezone": 5}},
    )
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "customer.timezone"
