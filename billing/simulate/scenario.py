"""The scenario a simulation runs: parsing, validation and the JSON Schema.

Pure: no Temporal, database or Stripe imports, so a scenario can be checked (and its schema
generated) anywhere. Every error names the field at fault as a path such as
``timeline[3].at`` (indexes count from 0), plus the line when the scenario came from YAML.

The field tables below drive both the parser (which fields exist, which are required) and
:func:`scenario_json_schema`, so the published schema (``docs/scenario.schema.json``) cannot
drift from what the parser accepts; a test compares the two.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import yaml
from dateutil.relativedelta import relativedelta

from billing.calendar import MAX_INTERVAL_COUNT, IntervalUnit, add_local_days, resolve_timezone
from billing.dunning import (
    MAX_RETRIES,
    MAX_WINDOW_DAYS,
    DunningPolicy,
    FinalAction,
    validate_dunning_policy,
)
from billing.errors import BillingError
from billing.money import MAX_AMOUNT_MINOR
from billing.plans import DEMO_PLANS, MAX_QUANTITY, MAX_TRIAL_DAYS, Plan, find_plan, parse_plan
from billing.simulate.instants import (
    INSTANT_PATTERN,
    InstantFormatError,
    format_instant,
    parse_instant,
)

#: The scenario format's version; a scenario may state it as ``version: 1``.
SCENARIO_VERSION = 1
#: The longest simulation, from start to horizon.
MAX_HORIZON_YEARS = 30
MAX_SUBSCRIPTIONS = 1000
MAX_ACTIONS = 10_000
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")


class CardBehaviour(StrEnum):
    """How the customer's card behaves, as the Stripe test cards do."""

    #: Every charge succeeds (4242 4242 4242 4242).
    SUCCEEDS = "succeeds"
    #: Attaches fine, then every charge is declined with ``card_declined`` (…0341).
    DECLINES = "declines"
    #: Every charge needs 3-D Secure authentication by the customer (…3155).
    REQUIRES_AUTHENTICATION = "requires_authentication"
    #: A card reported stolen (…9979): the provider refuses it when it is attached.
    STOLEN = "stolen"
    #: A card reported lost (…9987): the provider refuses it when it is attached.
    LOST = "lost"


#: Cards the provider refuses at attach: a scenario cannot start with one.
CARDS_REFUSED_AT_ATTACH = frozenset({CardBehaviour.STOLEN, CardBehaviour.LOST})


class ActionKind(StrEnum):
    #: The bank starts declining the customer's card (the subscription is not told).
    CARD_STARTS_FAILING = "card_starts_failing"
    #: The bank starts asking for authentication on every charge.
    CARD_NEEDS_AUTHENTICATION = "card_needs_authentication"
    #: The bank accepts the card again; the next scheduled retry or renewal succeeds.
    CARD_RECOVERS = "card_recovers"
    #: The customer enters a new card: an open invoice is retried at once.
    UPDATE_CARD = "update_card"
    CANCEL = "cancel"
    PAUSE = "pause"
    RESUME = "resume"
    #: The bank reports the card on file stolen: every charge is a hard decline (stolen_card).
    CARD_REPORTED_STOLEN = "card_reported_stolen"
    #: The bank reports the card on file lost: every charge is a hard decline (lost_card).
    CARD_REPORTED_LOST = "card_reported_lost"
    #: The customer completes (or fails) 3-D Secure on the payment waiting for it; the
    #: provider's payment_intent.succeeded reaches the webhook endpoint.
    AUTHENTICATE = "authenticate"
    #: The customer changes the default card at the provider (e.g. Stripe's customer portal);
    #: the provider's customer.updated reaches the webhook endpoint.
    CHANGE_CARD_AT_PROVIDER = "change_card_at_provider"
    #: A plan change (the change_plan update), prorated as the API's defaults say.
    CHANGE_PLAN = "change_plan"
    #: A change of seats (the change_plan update with a quantity).
    CHANGE_QUANTITY = "change_quantity"


#: Actions the issue foresees that the billing engine does not offer yet.
_NOT_YET_AVAILABLE: dict[str, str] = {}

#: Which test card stands for each behaviour when the card is switched at the provider.
CARD_ACTIONS: Mapping[ActionKind, CardBehaviour] = {
    ActionKind.CARD_STARTS_FAILING: CardBehaviour.DECLINES,
    ActionKind.CARD_NEEDS_AUTHENTICATION: CardBehaviour.REQUIRES_AUTHENTICATION,
    ActionKind.CARD_RECOVERS: CardBehaviour.SUCCEEDS,
}
#: Actions whose bank answers localstripe cannot give: a charge of the card on file is
#: declined with this decline code (a hard decline) instead of localstripe's card_declined.
HARD_DECLINE_ACTIONS: Mapping[ActionKind, str] = {
    ActionKind.CARD_REPORTED_STOLEN: "stolen_card",
    ActionKind.CARD_REPORTED_LOST: "lost_card",
}
#: Actions whose news reaches the engine as a provider webhook (and take delivery fields).
WEBHOOK_ACTIONS = frozenset({ActionKind.AUTHENTICATE, ActionKind.CHANGE_CARD_AT_PROVIDER})
#: Longest delay of a webhook delivery: Stripe retries a failing endpoint for three days.
MAX_WEBHOOK_DELAY_MINUTES = 3 * 24 * 60
#: Actions that change one subscription (and need to know which, when there are several).
SUBSCRIPTION_ACTIONS = frozenset(
    {
        ActionKind.CANCEL,
        ActionKind.PAUSE,
        ActionKind.RESUME,
        ActionKind.CHANGE_PLAN,
        ActionKind.CHANGE_QUANTITY,
    }
)
#: Values of the change actions' ``effective`` and ``proration`` (the API's).
CHANGE_EFFECTIVE = ("now", "period_end")
CHANGE_PRORATION = ("always_invoice", "create_prorations", "none")


