"""Billing simulations: run a scenario (a customer, their card, subscriptions and a timeline
of actions) on Temporal's time-skipping test server with the real workflow and activities,
and get back the timeline of invoices, attempts, status changes and notices.

This package imports only the pure parts (scenario and timeline). The runner, which needs
Temporal, the database and localstripe, is ``billing.simulate.runner``; the command is
``billing.simulate.command``.
"""

from billing.simulate.scenario import (
    Action,
    ActionKind,
    CardBehaviour,
    Scenario,
    ScenarioError,
    SubscriptionSpec,
    load_scenario,
    parse_scenario,
    parse_scenario_text,
    scenario_json_schema,
)
from billing.simulate.timeline import (
    SCHEMA_VERSION,
    ActionRecord,
    Attempt,
    Invoice,
    Notice,
    StatusChange,
    SubscriptionTimeline,
    Timeline,
    Totals,
)

__all__ = [
    "SCHEMA_VERSION",
    "Action",
    "ActionKind",
    "ActionRecord",
    "Attempt",
    "CardBehaviour",
    "Invoice",
    "Notice",
    "Scenario",
    "ScenarioError",
    "StatusChange",
    "SubscriptionSpec",
    "SubscriptionTimeline",
    "Timeline",
    "Totals",
    "load_scenario",
    "parse_scenario",
    "parse_scenario_text",
    "scenario_json_schema",
]
