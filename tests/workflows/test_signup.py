"""Signup and bad input: each bad request gets a clear error, no workflow starts and nothing
is half-written (database, payment provider, Temporal)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import func, select
from temporalio.service import RPCError, RPCStatusCode

from billing.catalog import create_plan
from billing.contracts import workflow_id_for
from billing.errors import (
    BillingError,
    ChangeRefused,
    IdempotencyConflict,
    InvalidCurrency,
    InvalidInput,
    InvalidTimezone,
    MissingPaymentMethod,
    PaymentMethodRejected,
    UnknownPlan,
)
from billing.ids import subscription_id_for_signup
from billing.signup import CustomerDetails, SignupRequest
from billing.subscription import SubscriptionStatus
from billing.testing.cards import DECLINED_AT_ATTACH, SUCCEEDS
from billing.testing.harness import BillingHarness
from db import models
from tests.conftest import BOTH_BACKENDS

VALID_PLAN: dict[str, Any] = {
    "code": "gold-monthly",
    "name": "Gold",
    "amount_minor": 4900,
    "currency": "USD",
    "interval": "month",
}


def row_counts(harness: BillingHarness) -> dict[str, int]:
    with harness.session_factory() as session:
        return {
            table.__tablename__: session.scalar(select(func.count()).select_from(table)) or 0
            for table in (
                models.CustomerRow,
                models.PlanRow,
                models.SubscriptionRow,
                models.InvoiceRow,
                models.PaymentAttemptRow,
            )
        }


def provider_customer_count(harness: BillingHarness) -> int:
    return len(harness.stripe.v1.customers.list(params={"limit": 100}).data)


async def assert_no_workflow(harness: BillingHarness, subscription_id: str) -> None:
    with pytest.raises(RPCError) as missing:
        await harness.client.get_workflow_handle(workflow_id_for(subscription_id)).describe()
    assert missing.value.status == RPCStatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"amount_minor": -100}, InvalidInput, "amount_minor must not be negative; got -100"),
        ({"amount_minor": 9.99}, InvalidInput, "amount_minor must be an integer"),
        ({"currency": "ABC"}, InvalidCurrency, "unknown currency 'ABC'"),
        ({"currency": "dollars"}, InvalidCurrency, "3-letter ISO 4217 code"),
        ({"interval_count": 0}, InvalidInput, "interval_count must be between 1 and 36"),
        ({"interval": "fortnight"}, InvalidInput, "unknown interval 'fortnight'"),
        ({"trial_days": -1}, InvalidInput, "trial_days must be a whole number between 0"),
        ({"colour": "gold"}, InvalidInput, "unknown plan field 'colour'"),
        ({"dunning": {"retry_offsets_days": [3, 1]}}, InvalidInput, "strictly increasing"),
        ({"dunning": {"final_action": "shrug"}}, InvalidInput, "unknown final_action 'shrug'"),
    ],
)
async def test_bad_plans_are_refused_and_nothing_is_written(
    harness: BillingHarness, change: dict[str, Any], error: type[BillingError], message: str
) -> None:
    before = row_counts(harness)
    with pytest.raises(error) as refused:
        create_plan(harness.session_factory, {**VALID_PLAN, **change})
    assert message in refused.value.message
    assert row_counts(harness) == before


async def test_a_valid_plan_is_created_once(harness: BillingHarness) -> None:
    plan = create_plan(harness.session_factory, VALID_PLAN)
    assert plan.amount_minor == 4900
    # The same terms again: a harmless retry. Other terms under the code: refused (immutable).
    assert create_plan(harness.session_factory, VALID_PLAN) == plan
    with pytest.raises(ChangeRefused, match="already exists"):
        create_plan(harness.session_factory, {**VALID_PLAN, "amount_minor": 1})


def request(**overrides: Any) -> SignupRequest:
    fields: dict[str, Any] = {
        "plan_code": "basic-monthly",
        "customer": CustomerDetails(external_id="acme-42", email="a@example.com"),
        "payment_method_id": None,
        "idempotency_key": "signup-acme-42",
    }
    fields.update(overrides)
    return SignupRequest(**fields)


@BOTH_BACKENDS
@pytest.mark.parametrize(
    ("case", "error", "message"),
    [
        ("unknown_plan", UnknownPlan, "unknown plan 'pro-mnthly'; known plans: basic-monthly"),
        ("no_payment_method", MissingPaymentMethod, "has no payment method"),
        ("card_declined_at_attach", PaymentMethodRejected, "card_declined"),
        ("bad_timezone", InvalidTimezone, "unknown time zone 'Mars/Olympus'"),
        ("anchor_in_the_past", InvalidInput, "the first billing date cannot be in the past"),
        ("negative_trial", InvalidInput, "trial_days must be between 0 and 730"),
    ],
)
async def test_bad_signups_start_nothing_and_write_nothing(
    harness: BillingHarness, case: str, error: type[BillingError], message: str
) -> None:
    now = await harness.now()
    overrides: dict[str, Any] = {"payment_method_id": await harness.to_thread_card(SUCCEEDS)}
    match case:
        case "unknown_plan":
            overrides["plan_code"] = "pro-mnthly"
        case "no_payment_method":
            overrides["payment_method_id"] = None
        case "card_declined_at_attach":
            overrides["payment_method_id"] = await harness.to_thread_card(DECLINED_AT_ATTACH)
        case "bad_timezone":
            overrides["customer"] = CustomerDetails(external_id="acme-42", timezone="Mars/Olympus")
        case "anchor_in_the_past":
            overrides["billing_anchor_at"] = now.replace(year=now.year - 1)
        case "negative_trial":
            overrides["trial_days"] = -3
    rows_before = row_counts(harness)
    customers_before = provider_customer_count(harness)

    with pytest.raises(error) as refused:
        await harness.signups.start_subscription(request(**overrides))

    assert message in refused.value.message
    # Nothing written, here or at the provider: a new customer and its card are one request,
    # which Stripe refuses as a whole when it refuses the card.
    assert row_counts(harness) == rows_before
    await assert_no_workflow(harness, subscription_id_for_signup("signup-acme-42"))
    assert provider_customer_count(harness) == customers_before


@BOTH_BACKENDS
async def test_a_retry_after_a_refused_card_reuses_the_customer(harness: BillingHarness) -> None:
    refused_card = await harness.to_thread_card(DECLINED_AT_ATTACH)
    with pytest.raises(PaymentMethodRejected):
        await harness.signups.start_subscription(request(payment_method_id=refused_card))
    good_card = await harness.to_thread_card(SUCCEEDS)
    result = await harness.signups.start_subscription(request(payment_method_id=good_card))
    await harness.track(result.subscription_id)

    assert result.created
    with harness.session_factory() as session:
        (customer,) = session.scalars(select(models.CustomerRow)).all()
    assert customer.id == result.customer_id
    provider = await asyncio.to_thread(
        harness.stripe.v1.customers.retrieve, customer.stripe_customer_id
    )
    assert provider.metadata["billing_customer_id"] == customer.id
    assert customer.default_payment_method_id == good_card


async def test_signup_is_idempotent_by_key(harness: BillingHarness) -> None:
    pm = await harness.to_thread_card(SUCCEEDS)
    first = await harness.signups.start_subscription(request(payment_method_id=pm))
    again = await harness.signups.start_subscription(request(payment_method_id=pm))
    assert first.created and not again.created
    assert again.subscription_id == first.subscription_id
    assert row_counts(harness)["subscriptions"] == 1
    await harness.track(first.subscription_id)

    with pytest.raises(IdempotencyConflict, match="already used with a different request"):
        await harness.signups.start_subscription(
            request(payment_method_id=pm, plan_code="pro-annual")
        )
    assert row_counts(harness)["subscriptions"] == 1
    view = await harness.wait_for(first.subscription_id, lambda v: v.invoices_issued == 1)
    assert view.status == SubscriptionStatus.ACTIVE