# =============================================================================== the model ====


@dataclass(frozen=True)
class SubscriptionSpec:
    """One subscription the customer signs up for at the scenario's start."""

    name: str
    plan: Plan
    #: First billing date (UTC); None: the trial's end, or the start when there is no trial.
    anchor_at: datetime | None = None
    #: Overrides the plan's trial length; None keeps the plan's.
    trial_days: int | None = None
    #: Seats at signup.
    quantity: int = 1

    def effective_trial_days(self) -> int:
        return self.plan.trial_days if self.trial_days is None else self.trial_days


@dataclass(frozen=True)
class Action:
    """One thing that happens at an instant (UTC)."""

    #: Position in the scenario's timeline (for messages).
    index: int
    at: datetime
    kind: ActionKind
    #: The subscription it applies to (always set for cancel, pause and resume); None for
    #: the card at the bank, and for update_card on every subscription that has not ended.
    subscription: str | None = None
    #: update_card: how the new card behaves.
    card: CardBehaviour = CardBehaviour.SUCCEEDS
    #: cancel: at the end of the paid period (True) or immediately (False).
    at_period_end: bool = True
    reason: str = ""
    #: authenticate: whether the customer passes the bank's check.
    success: bool = True
    #: Webhook actions: minutes between the action and the webhook's delivery.
    webhook_delay_minutes: int = 0
    #: Webhook actions: minutes after the action at which the same event is delivered again
    #: (Stripe's redelivery); None: delivered once.
    webhook_redelivery_minutes: int | None = None
    #: change_plan: the new plan; change_quantity: the new seats. ``effective`` and
    #: ``proration`` None take the API's defaults.
    plan: Plan | None = None
    quantity: int | None = None
    effective: str | None = None
    proration: str | None = None


@dataclass(frozen=True)
class Scenario:
    name: str
    start: datetime
    horizon: datetime
    timezone: str
    subscriptions: tuple[SubscriptionSpec, ...]
    timeline: tuple[Action, ...] = ()
    card: CardBehaviour = CardBehaviour.SUCCEEDS
    #: Replaces the dunning policy of every plan in the scenario when given.
    dunning: DunningPolicy | None = None
    description: str = ""

    def plans(self) -> list[Plan]:
        """The distinct plans the subscriptions use, then those change_plan actions move to
        (with the dunning override applied)."""
        by_code: dict[str, Plan] = {}
        for spec in self.subscriptions:
            by_code.setdefault(spec.plan.code, spec.plan)
        for action in self.timeline:
            if action.plan is not None:
                by_code.setdefault(action.plan.code, action.plan)
        return list(by_code.values())

    def subscription_names(self) -> list[str]:
        return [s.name for s in self.subscriptions]

    def with_until(self, until: str) -> Scenario:
        """The scenario with its horizon moved to ``until`` (``--until``); actions after it
        are left out."""
        horizon = _parse_instant_at(until, resolve_timezone(self.timezone), ("--until",))
        _check_horizon(self.start, horizon, ("--until",))
        return dataclasses.replace(
            self, horizon=horizon, timeline=tuple(a for a in self.timeline if a.at <= horizon)
        )


# =============================================================================== errors ======

PathParts = tuple[str | int, ...]


def format_path(parts: Sequence[str | int]) -> str:
    """``("timeline", 3, "at")`` -> ``timeline[3].at``."""
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text


class ScenarioError(BillingError):
    """An invalid scenario. ``path`` names the bad field; ``line`` is its YAML line (1-based)."""

    code = "invalid_scenario"

    def __init__(
        self,
        path: Sequence[str | int],
        message: str,
        *,
        source: str | None = None,
        line: int | None = None,
    ) -> None:
        self.path: PathParts = tuple(path)
        self.source = source
        self.line = line
        super().__init__(message, field=format_path(self.path) or None)

    def located(self, *, source: str | None, line: int | None) -> ScenarioError:
        return ScenarioError(self.path, self.message, source=source, line=line)

    def __str__(self) -> str:
        where = ""
        if self.source:
            where = f"{self.source}:{self.line}: " if self.line else f"{self.source}: "
        elif self.line:
            where = f"line {self.line}: "
        field_path = format_path(self.path)
        return f"{where}{field_path}: {self.message}" if field_path else f"{where}{self.message}"


# =============================================================================== field tables


@dataclass(frozen=True)
class FieldSpec:
    """One field of a scenario object: its JSON Schema fragment and what it means."""

    name: str
    schema: Mapping[str, Any]
    description: str
    required: bool = False


