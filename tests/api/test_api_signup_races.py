"""POST /v1/subscriptions under races (issue 11, findings 7 and 8b): many signups at once for
one new customer, with and without one Idempotency-Key, and the same key from two API keys.

Each request answers 201, 200 (a replay) or 409 with the reason; never 5xx. One customer row
and one provider customer result, and the card is attached to that customer once."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from datetime import timedelta
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import func, select
from temporalio.service import RPCError, RPCStatusCode

from billing.api import create_app
from billing.settings import ApiKey
from billing.subscription import SubscriptionStatus
from billing.testing.cards import SUCCEEDS
from billing.testing.harness import BillingHarness
from db import models
from tests.api.support import API_KEYS, Api, api_settings, auth, workflow_exists
from tests.conftest import BOTH_BACKENDS

PARALLEL = 20


def customers_with_external_id(harness: BillingHarness, external_id: str) -> list[str]:
    with harness.session_factory() as session:
        return list(
            session.scalars(
                select(models.CustomerRow.id).where(models.CustomerRow.external_id == external_id)
            )
        )


def subscription_ids_of(harness: BillingHarness, customer_id: str) -> set[str]:
    with harness.session_factory() as session:
        return set(
            session.scalars(
                select(models.SubscriptionRow.id).where(
                    models.SubscriptionRow.customer_id == customer_id
                )
            )
        )


def provider_customers(harness: BillingHarness, email: str) -> list[Any]:
    """The localstripe customers with ``email`` (unique per test: localstripe is shared)."""
    return list(harness.stripe.v1.customers.list(params={"email": email, "limit": 100}).data)


async def parallel_signups(
    api: Api, body: dict[str, Any], keys: list[str | None]
) -> list[httpx.Response]:
    async def one(key: str | None) -> httpx.Response:
        headers = {**auth("signup"), **({"Idempotency-Key": key} if key else {})}
        return await api.request("POST", "/v1/subscriptions", json=body, headers=headers)

    responses = list(await asyncio.gather(*(one(k) for k in keys)))
    for response in responses:
        if response.status_code in (200, 201):
            sub_id = response.json()["id"]
            if sub_id not in api.harness.started_subscription_ids:
                api.harness.started_subscription_ids.append(sub_id)
    return responses


async def assert_one_customer_everywhere(api: Api, external_id: str, email: str, card: str) -> str:
    rows = customers_with_external_id(api.harness, external_id)
    assert len(rows) == 1, rows
    at_provider = await asyncio.to_thread(provider_customers, api.harness, email)
    assert len(at_provider) == 1, [c.id for c in at_provider]
    assert at_provider[0].metadata["billing_customer_id"] == rows[0]
    # The card is attached to that one customer (and to no other).
    method = await asyncio.to_thread(api.harness.stripe.v1.payment_methods.retrieve, card)
    assert method.customer == at_provider[0].id
    return rows[0]


def assert_no_server_errors(responses: list[httpx.Response], allowed: set[int]) -> Counter[int]:
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) <= allowed, [(r.status_code, r.text) for r in responses]
    for response in responses:
        if response.status_code == 409:
            error = response.json()["error"]
            assert error["type"] in ("signup_in_progress", "idempotency_conflict"), error
            assert "in progress" in error["message"] or "already used" in error["message"]
    return statuses


@BOTH_BACKENDS
@pytest.mark.parametrize("keys", ["none", "distinct"])
async def test_parallel_signups_for_one_new_external_id_make_one_customer(
    api: Api, keys: str
) -> None:
    tag = uuid.uuid4().hex[:10]
    external_id, email = f"race-{tag}", f"race-{tag}@example.test"
    card = await api.harness.to_thread_card(SUCCEEDS)
    body = {
        "plan": "basic-monthly",
        "payment_method_id": card,
        "customer": {"external_id": external_id, "email": email},
    }
    idempotency_keys: list[str | None] = (
        [None] * PARALLEL if keys == "none" else [f"{tag}-{n}" for n in range(PARALLEL)]
    )

    responses = await parallel_signups(api, body, idempotency_keys)

    statuses = assert_no_server_errors(responses, {201, 409})
    assert statuses[201] >= 1
    customer_id = await assert_one_customer_everywhere(api, external_id, email, card)
    created = {r.json()["id"] for r in responses if r.status_code == 201}
    assert len(created) == statuses[201]
    # Every 201 is a real subscription with its workflow; a 409 left nothing behind.
    assert subscription_ids_of(api.harness, customer_id) == created
    for sub_id in created:
        assert await workflow_exists(api.harness, sub_id)
        assert all(r.json()["customer_id"] == customer_id for r in responses if r.is_success)


@BOTH_BACKENDS
async def test_parallel_signups_with_one_idempotency_key_make_one_subscription(
    api: Api,
) -> None:
    tag = uuid.uuid4().hex[:10]
    external_id, email = f"race-{tag}", f"race-{tag}@example.test"
    card = await api.harness.to_thread_card(SUCCEEDS)
    body = {
        "plan": "basic-monthly",
        "payment_method_id": card,
        "customer": {"external_id": external_id, "email": email},
    }

    responses = await parallel_signups(api, body, [f"one-{tag}"] * PARALLEL)

    statuses = assert_no_server_errors(responses, {200, 201, 409})
    assert statuses[201] == 1
    customer_id = await assert_one_customer_everywhere(api, external_id, email, card)
    (sub_id,) = {r.json()["id"] for r in responses if r.status_code in (200, 201)}
    assert subscription_ids_of(api.harness, customer_id) == {sub_id}
    assert await workflow_exists(api.harness, sub_id)
    view = await api.harness.wait_for(sub_id, lambda v: v.invoices_issued == 1)
    assert view.open_invoice is None

    # Sequentially, the same key again is a replay.
    again = await parallel_signups(api, body, [f"one-{tag}"])
    assert again[0].status_code == 200 and again[0].json()["id"] == sub_id


# ---- 8b: idempotency keys belong to the API key that sent them ------------------------------

SECOND_SIGNUP_KEY = "test-second-signup-key-0123456789"


async def test_the_same_idempotency_key_from_two_api_keys_is_two_signups(
    harness: BillingHarness,
) -> None:
    settings = api_settings(harness)
    settings.api_keys.append(
        ApiKey(name="second-signup-key", scope="signup", key=SecretStr(SECOND_SIGNUP_KEY))
    )
    app = create_app(settings, deps=harness.deps, temporal=harness.client)
    transport = httpx.ASGITransport(app=app)
    tag = uuid.uuid4().hex[:10]
    async with httpx.AsyncClient(transport=transport, base_url="http://billing.test") as http:
        cards = {key: await harness.to_thread_card(SUCCEEDS) for key in ("a", "b")}

        async def signup(api_key: str, who: str) -> httpx.Response:
            await harness.now()
            response = await http.post(
                "/v1/subscriptions",
                json={
                    "plan": "basic-monthly",
                    "payment_method_id": cards[who],
                    "customer": {"external_id": f"{who}-{tag}"},
                },
                headers={"Authorization": f"Bearer {api_key}", "Idempotency-Key": "order-1"},
            )
            if response.is_success:
                await harness.track(response.json()["id"])
            return response

        first = await signup(API_KEYS["signup"], "a")
        second = await signup(SECOND_SIGNUP_KEY, "b")

        # Another account's key is another request: created, not a replay and not a conflict.
        assert first.status_code == 201, first.text
        assert second.status_code == 201, second.text
        assert first.json()["id"] != second.json()["id"]
        assert first.json()["customer_id"] != second.json()["customer_id"]
        # Each key still replays its own signup.
        again = await signup(SECOND_SIGNUP_KEY, "b")
        assert again.status_code == 200, again.text
        assert again.json()["id"] == second.json()["id"]
        with harness.session_factory() as session:
            stored = session.scalar(select(func.count()).select_from(models.SubscriptionRow))
            keys = list(session.scalars(select(models.SubscriptionRow.signup_idempotency_key)))
        assert stored == 2
        assert keys == ["order-1", "order-1"]


@BOTH_BACKENDS
async def test_parallel_signups_with_new_cards_leave_one_default_card_both_sides(
    api: Api,
) -> None:
    """Signups for one existing customer, each with its own new card: they take turns, so the
    default card we record is the provider's default too."""
    tag = uuid.uuid4().hex[:10]
    first = await api.signed_up(card=SUCCEEDS, customer={"external_id": f"many-{tag}"})
    customer_id = first["customer_id"]
    cards = [await api.harness.to_thread_card(SUCCEEDS) for _ in range(8)]

    async def one(card: str) -> httpx.Response:
        body = {"plan": "basic-monthly", "payment_method_id": card, "customer_id": customer_id}
        return await api.request("POST", "/v1/subscriptions", scope="signup", json=body)

    responses = list(await asyncio.gather(*(one(card) for card in cards)))
    for response in responses:
        if response.is_success:
            await api.harness.track(response.json()["id"])
    assert_no_server_errors(responses, {201, 409})

    with api.harness.session_factory() as session:
        customer = session.get(models.CustomerRow, customer_id)
    assert customer is not None and customer.signup_lease_token is None
    at_provider = await asyncio.to_thread(
        api.harness.stripe.v1.customers.retrieve, customer.stripe_customer_id
    )
    assert at_provider.invoice_settings.default_payment_method == (
        customer.default_payment_method_id
    )
    assert customer.default_payment_method_id in cards


