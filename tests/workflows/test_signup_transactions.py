"""A new customer's signup is two database transactions around the provider's one request
(issue 16: signup latency at concurrency 20 is bound by round trips), and folding them keeps
its guarantees: a failure after the provider customer was made keeps that customer's id and
frees the customer, so a retry reuses it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import Engine, event, select

from billing.signup import CustomerDetails, SignupRequest
from billing.testing.cards import SUCCEEDS
from billing.testing.harness import BillingHarness
from db import models
from db.repositories import subscriptions as subscriptions_repo
from tests.conftest import BOTH_BACKENDS


def request(card: str, key: str) -> SignupRequest:
    # Our customer's id derives from the key; localstripe is shared by every test.
    return SignupRequest(
        plan_code="basic-monthly",
        customer=CustomerDetails(external_id=f"ada-{key}", email="ada@example.com"),
        payment_method_id=card,
        idempotency_key=f"signup-{key}",
    )


@contextmanager
def counting_commits(engine: Engine) -> Iterator[list[int]]:
    commits: list[int] = []

    def on_commit(_connection: Any) -> None:
        commits.append(1)

    event.listen(engine, "commit", on_commit)
    try:
        yield commits
    finally:
        event.remove(engine, "commit", on_commit)


def provider_customers(harness: BillingHarness, customer_id: str) -> list[str]:
    """The provider customers made for our ``customer_id`` (localstripe is shared by tests)."""
    listed = harness.stripe.v1.customers.list(params={"limit": 100}).auto_paging_iter()
    return [c.id for c in listed if c.metadata.to_dict().get("billing_customer_id") == customer_id]


def stored_customer(harness: BillingHarness) -> models.CustomerRow:
    with harness.session_factory() as session:
        (customer,) = session.scalars(select(models.CustomerRow)).all()
        return customer


@BOTH_BACKENDS
async def test_a_new_customers_signup_commits_twice(harness: BillingHarness) -> None:
    card = await harness.to_thread_card(SUCCEEDS)
    key = uuid.uuid4().hex
    engine = harness.session_factory.kw["bind"]

    with counting_commits(engine) as commits:
        result = await harness.signups.start_subscription(request(card, key))
    await harness.track(result.subscription_id)

    # The look-up with the claim (customer row and its lease), then the provider customer's
    # id, the card, the pending subscription and the lease let go. Nothing else: a customer
    # this signup created has no other subscription to tell of its card.
    assert (result.created, result.workflow_started, len(commits)) == (True, True, 2)
    customer = stored_customer(harness)
    assert customer.signup_lease_token is None and customer.signup_lease_expires_at is None
    assert customer.stripe_customer_id is not None
    assert customer.default_payment_method_id == card
    made = await asyncio.to_thread(provider_customers, harness, customer.id)
    assert made == [customer.stripe_customer_id]


@BOTH_BACKENDS
async def test_a_failure_after_the_provider_customer_keeps_it_and_a_retry_reuses_it(
    harness: BillingHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    card = await harness.to_thread_card(SUCCEEDS)
    key = uuid.uuid4().hex
    insert = subscriptions_repo.insert_subscription
    failures = [RuntimeError("the database went away mid-signup")]

    def failing_once(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return insert(*args, **kwargs)

    monkeypatch.setattr(subscriptions_repo, "insert_subscription", failing_once)

    with pytest.raises(RuntimeError, match="went away"):
        await harness.signups.start_subscription(request(card, key))

    # The provider customer was made: its id is on our row, which stays, and is free.
    customer = stored_customer(harness)
    [made] = await asyncio.to_thread(provider_customers, harness, customer.id)
    assert customer.stripe_customer_id == made
    assert customer.signup_lease_token is None
    with harness.session_factory() as session:
        assert session.scalars(select(models.SubscriptionRow)).all() == []

    # The retry (same key) reuses it: one provider customer, ever.
    result = await harness.signups.start_subscription(request(card, key))
    await harness.track(result.subscription_id)
    assert result.created and result.customer_id == customer.id
    assert await asyncio.to_thread(provider_customers, harness, customer.id) == [made]
    assert stored_customer(harness).stripe_customer_id == made