_INSTANT = {"$ref": "#/$defs/instant"}
_CARD = {"$ref": "#/$defs/card"}
_REASON = FieldSpec("reason", {"type": "string"}, "Free text recorded with the change.")
_TARGET = FieldSpec(
    "subscription",
    {"type": "string", "pattern": f"^{_NAME_RE.pattern}$"},
    "The name of the subscription it applies to. Required when the scenario has several.",
)

SCENARIO_FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("version", {"const": SCENARIO_VERSION}, "The scenario format's version."),
    FieldSpec("name", {"type": "string"}, "A title for the report; default: the file's name."),
    FieldSpec("description", {"type": "string"}, "What the scenario shows, for readers."),
    FieldSpec(
        "start",
        _INSTANT,
        "When the customer signs up. Must not be in the past: the time-skipping server's "
        "clock starts at the current time and only moves forward.",
        required=True,
    ),
    FieldSpec(
        "timezone",
        {"type": "string", "minLength": 1},
        "The customer's IANA time zone (default UTC). Billing dates follow its wall clock; "
        "instants written without an offset are read in it.",
    ),
    FieldSpec("card", _CARD, "How the customer's card behaves at the start (default succeeds)."),
    FieldSpec(
        "subscriptions",
        {
            "type": "array",
            "minItems": 1,
            "maxItems": MAX_SUBSCRIPTIONS,
            "items": {"$ref": "#/$defs/subscription"},
        },
        "The subscriptions the customer signs up for at the start.",
        required=True,
    ),
    FieldSpec(
        "dunning",
        {"$ref": "#/$defs/dunning"},
        "Replaces the dunning policy of every plan in the scenario.",
    ),
    FieldSpec(
        "timeline",
        {"type": "array", "maxItems": MAX_ACTIONS, "items": {"$ref": "#/$defs/action"}},
        "What happens, in time order. Actions at the same instant apply in the order listed, "
        "after whatever the subscription itself does at that instant.",
    ),
    FieldSpec(
        "horizon",
        _INSTANT,
        f"Where the simulation stops (inclusive); after the start, at most "
        f"{MAX_HORIZON_YEARS} years later.",
        required=True,
    ),
)

SUBSCRIPTION_FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec(
        "name",
        {"type": "string", "pattern": f"^{_NAME_RE.pattern}$"},
        "A name for the report and for actions to refer to (default sub-1, sub-2, ...).",
    ),
    FieldSpec(
        "plan",
        {
            "oneOf": [
                {
                    "type": "string",
                    "enum": sorted(p.code for p in DEMO_PLANS),
                    "description": "A demo plan's code.",
                },
                {"$ref": "#/$defs/plan"},
            ]
        },
        "A demo plan's code, or a plan written out.",
        required=True,
    ),
    FieldSpec(
        "anchor",
        _INSTANT,
        "The first billing date; later dates are anchor + k intervals on the customer's wall "
        "clock. Default: the trial's end, or the start. Not before either.",
    ),
    FieldSpec(
        "trial_days",
        {"type": "integer", "minimum": 0, "maximum": MAX_TRIAL_DAYS},
        "Overrides the plan's trial length (days on the customer's wall clock).",
    ),
    FieldSpec(
        "quantity",
        {"type": "integer", "minimum": 1, "maximum": MAX_QUANTITY},
        "Seats at signup (default 1): each period bills quantity x the plan's amount.",
    ),
)

DUNNING_FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec(
        "retry_offsets_days",
        {
            "type": "array",
            "maxItems": MAX_RETRIES,
            "items": {"type": "integer", "minimum": 1, "maximum": MAX_WINDOW_DAYS},
        },
        "Retries, as days after the first failure, strictly increasing "
        "(default 1, 3, 5, 7, 9, 11, 14).",
    ),
    FieldSpec(
        "final_action",
        {"enum": [a.value for a in FinalAction]},
        "When retries run out: cancel the subscription, or mark it unpaid (default cancel).",
    ),
)

PLAN_FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec(
        "code",
        {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{0,62}$"},
        "The plan's code; must not be a demo plan's code unless the terms are the same.",
        required=True,
    ),
    FieldSpec("name", {"type": "string", "minLength": 1}, "The plan's name.", required=True),
    FieldSpec(
        "amount_minor",
        {"type": "integer", "minimum": 0, "maximum": MAX_AMOUNT_MINOR},
        "The price per interval in minor units (1999 is 19.99 USD; JPY has none).",
        required=True,
    ),
    FieldSpec(
        "currency",
        {"type": "string", "pattern": "^[A-Za-z]{3}$"},
        "ISO 4217 code, e.g. USD.",
        required=True,
    ),
    FieldSpec(
        "interval",
        {"enum": [u.value for u in IntervalUnit]},
        "The billing interval's unit.",
        required=True,
    ),
    FieldSpec(
        "interval_count",
        {"type": "integer", "minimum": 1, "maximum": max(MAX_INTERVAL_COUNT.values())},
        "Units per interval (default 1; at most three years).",
    ),
    FieldSpec(
        "trial_days",
        {"type": "integer", "minimum": 0, "maximum": MAX_TRIAL_DAYS},
        "The plan's trial length in days (default 0).",
    ),
    FieldSpec("dunning", {"$ref": "#/$defs/dunning"}, "The plan's own dunning policy."),
)

