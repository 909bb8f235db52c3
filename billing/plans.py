"""Plans: a price (minor units + currency) per interval (unit x count), an optional trial and an
optional dunning policy. A plan is snapshotted into each subscription, so later edits to the
catalog never change what an existing subscription is billed.

Validation happens at the edges (``parse_plan``, ``validate_plan``), never when a ``Plan`` is
built: a plan travels in every subscription workflow's payloads, and a check that consults
library data (babel's CLDR currencies) on decode would let a library upgrade make a running
workflow's history, or its continue-as-new input, impossible to decode."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from billing.calendar import IntervalUnit, parse_interval_unit, validate_interval_count
from billing.dunning import DunningPolicy, validate_dunning_policy
from billing.errors import InvalidInput, UnknownPlan
from billing.money import MAX_AMOUNT_MINOR, normalize_currency, validate_amount_minor
from billing.text import PLAN_NAME

MAX_TRIAL_DAYS = 730
#: Most seats one subscription may have (far above any real team). A period's total,
#: ``quantity x amount_minor``, must itself stay within MAX_AMOUNT_MINOR
#: (``validate_total``).
MAX_QUANTITY = 1_000_000
# fullmatch, not match: "$" would also accept a trailing newline ("pro\n").
_CODE_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


@dataclass(frozen=True)
class Plan:
    """A plan's terms. Building one checks nothing, so decoding a recorded payload never
    depends on today's libraries; anything built from outside data goes through
    ``validate_plan`` (or ``parse_plan``) first. Keep the field layout: recorded workflow
    histories decode into it."""

    code: str
    name: str
    amount_minor: int
    currency: str
    interval: IntervalUnit
    interval_count: int = 1
    trial_days: int = 0
    dunning: DunningPolicy = field(default_factory=DunningPolicy)


def validate_plan(plan: Plan) -> Plan:
    """The plan normalized (upper-case currency, IntervalUnit, validated dunning), or
    InvalidInput naming the bad field. Call it wherever a plan enters from outside: the
    catalog, signup, scenario files, code that defines plans."""
    if not isinstance(plan.code, str) or not _CODE_RE.fullmatch(plan.code):
        raise InvalidInput(
            f"plan code must be 1-63 lower-case letters, digits, '-' or '_'; got {plan.code!r}",
            field="code",
        )
    if not isinstance(plan.name, str) or not plan.name.strip():
        raise InvalidInput(f"plan name must be a non-empty string; got {plan.name!r}", field="name")
    PLAN_NAME.check(plan.name, field="name")
    validate_amount_minor(plan.amount_minor)
    currency = normalize_currency(plan.currency)
    unit = parse_interval_unit(plan.interval)
    validate_interval_count(unit, plan.interval_count)
    if (
        isinstance(plan.trial_days, bool)
        or not isinstance(plan.trial_days, int)
        or not 0 <= plan.trial_days <= MAX_TRIAL_DAYS
    ):
        raise InvalidInput(
            f"trial_days must be a whole number between 0 and {MAX_TRIAL_DAYS}; "
            f"got {plan.trial_days!r}",
            field="trial_days",
        )
    if not isinstance(plan.dunning, DunningPolicy):
        raise InvalidInput(
            f"dunning must be a dunning policy; got {plan.dunning!r}", field="dunning"
        )
    dunning = validate_dunning_policy(plan.dunning)
    return replace(plan, currency=currency, interval=unit, dunning=dunning)


def validate_quantity(quantity: object, *, field: str = "quantity") -> int:
    """Seats on a subscription: a whole number from 1 to ``MAX_QUANTITY``."""
    if isinstance(quantity, bool) or not isinstance(quantity, int):
        raise InvalidInput(
            f"{field} must be a whole number of seats; got {quantity!r}", field=field
        )
    if not 1 <= quantity <= MAX_QUANTITY:
        raise InvalidInput(
            f"{field} must be between 1 and {MAX_QUANTITY}; got {quantity}", field=field
        )
    return quantity


def validate_total(plan: Plan, quantity: int, *, field: str = "quantity") -> int:
    """A period's total, ``quantity x plan.amount_minor`` (minor units), or InvalidInput when
    it exceeds MAX_AMOUNT_MINOR (it would not fit the database's amounts)."""
    total = plan.amount_minor * quantity
    if total > MAX_AMOUNT_MINOR:
        raise InvalidInput(
            f"{quantity} seats of plan {plan.code!r} would bill {total} minor units a period, "
            f"more than the maximum of {MAX_AMOUNT_MINOR}; use fewer seats",
            field=field,
        )
    return total


def find_plan(code: str, plans: Mapping[str, Plan] | Iterable[Plan]) -> Plan:
    """The plan with ``code``, or UnknownPlan listing the known codes."""
    by_code = dict(plans) if isinstance(plans, Mapping) else {p.code: p for p in plans}
    try:
        return by_code[code]
    except KeyError:
        known = ", ".join(sorted(by_code)) or "(none)"
        raise UnknownPlan(f"unknown plan {code!r}; known plans: {known}", field="plan") from None


#: Plans loaded by the demo and `billing dev`.
DEMO_PLANS: tuple[Plan, ...] = tuple(
    validate_plan(plan)
    for plan in (
        Plan("basic-monthly", "Basic (monthly)", 900, "USD", IntervalUnit.MONTH),
        Plan("pro-monthly", "Pro (monthly)", 2900, "USD", IntervalUnit.MONTH, trial_days=14),
        Plan("pro-annual", "Pro (annual)", 29000, "USD", IntervalUnit.YEAR),
        Plan("team-weekly", "Team (weekly)", 1500, "EUR", IntervalUnit.WEEK),
        Plan("tokyo-monthly", "Tokyo (monthly, JPY)", 1200, "JPY", IntervalUnit.MONTH),
    )
)


_PLAN_FIELDS = (
    "code",
    "name",
    "amount_minor",
    "currency",
    "interval",
    "interval_count",
    "trial_days",
    "dunning",
)
_DUNNING_FIELDS = ("retry_offsets_days", "final_action")


def parse_plan(raw: Mapping[str, object]) -> Plan:
    """A validated Plan from user input (JSON, YAML, CLI), with errors that name the bad
    field."""
    if not isinstance(raw, Mapping):
        raise InvalidInput(f"a plan must be an object with fields; got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_PLAN_FIELDS))
    if unknown:
        raise InvalidInput(
            f"unknown plan field {unknown[0]!r}; allowed: {', '.join(_PLAN_FIELDS)}",
            field=unknown[0],
        )
    missing = [f for f in ("code", "name", "amount_minor", "currency", "interval") if f not in raw]
    if missing:
        raise InvalidInput(f"plan field {missing[0]!r} is required", field=missing[0])
    dunning_raw = raw.get("dunning")
    dunning = DunningPolicy()
    if dunning_raw is not None:
        if not isinstance(dunning_raw, Mapping):
            raise InvalidInput("dunning must be an object", field="dunning")
        bad = sorted(set(dunning_raw) - set(_DUNNING_FIELDS))
        if bad:
            raise InvalidInput(
                f"unknown dunning field {bad[0]!r}; allowed: {', '.join(_DUNNING_FIELDS)}",
                field=f"dunning.{bad[0]}",
            )
        offsets = dunning_raw.get("retry_offsets_days", dunning.retry_offsets_days)
        dunning = DunningPolicy(
            retry_offsets_days=list(offsets) if isinstance(offsets, list | tuple) else offsets,
            final_action=dunning_raw.get("final_action", dunning.final_action),
        )
    return validate_plan(
        Plan(
            code=raw["code"],  # type: ignore[arg-type]
            name=raw["name"],  # type: ignore[arg-type]
            amount_minor=raw["amount_minor"],  # type: ignore[arg-type]
            currency=raw["currency"],  # type: ignore[arg-type]
            interval=raw["interval"],  # type: ignore[arg-type]
            interval_count=raw.get("interval_count", 1),  # type: ignore[arg-type]
            trial_days=raw.get("trial_days", 0),  # type: ignore[arg-type]
            dunning=dunning,
        )
    )
