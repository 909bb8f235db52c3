"""Odd text at every write endpoint, through the real API, on SQLite and on PostgreSQL.

Hypothesis generates text that databases and JSON disagree about: NUL and other control
characters, lone surrogates (``"\\ud800"``, which JSON's escapes allow), ten thousand
characters, emoji with modifiers and joiners, right-to-left text and direction overrides, card
numbers. Each value goes into one field of a real request (sent as JSON with ASCII escapes, as
any client may), and the answer must be:

- never a 5xx;
- for text the database cannot store (NUL, a lone surrogate, longer than the field's column),
  422 naming the field, and nothing written;
- for plainly printable text within bounds, accepted, and read back exactly as sent.

The oracle below is written from what the databases do, not from billing.text, so a rule that
drifted from the databases would show here. ``BILLING_TEXT_EXAMPLES`` raises the budget.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import unicodedata
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
import pytest
from fastapi import FastAPI
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from billing.api import create_app
from billing.contracts import SubscriptionMessage, SubscriptionView, workflow_id_for
from billing.testing.cards import SUCCEEDS
from billing.testing.harness import BillingHarness
from db.repositories import customers as customers_repo
from db.repositories import subscriptions as subscriptions_repo
from tests.api.support import Api, api_settings, auth

BODY_LIMIT = 64 * 1024
EXAMPLES = int(os.environ.get("BILLING_TEXT_EXAMPLES", "20"))
SEED = 20261201

pytestmark = pytest.mark.parametrize("backend", ["sqlite", "postgres"])


@pytest.fixture
def app(harness: BillingHarness) -> FastAPI:
    """The production body limit (64 KiB), so ten thousand characters reach the field checks
    (the other API tests use a small limit to test the limit)."""
    settings = api_settings(harness).model_copy(update={"api_max_body_bytes": BODY_LIMIT})
    return create_app(settings, deps=harness.deps, temporal=harness.client)


_T = TypeVar("_T")

#: Characters no JSON parser or database agrees on, and some that every one must keep.
_ODD = [
    "\x00",
    "\ud800",
    "\udfff",
    "\x1b",
    "\x7f",
    "\n",
    "\t",
    "\r",
    "\u202e",  # right-to-left override
    "\u200f",  # right-to-left mark
    "\ufeff",
    "\ufffd",
    "👍🏽",
    "👨‍👩‍👧",
    "🇫🇷",
    "ع",
    "ש",
    "é",
    "e\u0301",
]
_CHARS = st.one_of(
    st.characters(),  # any code point but a surrogate
    st.characters(categories=["Cc", "Cs"]),  # controls (NUL included) and lone surrogates
    st.sampled_from(_ODD),
)
HOSTILE = st.one_of(
    st.lists(_CHARS, max_size=30).map("".join),
    # Around and far over every column's bound, in one- and several-unit characters.
    st.builds(
        lambda char, n: char * n,
        st.sampled_from(["a", "é", "👍", "ع"]),
        st.sampled_from([40, 41, 63, 64, 65, 100, 101, 200, 201, 320, 321, 500, 501, 10_000]),
    ),
    st.sampled_from(
        [
            "x" * 10_000,
            "a\x00b",
            "\ud800",
            "مرحبا بالعالم",
            "שלום עולם",
            "Ŝtopiĝu 👋🏾 \u202eevil",
            "4242 4242 4242 4242",
            "line one\nline two\ttabbed",
        ]
    ),
)


def db_refuses(value: str, column_length: int) -> bool:
    """What SQLite or PostgreSQL would refuse, or store differently: NUL (PostgreSQL), a lone
    surrogate (no UTF-8 for it), more characters than the VARCHAR's length (PostgreSQL)."""
    return (
        "\x00" in value
        or any(0xD800 <= ord(c) <= 0xDFFF for c in value)
        or len(value) > column_length
    )