_WEBHOOK_FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec(
        "webhook_delay_minutes",
        {"type": "integer", "minimum": 0, "maximum": MAX_WEBHOOK_DELAY_MINUTES},
        "Minutes between the action and the delivery of its webhook (default 0). Later "
        "actions may overtake it: out-of-order delivery.",
    ),
    FieldSpec(
        "webhook_redelivery_minutes",
        {"type": "integer", "minimum": 0, "maximum": MAX_WEBHOOK_DELAY_MINUTES},
        "The same event is delivered a second time, this many minutes after the action "
        "(Stripe redelivers events).",
    ),
)

_CHANGE_FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec(
        "effective",
        {"enum": list(CHANGE_EFFECTIVE)},
        "now or period_end; default (the API's): now for an upgrade, period_end otherwise.",
    ),
    FieldSpec(
        "proration",
        {"enum": list(CHANGE_PRORATION)},
        "always_invoice (default), create_prorations (lines on the next renewal) or none.",
    ),
    _TARGET,
)

_ACTION_COMMON: tuple[FieldSpec, ...] = (
    FieldSpec("at", _INSTANT, "When it happens.", required=True),
    FieldSpec("action", {"type": "string"}, "What happens.", required=True),
)

ACTION_FIELDS: Mapping[ActionKind, tuple[FieldSpec, ...]] = {
    ActionKind.CARD_STARTS_FAILING: (),
    ActionKind.CARD_NEEDS_AUTHENTICATION: (),
    ActionKind.CARD_RECOVERS: (),
    ActionKind.UPDATE_CARD: (
        FieldSpec("card", _CARD, "How the new card behaves (default succeeds)."),
        dataclasses.replace(
            _TARGET,
            description="The subscription whose card is updated; default: every subscription "
            "that has not ended.",
        ),
    ),
    ActionKind.CANCEL: (
        FieldSpec(
            "at_period_end",
            {"type": "boolean"},
            "true (default): nothing more is billed and the subscription ends when the paid "
            "period does; false: it ends now and an open invoice is voided.",
        ),
        _REASON,
        _TARGET,
    ),
    ActionKind.PAUSE: (_REASON, _TARGET),
    ActionKind.RESUME: (_REASON, _TARGET),
    ActionKind.CARD_REPORTED_STOLEN: (),
    ActionKind.CARD_REPORTED_LOST: (),
    ActionKind.AUTHENTICATE: (
        FieldSpec(
            "success",
            {"type": "boolean"},
            "true (default): the customer passes 3-D Secure and the payment succeeds; false: "
            "the check fails and the payment needs a new card.",
        ),
        dataclasses.replace(
            _TARGET,
            description="The subscription whose pending payment is authenticated; default: "
            "every payment waiting for authentication.",
        ),
        *_WEBHOOK_FIELDS,
    ),
    ActionKind.CHANGE_CARD_AT_PROVIDER: (
        FieldSpec("card", _CARD, "How the new card behaves (default succeeds)."),
        *_WEBHOOK_FIELDS,
    ),
    ActionKind.CHANGE_PLAN: (
        FieldSpec(
            "plan",
            {
                "oneOf": [
                    {"type": "string", "enum": sorted(p.code for p in DEMO_PLANS)},
                    {"$ref": "#/$defs/plan"},
                ]
            },
            "The new plan: a demo plan's code, or a plan written out.",
            required=True,
        ),
        *_CHANGE_FIELDS,
    ),
    ActionKind.CHANGE_QUANTITY: (
        FieldSpec(
            "quantity",
            {"type": "integer", "minimum": 1, "maximum": MAX_QUANTITY},
            "The new number of seats.",
            required=True,
        ),
        *_CHANGE_FIELDS,
    ),
}

ACTION_DESCRIPTIONS: Mapping[ActionKind, str] = {
    ActionKind.CARD_STARTS_FAILING: "The bank starts declining the customer's card "
    "(card_declined). The subscription is not told; its next charge finds out.",
    ActionKind.CARD_NEEDS_AUTHENTICATION: "The bank starts asking for 3-D Secure "
    "authentication on every charge; off-session charges cannot succeed.",
    ActionKind.CARD_RECOVERS: "The bank accepts the card again; the next scheduled retry "
    "or renewal succeeds.",
    ActionKind.UPDATE_CARD: "The customer enters a new card (the update_payment_method "
    "update): an open invoice is retried at once.",
    ActionKind.CANCEL: "Cancel at the end of the paid period, or immediately.",
    ActionKind.PAUSE: "Pause: nothing is billed until a resume (refused while an invoice is "
    "unpaid).",
    ActionKind.RESUME: "Resume: billing restarts at the anchor's next date.",
    ActionKind.CARD_REPORTED_STOLEN: "The bank reports the card on file stolen: every charge "
    "is a hard decline (stolen_card); no retries until the card changes.",
    ActionKind.CARD_REPORTED_LOST: "The bank reports the card on file lost: every charge is a "
    "hard decline (lost_card); no retries until the card changes.",
    ActionKind.AUTHENTICATE: "The customer completes 3-D Secure on the payment waiting for "
    "it (at the provider); the provider's payment_intent.succeeded goes to the webhook "
    "endpoint.",
    ActionKind.CHANGE_CARD_AT_PROVIDER: "The customer makes a new card the default at the "
    "provider (e.g. Stripe's customer portal); the provider's customer.updated goes to the "
    "webhook endpoint.",
    ActionKind.CHANGE_PLAN: "Change the plan (the change_plan update): prorated to the "
    "second, with the API's defaults (an upgrade now and invoiced, a downgrade at the period "
    "end); a refusal is recorded with its reason.",
    ActionKind.CHANGE_QUANTITY: "Change the number of seats (the change_plan update with a "
    "quantity), with the same rules as change_plan.",
}


