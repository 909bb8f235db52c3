"""Plans: validation at the edge normalizes and refuses; lookups say which plans exist."""

from __future__ import annotations

from typing import Any

import pytest

from billing.calendar import IntervalUnit
from billing.dunning import DEFAULT_RETRY_OFFSETS_DAYS, DunningPolicy, FinalAction
from billing.errors import BillingError, InvalidCurrency, InvalidInput, UnknownPlan
from billing.plans import DEMO_PLANS, MAX_TRIAL_DAYS, Plan, find_plan, validate_plan

VALID: dict[str, Any] = {
    "code": "pro-monthly",
    "name": "Pro (monthly)",
    "amount_minor": 2900,
    "currency": "USD",
    "interval": IntervalUnit.MONTH,
}


def make_plan(**changes: Any) -> Plan:
    return validate_plan(Plan(**{**VALID, **changes}))


def test_valid_plan_normalizes_currency_and_interval() -> None:
    plan = make_plan(currency="usd", interval="Month")

    assert plan.currency == "USD"
    assert plan.interval is IntervalUnit.MONTH
    assert plan.interval_count == 1
    assert plan.trial_days == 0
    assert plan.dunning.retry_offsets_days == list(DEFAULT_RETRY_OFFSETS_DAYS)
    assert plan.dunning.final_action == FinalAction.CANCEL


def test_limits_are_inclusive() -> None:
    assert make_plan(code="a" * 63).code == "a" * 63
    assert make_plan(code="7").code == "7"
    assert make_plan(interval="month", interval_count=36).interval_count == 36
    assert make_plan(interval="year", interval_count=3).interval_count == 3
    assert make_plan(interval="day", interval_count=1095).interval_count == 1095
    assert make_plan(interval="week", interval_count=156).interval_count == 156
    assert make_plan(trial_days=MAX_TRIAL_DAYS).trial_days == MAX_TRIAL_DAYS
    assert make_plan(amount_minor=0).amount_minor == 0


@pytest.mark.parametrize(
    ("changes", "error", "field", "fragment"),
    [
        ({"amount_minor": -1}, InvalidInput, "amount_minor", "got -1"),
        ({"amount_minor": 29.0}, InvalidInput, "amount_minor", "got 29.0"),
        ({"currency": "ABC"}, InvalidCurrency, "currency", "'ABC'"),
        ({"currency": "dollars"}, InvalidCurrency, "currency", "'dollars'"),
        ({"interval": "monthly"}, InvalidInput, "interval", "'monthly'"),
        ({"interval_count": 0}, InvalidInput, "interval_count", "got 0"),
        ({"interval_count": -3}, InvalidInput, "interval_count", "got -3"),
        ({"interval_count": 37}, InvalidInput, "interval_count", "between 1 and 36"),
        ({"interval": "year", "interval_count": 4}, InvalidInput, "interval_count", "got 4"),
        ({"interval": "week", "interval_count": 157}, InvalidInput, "interval_count", "got 157"),
        ({"interval_count": True}, InvalidInput, "interval_count", "got True"),
        ({"interval_count": 1.0}, InvalidInput, "interval_count", "got 1.0"),
        ({"trial_days": -1}, InvalidInput, "trial_days", "got -1"),
        ({"trial_days": MAX_TRIAL_DAYS + 1}, InvalidInput, "trial_days", "got 731"),
        ({"trial_days": 1.5}, InvalidInput, "trial_days", "got 1.5"),
        ({"trial_days": True}, InvalidInput, "trial_days", "got True"),
        ({"code": "Pro Monthly"}, InvalidInput, "code", "'Pro Monthly'"),
        ({"code": ""}, InvalidInput, "code", "got ''"),
        ({"code": "-pro"}, InvalidInput, "code", "'-pro'"),
        ({"code": "pro-monthly\n"}, InvalidInput, "code", "'pro-monthly\\n'"),
        ({"code": "a" * 64}, InvalidInput, "code", "a" * 64),
        ({"code": None}, InvalidInput, "code", "got None"),
        ({"name": ""}, InvalidInput, "name", "got ''"),
        ({"name": "   "}, InvalidInput, "name", "got '   '"),
        ({"name": None}, InvalidInput, "name", "got None"),
    ],
)
def test_invalid_plan_is_refused_naming_the_field_and_value(
    changes: dict[str, Any], error: type[BillingError], field: str, fragment: str
) -> None:
    with pytest.raises(error) as caught:
        make_plan(**changes)

    assert type(caught.value) is error
    assert caught.value.field == field
    assert field.split("_")[0] in caught.value.message
    assert fragment in caught.value.message


def test_plan_with_an_invalid_dunning_policy_cannot_be_built() -> None:
    with pytest.raises(InvalidInput, match="strictly increasing"):
        make_plan(dunning=DunningPolicy(retry_offsets_days=[3, 1]))


def test_find_plan_returns_the_plan_with_that_code() -> None:
    assert find_plan("pro-annual", DEMO_PLANS).interval is IntervalUnit.YEAR
    assert find_plan("tokyo-monthly", {p.code: p for p in DEMO_PLANS}).currency == "JPY"


def test_unknown_plan_lists_the_known_plans() -> None:
    with pytest.raises(UnknownPlan) as caught:
        find_plan("pro-mnthly", DEMO_PLANS)

    assert caught.value.message == (
        "unknown plan 'pro-mnthly'; known plans: "
        "basic-monthly, pro-annual, pro-monthly, team-weekly, tokyo-monthly"
    )
    assert caught.value.field == "plan"
    assert caught.value.code == "unknown_plan"


def test_unknown_plan_in_an_empty_catalog() -> None:
    with pytest.raises(UnknownPlan, match=r"unknown plan 'pro'; known plans: \(none\)"):
        find_plan("pro", [])