def plainly_fine(value: str, column_length: int) -> bool:
    """Printable text (no control characters at all), within bounds and not long enough in
    digits to be a card number: every field must accept it."""
    return (
        0 < len(value) <= column_length
        and all(unicodedata.category(c) not in ("Cc", "Cs") for c in value)
        and sum(c in "0123456789" for c in value) < 13
    )


def run_examples(
    loop: asyncio.AbstractEventLoop, check: Callable[..., Awaitable[None]], *strategies: Any
) -> Callable[[], None]:
    """A derandomized hypothesis run of ``check`` (a coroutine on the test's loop), to be
    called in a thread: the API and the harness stay on the loop that owns them."""

    @seed(SEED)
    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.tuples(*strategies))
    def run(values: tuple[Any, ...]) -> None:
        asyncio.run_coroutine_threadsafe(check(*values), loop).result(timeout=120)

    return run


async def post_json(
    api: Api, path: str, body: Any, *, scope: str, **headers: str
) -> httpx.Response:
    # ASCII escapes: "\ud800" is valid JSON text, though no UTF-8 encoder can write it raw.
    await api.harness.now()
    started = time.monotonic()
    content = json.dumps(body)
    response = await api.http.post(
        path,
        content=content,
        headers={"Content-Type": "application/json", **auth(scope), **headers},
    )
    assert response.status_code < 500, (path, body, response.status_code, response.text)
    if response.status_code == 413:
        # Only a body over the limit: 10,000 emoji in JSON escapes are 120 KB.
        assert len(content.encode()) > BODY_LIMIT, response.text
    if response.status_code == 422:
        # Refused at the edge, at once: nothing waited on a workflow or a retry.
        assert time.monotonic() - started < 10
    return response


def refused_for(response: httpx.Response, field: str) -> bool:
    """Whether the text was refused: 422 naming ``field`` (checked), or 413 for a body over the
    size limit (checked by ``post_json``)."""
    if response.status_code == 413:
        return True
    if response.status_code != 422:
        return False
    error = response.json()["error"]
    assert error["field"] == field, (field, error)
    assert error["message"], error
    return True


# ---- signup ---------------------------------------------------------------------------------


async def test_signup_text_is_refused_with_its_field_or_stored_exactly(api: Api) -> None:
    harness = api.harness
    counts: dict[str, int] = {"refused": 0, "stored": 0}

    async def check(field: str, value: str) -> None:
        card = await harness.to_thread_card(SUCCEEDS)
        customer: dict[str, Any] = {"timezone": "UTC"}
        unique = uuid.uuid4().hex[:8]
        if field == "external_id":
            # A fresh customer each time (an existing external id links to its customer).
            sent = f"{unique}{value}"
            customer["external_id"] = sent
            bound = 200
        elif field == "email":
            sent = f"{value}@example.com"
            customer["email"] = sent
            bound = 320
        else:
            sent = value
            customer["name"] = sent
            customer["external_id"] = unique
            bound = 200
        response = await post_json(
            api,
            "/v1/subscriptions",
            {"plan": "basic-monthly", "payment_method_id": card, "customer": customer},
            scope="signup",
        )
        if db_refuses(sent, bound):
            assert refused_for(response, f"customer.{field}"), response.text
        if refused_for(response, f"customer.{field}"):
            counts["refused"] += 1
            return
        if field != "email" and plainly_fine(sent, bound):
            assert response.status_code == 201, (sent, response.text)
        if response.status_code != 201:
            return
        body = response.json()
        await harness.track(body["id"])

        def stored() -> Any:
            with harness.session_factory() as session:
                return customers_repo.get_customer(session, body["customer_id"])

        record = await asyncio.to_thread(stored)
        assert getattr(record, field) == sent
        counts["stored"] += 1

    loop = asyncio.get_running_loop()
    for field in ("name", "external_id", "email"):
        await asyncio.to_thread(run_examples(loop, check, st.just(field), HOSTILE))
    assert counts["refused"] and counts["stored"], counts