def _names(fields: Sequence[FieldSpec]) -> list[str]:
    return [f.name for f in fields]


def _object_schema(fields: Sequence[FieldSpec], description: str) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "description": description,
        "additionalProperties": False,
        "properties": {f.name: {**f.schema, "description": f.description} for f in fields},
    }
    required = [f.name for f in fields if f.required]
    if required:
        schema["required"] = required
    return schema


def scenario_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the scenario format, from the field tables."""
    actions = []
    for kind, extra in ACTION_FIELDS.items():
        action_schema = _object_schema((*_ACTION_COMMON, *extra), ACTION_DESCRIPTIONS[kind])
        action_schema["properties"]["action"] = {
            "const": kind.value,
            "description": "What happens.",
        }
        actions.append(action_schema)
    schema = _object_schema(
        SCENARIO_FIELDS,
        "A billing scenario run by `billing simulate` on Temporal's time-skipping test server.",
    )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Billing simulation scenario",
        **schema,
        "$defs": {
            "instant": {
                "type": "string",
                "pattern": INSTANT_PATTERN,
                "description": "ISO 8601, to the minute: with Z or an offset it is absolute; "
                "without, it is the customer's wall-clock time; a date alone is local midnight.",
            },
            "card": {
                "enum": [c.value for c in CardBehaviour],
                "description": "succeeds; declines (attaches, then every charge is declined); "
                "requires_authentication (every charge needs 3-D Secure); stolen, lost (the "
                "provider refuses the card at attach).",
            },
            "subscription": _object_schema(SUBSCRIPTION_FIELDS, "A subscription."),
            "plan": _object_schema(PLAN_FIELDS, "A plan written out in the scenario."),
            "dunning": _object_schema(DUNNING_FIELDS, "A dunning policy."),
            "action": {"oneOf": actions},
        },
    }


# =============================================================================== parsing =====


def parse_scenario(data: object, *, default_name: str = "scenario") -> Scenario:
    """A validated Scenario from already-decoded data (YAML or JSON), or ScenarioError."""
    root = _mapping(data, (), "a scenario")
    _check_fields(root, SCENARIO_FIELDS, (), "a scenario")
    if "version" in root and (
        isinstance(root["version"], bool) or root["version"] != SCENARIO_VERSION
    ):
        raise ScenarioError(
            ("version",),
            f"unsupported scenario version {root['version']!r}; this billing reads version "
            f"{SCENARIO_VERSION}",
        )
    name = _string(root.get("name", default_name), ("name",))
    description = _string(root.get("description", ""), ("description",))

    timezone = _string(root.get("timezone", "UTC"), ("timezone",))
    try:
        zone = resolve_timezone(timezone)
    except BillingError as error:
        raise ScenarioError(("timezone",), error.message) from None

    start = _parse_instant_at(root["start"], zone, ("start",))
    horizon = _parse_instant_at(root["horizon"], zone, ("horizon",))
    _check_horizon(start, horizon, ("horizon",))
    card = _card(root.get("card", CardBehaviour.SUCCEEDS.value), ("card",))
    if card in CARDS_REFUSED_AT_ATTACH:
        raise ScenarioError(
            ("card",),
            f"a {card.value} card is refused by the provider when it is attached, so the "
            "customer cannot sign up with it; start with another card and use "
            f"card_reported_{card.value} in the timeline",
        )
    dunning = _dunning(root["dunning"], ("dunning",)) if "dunning" in root else None
    subscriptions = _subscriptions(root["subscriptions"], start, timezone, zone, dunning)
    timeline = _timeline(root.get("timeline", []), start, horizon, zone, subscriptions, dunning)
    return Scenario(
        name=name,
        description=description,
        start=start,
        horizon=horizon,
        timezone=timezone,
        card=card,
        subscriptions=subscriptions,
        timeline=timeline,
        dunning=dunning,
    )


def _check_horizon(start: datetime, horizon: datetime, path: PathParts) -> None:
    if horizon <= start:
        relation = "is the start" if horizon == start else "is before the start"
        raise ScenarioError(
            path,
            f"{format_instant(horizon)} {relation} ({format_instant(start)}); "
            "the horizon must come after it",
        )
    if horizon > start + relativedelta(years=MAX_HORIZON_YEARS):
        raise ScenarioError(
            path,
            f"{format_instant(horizon)} is more than {MAX_HORIZON_YEARS} years after the start "
            f"({format_instant(start)})",
        )


def _subscriptions(
    raw: object,
    start: datetime,
    timezone: str,
    zone: ZoneInfo,
    dunning: DunningPolicy | None,
) -> tuple[SubscriptionSpec, ...]:
    path: PathParts = ("subscriptions",)
    if not isinstance(raw, list) or not raw:
        raise ScenarioError(path, "must be a non-empty list of subscriptions")
    if len(raw) > MAX_SUBSCRIPTIONS:
        raise ScenarioError(path, f"at most {MAX_SUBSCRIPTIONS} subscriptions; got {len(raw)}")
    specs: list[SubscriptionSpec] = []
    names: dict[str, int] = {}
    plans: dict[str, tuple[Plan, int]] = {}
    for i, item in enumerate(raw):
        here: PathParts = (*path, i)
        obj = _mapping(item, here, "a subscription")
        _check_fields(obj, SUBSCRIPTION_FIELDS, here, "a subscription")
        name = _name(obj.get("name", f"sub-{i + 1}"), (*here, "name"))
        if name in names:
            raise ScenarioError(
                (*here, "name"), f"{name!r} is already the name of subscriptions[{names[name]}]"
            )
        names[name] = i
        plan = _plan(obj["plan"], (*here, "plan"))
        if dunning is not None:
            plan = dataclasses.replace(plan, dunning=dunning)
        seen = plans.get(plan.code)
        if seen is not None and seen[0] != plan:
            raise ScenarioError(
                (*here, "plan"),
                f"plan code {plan.code!r} is used by subscriptions[{seen[1]}] with other terms; "
                "give this plan its own code",
            )
        plans.setdefault(plan.code, (plan, i))
        trial_days = None
        if "trial_days" in obj:
            trial_days = _whole(obj["trial_days"], (*here, "trial_days"), 0, MAX_TRIAL_DAYS)
        spec = SubscriptionSpec(name=name, plan=plan, trial_days=trial_days)
        if "quantity" in obj:
            spec = dataclasses.replace(
                spec, quantity=_whole(obj["quantity"], (*here, "quantity"), 1, MAX_QUANTITY)
            )
        if "anchor" in obj:
            anchor = _parse_instant_at(obj["anchor"], zone, (*here, "anchor"))
            trial = spec.effective_trial_days()
            earliest = add_local_days(start, timezone, trial) if trial else start
            if anchor < earliest:
                what = f"the trial's end ({trial} days)" if trial else "the start"
                raise ScenarioError(
                    (*here, "anchor"),
                    f"{format_instant(anchor)} is before {what}, {format_instant(earliest)}; "
                    "the first billing date cannot come before it",
                )
            spec = dataclasses.replace(spec, anchor_at=anchor)
        specs.append(spec)
    return tuple(specs)


def _plan(raw: object, path: PathParts) -> Plan:
    if isinstance(raw, str):
        try:
            return find_plan(raw, DEMO_PLANS)
        except BillingError as error:
            raise ScenarioError(path, error.message) from None
    obj = _mapping(raw, path, "a plan (or a demo plan's code)")
    _check_fields(obj, PLAN_FIELDS, path, "a plan")
    try:
        plan = parse_plan(obj)
    except BillingError as error:
        raise ScenarioError(_sub_path(path, error.field), error.message) from None
    demo = next((p for p in DEMO_PLANS if p.code == plan.code), None)
    if demo is not None and demo != plan:
        raise ScenarioError(
            (*path, "code"),
            f"{plan.code!r} is a demo plan's code with other terms; give this plan its own "
            f"code, or write `plan: {plan.code}` to use the demo plan",
        )
    return plan


def _dunning(raw: object, path: PathParts) -> DunningPolicy:
    obj = _mapping(raw, path, "a dunning policy")
    _check_fields(obj, DUNNING_FIELDS, path, "a dunning policy")
    default = DunningPolicy()
    offsets = obj.get("retry_offsets_days", default.retry_offsets_days)
    try:
        # validate_dunning_policy checks what it is given (types included) and names the field.
        return validate_dunning_policy(
            DunningPolicy(
                retry_offsets_days=list(offsets) if isinstance(offsets, list | tuple) else offsets,  # type: ignore[arg-type]
                final_action=obj.get("final_action", default.final_action),  # type: ignore[arg-type]
            )
        )
    except BillingError as error:
        field_name = (error.field or "").removeprefix("dunning.")
        raise ScenarioError(_sub_path(path, field_name), error.message) from None


def _timeline(
    raw: object,
    start: datetime,
    horizon: datetime,
    zone: ZoneInfo,
    subscriptions: Sequence[SubscriptionSpec],
    dunning: DunningPolicy | None = None,
) -> tuple[Action, ...]:
    path: PathParts = ("timeline",)
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ScenarioError(path, "must be a list of actions")
    if len(raw) > MAX_ACTIONS:
        raise ScenarioError(path, f"at most {MAX_ACTIONS} actions; got {len(raw)}")
    names = [s.name for s in subscriptions]
    actions: list[Action] = []
    for i, item in enumerate(raw):
        here: PathParts = (*path, i)
        obj = _mapping(item, here, "an action")
        kind = _action_kind(obj, here)
        _check_fields(
            obj, (*_ACTION_COMMON, *ACTION_FIELDS[kind]), here, f"a {kind.value!r} action"
        )
        at = _parse_instant_at(obj["at"], zone, (*here, "at"))
        if actions and at < actions[-1].at:
            raise ScenarioError(
                (*here, "at"),
                f"actions out of order ({format_instant(at)} is before "
                f"{format_instant(actions[-1].at)}, the instant of timeline[{i - 1}])",
            )
        if at < start:
            raise ScenarioError(
                (*here, "at"),
                f"{format_instant(at)} is before the start ({format_instant(start)})",
            )
        if at > horizon:
            raise ScenarioError(
                (*here, "at"),
                f"{format_instant(at)} is after the horizon ({format_instant(horizon)}); "
                "move the horizon or the action",
            )
        subscription = None
        if "subscription" in obj:
            subscription = _string(obj["subscription"], (*here, "subscription"))
            if subscription not in names:
                raise ScenarioError(
                    (*here, "subscription"),
                    f"unknown subscription {subscription!r}; this scenario's subscriptions: "
                    f"{', '.join(names)}",
                )
        elif kind in SUBSCRIPTION_ACTIONS:
            if len(names) > 1:
                raise ScenarioError(
                    (*here, "subscription"),
                    f"required: the scenario has several subscriptions ({', '.join(names)}); "
                    f"say which one to {kind.value}",
                )
            subscription = names[0]
        action = Action(index=i, at=at, kind=kind, subscription=subscription)
        if "card" in obj:
            action = dataclasses.replace(action, card=_card(obj["card"], (*here, "card")))
        if "at_period_end" in obj:
            value = obj["at_period_end"]
            if not isinstance(value, bool):
                raise ScenarioError(
                    (*here, "at_period_end"), f"must be true or false; got {value!r}"
                )
            action = dataclasses.replace(action, at_period_end=value)
        if "reason" in obj:
            action = dataclasses.replace(action, reason=_string(obj["reason"], (*here, "reason")))
        if "success" in obj:
            value = obj["success"]
            if not isinstance(value, bool):
                raise ScenarioError((*here, "success"), f"must be true or false; got {value!r}")
            action = dataclasses.replace(action, success=value)
        if "webhook_delay_minutes" in obj:
            action = dataclasses.replace(
                action,
                webhook_delay_minutes=_whole(
                    obj["webhook_delay_minutes"],
                    (*here, "webhook_delay_minutes"),
                    0,
                    MAX_WEBHOOK_DELAY_MINUTES,
                ),
            )
        if "webhook_redelivery_minutes" in obj:
            action = dataclasses.replace(
                action,
                webhook_redelivery_minutes=_whole(
                    obj["webhook_redelivery_minutes"],
                    (*here, "webhook_redelivery_minutes"),
                    0,
                    MAX_WEBHOOK_DELAY_MINUTES,
                ),
            )
        if "plan" in obj:
            plan = _plan(obj["plan"], (*here, "plan"))
            if dunning is not None:
                plan = dataclasses.replace(plan, dunning=dunning)
            known = {spec.plan.code: spec.plan for spec in subscriptions}
            known.update({a.plan.code: a.plan for a in actions if a.plan is not None})
            if plan.code in known and known[plan.code] != plan:
                raise ScenarioError(
                    (*here, "plan"),
                    f"plan code {plan.code!r} is used elsewhere in the scenario with other "
                    "terms; give this plan its own code",
                )
            action = dataclasses.replace(action, plan=plan)
        if "quantity" in obj:
            action = dataclasses.replace(
                action, quantity=_whole(obj["quantity"], (*here, "quantity"), 1, MAX_QUANTITY)
            )
        if "effective" in obj:
            action = dataclasses.replace(
                action, effective=_one_of(obj["effective"], CHANGE_EFFECTIVE, (*here, "effective"))
            )
        if "proration" in obj:
            action = dataclasses.replace(
                action, proration=_one_of(obj["proration"], CHANGE_PRORATION, (*here, "proration"))
            )
        actions.append(action)
    return tuple(actions)


def _one_of(value: object, allowed: Sequence[str], path: PathParts) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ScenarioError(path, f"must be one of: {', '.join(allowed)}; got {value!r}")
    return value


def _action_kind(obj: Mapping[str, object], path: PathParts) -> ActionKind:
    if "action" not in obj:
        raise ScenarioError((*path, "action"), f"required field is missing; {_kinds_hint()}")
    raw = obj["action"]
    if isinstance(raw, str) and raw in _NOT_YET_AVAILABLE:
        raise ScenarioError(
            (*path, "action"), f"{raw!r} is not available: {_NOT_YET_AVAILABLE[raw]}"
        )
    try:
        return ActionKind(str(raw) if isinstance(raw, str) else "")
    except ValueError:
        hint = _suggest(str(raw), [k.value for k in ActionKind])
        raise ScenarioError(
            (*path, "action"), f"unknown action {raw!r}{hint}; {_kinds_hint()}"
        ) from None


def _kinds_hint() -> str:
    return "actions: " + ", ".join(k.value for k in ActionKind)


# =============================================================================== helpers =====


def _sub_path(path: PathParts, field_name: str | None) -> PathParts:
    if not field_name:
        return path
    return (*path, *field_name.split("."))


def _mapping(value: object, path: PathParts, what: str) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise ScenarioError(
            path, f"must be {what} written as a mapping of fields; got {type(value).__name__}"
        )
    return {str(k): v for k, v in value.items()}


def _check_fields(
    obj: Mapping[str, object], fields: Sequence[FieldSpec], path: PathParts, what: str
) -> None:
    allowed = _names(fields)
    for key in obj:
        if key not in allowed:
            raise ScenarioError(
                (*path, key),
                f"unknown field{_suggest(key, allowed)}; {what} takes: {', '.join(allowed)}",
            )
    for spec in fields:
        if spec.required and spec.name not in obj:
            raise ScenarioError((*path, spec.name), f"required field is missing ({what})")


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _parse_instant_at(value: object, zone: ZoneInfo, path: PathParts) -> datetime:
    try:
        return parse_instant(value, zone)
    except InstantFormatError as error:
        raise ScenarioError(path, str(error)) from None


def _string(value: object, path: PathParts) -> str:
    if not isinstance(value, str):
        raise ScenarioError(path, f"must be a string; got {value!r}")
    return value


def _name(value: object, path: PathParts) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise ScenarioError(
            path,
            "must be 1-40 lower-case letters, digits, '-' or '_', starting with a letter or "
            f"digit; got {value!r}",
        )
    return value


def _whole(value: object, path: PathParts, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ScenarioError(path, f"must be a whole number from {low} to {high}; got {value!r}")
    return value


def _card(value: object, path: PathParts) -> CardBehaviour:
    try:
        return CardBehaviour(value if isinstance(value, str) else "")
    except ValueError:
        allowed = [c.value for c in CardBehaviour]
        hint = _suggest(str(value), allowed)
        raise ScenarioError(
            path, f"unknown card behaviour {value!r}{hint}; use one of: {', '.join(allowed)}"
        ) from None


# =============================================================================== files =======


class _Loader(yaml.SafeLoader):
    """Safe YAML that keeps dates as text (the scenario format reads them itself, with the
    customer's zone) and refuses a field given twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"field {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def parse_scenario_text(
    text: str, *, source: str | None = None, default_name: str = "scenario"
) -> Scenario:
    """A Scenario from YAML text (JSON is YAML too), with errors located at their line."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        problem = error.problem or str(error)
        raise ScenarioError(
            (), f"not valid YAML: {problem}", source=source, line=mark.line + 1 if mark else None
        ) from None
    except yaml.YAMLError as error:
        raise ScenarioError((), f"not valid YAML: {error}", source=source) from None
    finally:
        loader.dispose()
    try:
        return parse_scenario(data, default_name=default_name)
    except ScenarioError as error:
        line = _line_of(node, error.path) if node is not None else None
        raise error.located(source=source, line=line) from None


def load_scenario(path: Path) -> Scenario:
    """Read and validate a scenario file (``.yaml``, ``.yml`` or ``.json``)."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScenarioError((), "no such file", source=source) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ScenarioError((), f"cannot read the scenario: {error}", source=source) from None
    default_name = path.name.removesuffix(path.suffix)
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        except json.JSONDecodeError as error:
            raise ScenarioError(
                (), f"not valid JSON: {error.msg}", source=source, line=error.lineno
            ) from None
        except ValueError as error:
            raise ScenarioError((), str(error), source=source) from None
        try:
            return parse_scenario(data, default_name=default_name)
        except ScenarioError as error:
            raise error.located(source=source, line=None) from None
    return parse_scenario_text(text, source=source, default_name=default_name)