class FailingStart:
    """The Temporal client, except that subscription workflow starts fail with ``status``
    (nothing starts): DEADLINE_EXCEEDED, unanswered, as when the service is overloaded;
    RESOURCE_EXHAUSTED, refused, as a namespace over its rate limit after the client's own
    retries."""

    def __init__(self, client: Any, status: RPCStatusCode, message: str) -> None:
        self._client, self._status, self._message = client, status, message

    async def start_workflow(self, *args: Any, **kwargs: Any) -> Any:
        raise RPCError(self._message, self._status, b"")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


async def test_an_unconfirmed_start_answers_202_and_the_worker_sweeper_starts_it(
    app: Any, api: Api
) -> None:
    from billing.signup_sweep import PendingSignupSweepInput
    from billing.worker import ensure_signup_sweeper

    app.state.signups.temporal = FailingStart(
        api.harness.client, RPCStatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
    )
    card = await api.harness.to_thread_card(SUCCEEDS)
    response = await api.signup(idempotency_key="unconfirmed-1", payment_method_id=card)

    # Recorded, not confirmed started: 202, pending; a retry with the key answers the same.
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "pending"
    assert not await workflow_exists(api.harness, body["id"])
    again = await api.signup(idempotency_key="unconfirmed-1", payment_method_id=card)
    assert again.status_code == 200, again.text
    assert again.json()["id"] == body["id"] and again.json()["status"] == "pending"

    sweeper = await ensure_signup_sweeper(
        api.harness.client,
        task_queue=api.harness.task_queue,
        sweep=PendingSignupSweepInput(interval_s=60, grace_s=120),
    )
    try:
        await api.harness.advance(timedelta(minutes=4))
        view = await api.harness.wait_for(
            body["id"], lambda v: v.invoices_issued == 1 and v.open_invoice is None
        )
        assert view.status == SubscriptionStatus.ACTIVE
    finally:
        await api.harness.client.get_workflow_handle(sweeper).terminate("test finished")


async def test_a_start_refused_as_busy_answers_503_leaves_nothing_and_the_retry_signs_up(
    app: Any, api: Api
) -> None:
    app.state.signups.temporal = FailingStart(
        api.harness.client, RPCStatusCode.RESOURCE_EXHAUSTED, "namespace rate limit exceeded"
    )
    card = await api.harness.to_thread_card(SUCCEEDS)
    response = await api.signup(idempotency_key="busy-1", payment_method_id=card)

    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["type"] == "temporal_busy"
    assert "namespace rate limit exceeded" in error["message"]
    assert "nothing was changed" in error["message"]
    assert response.headers["Retry-After"] == "5"
    with api.harness.session_factory() as session:
        assert session.scalar(select(func.count()).select_from(models.SubscriptionRow)) == 0

    app.state.signups.temporal = api.harness.client
    again = await api.signup(idempotency_key="busy-1", payment_method_id=card)
    assert again.status_code == 201, again.text
    view = await api.harness.wait_for(
        again.json()["id"], lambda v: v.invoices_issued == 1 and v.open_invoice is None
    )
    assert view.status == SubscriptionStatus.ACTIVE