#: The column each reference field is stored in or compared with (db/models.py).
COLUMN_LENGTHS = {"plan": 63, "customer_id": 40, "payment_method_id": 100, "customer.timezone": 64}


async def test_signup_reference_fields_never_fail_with_odd_text(api: Api) -> None:
    """plan, customer_id, payment_method_id and timezone name things that must exist: odd text
    is refused with the field (422, or 404 for an unknown customer), never a 5xx."""

    async def check(field: str, value: str) -> None:
        body: dict[str, Any] = {
            "plan": "basic-monthly",
            "payment_method_id": "pm_card_visa",
            "customer": {"timezone": "UTC"},
        }
        if field == "timezone":
            body["customer"]["timezone"] = value
            field = "customer.timezone"
        else:
            body[field] = value
        response = await post_json(api, "/v1/subscriptions", body, scope="signup")
        assert response.status_code in (402, 404, 422), response.text
        error = response.json()["error"]
        if db_refuses(value, COLUMN_LENGTHS[field]):
            assert response.status_code == 422 and error["field"] == field, error
        if response.status_code == 422 and error["field"] is not None:
            assert error["field"] == field, error

    loop = asyncio.get_running_loop()
    for field in ("plan", "customer_id", "payment_method_id", "timezone"):
        await asyncio.to_thread(run_examples(loop, check, st.just(field), HOSTILE))


async def test_an_idempotency_key_the_database_cannot_store_is_refused(api: Api) -> None:
    card = await api.harness.to_thread_card(SUCCEEDS)
    body = {"plan": "basic-monthly", "payment_method_id": card, "customer": {"timezone": "UTC"}}
    for key in ("k" * 201, "key\x00", "key\x1b[31m"):
        # In-process: the bytes reach the app as sent (a server's HTTP parser may refuse some).
        response = await api.request(
            "POST", "/v1/subscriptions", scope="signup", json=body, headers={"Idempotency-Key": key}
        )
        assert response.status_code == 422, (key, response.text)
        assert response.json()["error"]["field"] == "Idempotency-Key"


# ---- changes --------------------------------------------------------------------------------


async def _live_view(api: Api, subscription_id: str) -> SubscriptionView:
    handle = api.harness.client.get_workflow_handle(workflow_id_for(subscription_id))
    view: SubscriptionView = await handle.query(
        SubscriptionMessage.GET_STATE, result_type=SubscriptionView
    )
    return view


async def test_cancel_reasons_are_refused_with_the_field_or_stored_exactly(api: Api) -> None:
    current = {"id": (await api.signed_up(card=SUCCEEDS))["id"]}
    counts = {"refused": 0, "stored": 0}

    async def check(reason: str) -> None:
        subscription_id = current["id"]
        response = await post_json(
            api, f"/v1/subscriptions/{subscription_id}/cancel", {"reason": reason}, scope="admin"
        )
        if db_refuses(reason, 500):
            assert refused_for(response, "reason"), response.text
        if refused_for(response, "reason"):
            counts["refused"] += 1
            # Nothing reached the workflow: it is not canceling.
            assert not (await _live_view(api, subscription_id)).cancel_at_period_end
            return
        if plainly_fine(reason, 500):
            assert response.status_code == 200, (reason, response.text)
        if response.status_code != 200:
            return
        read = await api.request("GET", f"/v1/subscriptions/{subscription_id}", scope="admin")
        assert read.json()["cancel_reason"] == (reason or "canceled_at_period_end")
        counts["stored"] += 1
        # The next accepted cancel needs a subscription that is not canceling yet.
        current["id"] = (await api.signed_up(card=SUCCEEDS))["id"]

    await asyncio.to_thread(run_examples(asyncio.get_running_loop(), check, HOSTILE))
    assert counts["refused"] and counts["stored"], counts