def locate(error: ScenarioError, path: Path) -> ScenarioError:
    """``error`` (raised after parsing, e.g. by the runner) with the file and, for YAML, the
    line of the field it names."""
    line = None
    if path.suffix.lower() != ".json":
        with contextlib.suppress(OSError, UnicodeDecodeError, yaml.YAMLError):
            node = yaml.compose(path.read_text(encoding="utf-8"), Loader=_Loader)
            line = _line_of(node, error.path) if node is not None else None
    return error.located(source=str(path), line=line)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"field {key!r} is given twice")
        result[key] = value
    return result


def _line_of(root: yaml.Node, path: Sequence[str | int]) -> int | None:
    """The 1-based line of the deepest node along ``path`` (the field, or its parent when
    the field is missing)."""
    node: yaml.Node = root
    for part in path:
        child: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            child = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            child = node.value[part] if 0 <= part < len(node.value) else None
        if child is None:
            break
        node = child
    return int(node.start_mark.line) + 1


__all__ = [
    "ACTION_FIELDS",
    "CARDS_REFUSED_AT_ATTACH",
    "CARD_ACTIONS",
    "HARD_DECLINE_ACTIONS",
    "MAX_WEBHOOK_DELAY_MINUTES",
    "PLAN_FIELDS",
    "SCENARIO_FIELDS",
    "SUBSCRIPTION_ACTIONS",
    "WEBHOOK_ACTIONS",
    "Action",
    "ActionKind",
    "CardBehaviour",
    "FieldSpec",
    "Scenario",
    "ScenarioError",
    "SubscriptionSpec",
    "load_scenario",
    "locate",
    "parse_scenario",
    "parse_scenario_text",
    "scenario_json_schema",
]