async def test_pause_and_resume_reasons_are_refused_with_the_field_or_accepted(api: Api) -> None:
    # In a trial: no invoice, so nothing past due ever refuses a pause.
    subscription_id = (await api.signed_up(card=SUCCEEDS, trial_days=30))["id"]
    base = f"/v1/subscriptions/{subscription_id}"

    async def check(pause_reason: str, resume_reason: str) -> None:
        paused = await post_json(api, f"{base}/pause", {"reason": pause_reason}, scope="admin")
        if db_refuses(pause_reason, 500):
            assert refused_for(paused, "reason"), paused.text
        if refused_for(paused, "reason"):
            assert (await _live_view(api, subscription_id)).status == "trialing"
            return
        assert paused.status_code == 200, paused.text
        resumed = await post_json(api, f"{base}/resume", {"reason": resume_reason}, scope="admin")
        if db_refuses(resume_reason, 500):
            assert refused_for(resumed, "reason"), resumed.text
        if refused_for(resumed, "reason"):
            assert (await _live_view(api, subscription_id)).status == "paused"
            resumed = await post_json(api, f"{base}/resume", {}, scope="admin")
        assert resumed.status_code == 200, resumed.text

    await asyncio.to_thread(run_examples(asyncio.get_running_loop(), check, HOSTILE, HOSTILE))


async def test_payment_method_ids_with_odd_text_never_fail(api: Api) -> None:
    subscription_id = (await api.signed_up(card=SUCCEEDS))["id"]
    path = f"/v1/subscriptions/{subscription_id}/payment-method"

    async def check(value: str) -> None:
        response = await post_json(api, path, {"payment_method_id": value}, scope="admin")
        if db_refuses(value, 100) or not value.strip():
            assert refused_for(response, "payment_method_id"), response.text

    await asyncio.to_thread(run_examples(asyncio.get_running_loop(), check, HOSTILE))


async def test_a_lone_surrogate_in_a_field_name_is_refused_not_a_server_error(api: Api) -> None:
    response = await post_json(
        api, "/v1/subscriptions", {"plan": "basic-monthly", "\ud800": 1}, scope="signup"
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["type"] == "invalid_input"


# ---- the cancel-reason NUL, end to end ------------------------------------------------------


async def test_a_nul_in_a_cancel_reason_is_refused_at_once_and_changes_nothing(api: Api) -> None:
    harness = api.harness
    subscription_id = (await api.signed_up(card=SUCCEEDS))["id"]
    before = await _live_view(api, subscription_id)
    started = time.monotonic()
    response = await post_json(
        api,
        f"/v1/subscriptions/{subscription_id}/cancel",
        {"at_period_end": False, "reason": "fraud\x00"},
        scope="admin",
    )
    assert time.monotonic() - started < 5
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == "reason" and "NUL" in error["message"], error
    after = await _live_view(api, subscription_id)
    assert (after.status, after.cancel_at_period_end, after.ended_at) == (
        before.status,
        before.cancel_at_period_end,
        before.ended_at,
    )

    def record() -> Any:
        with harness.session_factory() as session:
            return subscriptions_repo.get_subscription(session, subscription_id)

    stored = await asyncio.to_thread(record)
    assert (stored.status, stored.cancel_reason) == ("active", None)
    # The workflow never saw it: no update in its history.
    history = await harness.client.get_workflow_handle(
        workflow_id_for(subscription_id)
    ).fetch_history()
    assert not [
        e
        for e in history.events
        if e.HasField("workflow_execution_update_accepted_event_attributes")
    ]
    # And it still takes a valid cancel.
    ok = await post_json(
        api,
        f"/v1/subscriptions/{subscription_id}/cancel",
        {"at_period_end": False, "reason": "fraud"},
        scope="admin",
    )
    assert ok.status_code == 200, ok.text
    assert (await asyncio.to_thread(record)).cancel_reason == "fraud"
