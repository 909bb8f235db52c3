"""The scenario format: the published JSON Schema agrees with the parser, and the parser
reads instants, defaults and overrides as docs/scenarios.md says. Pure: no server."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from billing.dunning import FinalAction
from billing.plans import _PLAN_FIELDS, DEMO_PLANS
from billing.simulate.scenario import (
    ACTION_FIELDS,
    ActionKind,
    CardBehaviour,
    ScenarioError,
    load_scenario,
    parse_scenario,
    scenario_json_schema,
)
from billing.simulate.schema import schema_text
from tests.simulate.cli import EXAMPLES, REPO
from tests.simulate.minischema import problems

SCHEMA_FILE = REPO / "docs" / "scenario.schema.json"
SCHEMA = json.loads(SCHEMA_FILE.read_text())
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))


def test_the_published_schema_is_the_one_the_parser_generates() -> None:
    assert scenario_json_schema() == SCHEMA, (
        "docs/scenario.schema.json is stale; regenerate it with "
        "`python -m billing.simulate.schema > docs/scenario.schema.json`"
    )
    assert SCHEMA_FILE.read_text() == schema_text()


def test_the_schema_covers_every_action_and_plan_field() -> None:
    actions = {a["properties"]["action"]["const"] for a in SCHEMA["$defs"]["action"]["oneOf"]}
    assert actions == {k.value for k in ActionKind} == {k.value for k in ACTION_FIELDS}
    assert list(SCHEMA["$defs"]["plan"]["properties"]) == list(_PLAN_FIELDS)
    assert SCHEMA["$defs"]["card"]["enum"] == [c.value for c in CardBehaviour]
    assert SCHEMA["$defs"]["dunning"]["properties"]["final_action"]["enum"] == [
        a.value for a in FinalAction
    ]


def raw(path: Path) -> Any:
    # The scenario format reads dates itself: keep them as text, as the parser's loader does.
    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {
        k: [r for r in v if r[0] != "tag:yaml.org,2002:timestamp"]
        for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    return yaml.load(path.read_text(), Loader=Loader)


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=[p.stem for p in EXAMPLE_FILES])
def test_every_example_is_valid_for_the_schema_and_the_parser(path: Path) -> None:
    assert problems(SCHEMA, raw(path)) == []
    load_scenario(path)


BASE: dict[str, Any] = {
    "start": "2032-01-15T09:00",
    "timezone": "Europe/Paris",
    "subscriptions": [{"plan": "basic-monthly"}],
    "timeline": [{"at": "2032-02-01", "action": "cancel"}],
    "horizon": "2032-06-01",
}


@pytest.mark.parametrize(
    "where",
    [
        lambda d: d,
        lambda d: d["subscriptions"][0],
        lambda d: d["timeline"][0],
    ],
    ids=["scenario", "subscription", "action"],
)
def test_schema_and_parser_both_refuse_an_unknown_field(where: Any) -> None:
    data = json.loads(json.dumps(BASE))
    assert problems(SCHEMA, data) == [] and parse_scenario(data)
    where(data)["colour"] = "blue"
    assert problems(SCHEMA, data)
    with pytest.raises(ScenarioError, match="unknown field"):
        parse_scenario(data)


def test_schema_and_parser_both_refuse_a_field_of_another_action() -> None:
    data = json.loads(json.dumps(BASE))
    data["timeline"][0] = {"at": "2032-02-01", "action": "pause", "at_period_end": False}
    assert problems(SCHEMA, data)
    with pytest.raises(ScenarioError) as error:
        parse_scenario(data)
    assert error.value.field == "timeline[0].at_period_end"


def test_instants_without_an_offset_are_the_customer_s_wall_clock() -> None:
    scenario = parse_scenario(
        {
            **BASE,
            "start": "2032-03-27T09:00",  # Paris is UTC+1 until the 28th
            "horizon": "2032-03-29",  # local midnight, after the switch to UTC+2
            "timeline": [{"at": "2032-03-28T12:00:00Z", "action": "pause"}],
        }
    )
    assert scenario.start == datetime(2032, 3, 27, 8, 0, tzinfo=UTC)
    assert scenario.horizon == datetime(2032, 3, 28, 22, 0, tzinfo=UTC)
    assert scenario.timeline[0].at == datetime(2032, 3, 28, 12, 0, tzinfo=UTC)


def test_defaults_and_the_dunning_override() -> None:
    scenario = parse_scenario(
        {
            **BASE,
            "subscriptions": [{"plan": "basic-monthly"}, {"plan": "pro-annual", "name": "yearly"}],
            "timeline": [{"at": "2032-02-01", "action": "cancel", "subscription": "yearly"}],
            "dunning": {"retry_offsets_days": [2, 4], "final_action": "mark_unpaid"},
        },
        default_name="my-file",
    )
    assert scenario.name == "my-file"
    assert scenario.card == CardBehaviour.SUCCEEDS
    assert [s.name for s in scenario.subscriptions] == ["sub-1", "yearly"]
    assert {p.code: p.dunning.retry_offsets_days for p in scenario.plans()} == {
        "basic-monthly": [2, 4],
        "pro-annual": [2, 4],
    }
    assert {p.dunning.final_action for p in scenario.plans()} == {FinalAction.MARK_UNPAID}
    [cancel] = scenario.timeline
    assert cancel.at_period_end is True and cancel.subscription == "yearly"
    # Without an override, demo plans keep their own terms.
    assert parse_scenario(BASE).plans() == [p for p in DEMO_PLANS if p.code == "basic-monthly"]


def test_until_moves_the_horizon_and_leaves_later_actions_out() -> None:
    scenario = parse_scenario(BASE).with_until("2032-01-20")
    assert scenario.horizon == datetime(2032, 1, 19, 23, 0, tzinfo=UTC)
    assert scenario.timeline == ()


def test_an_inline_plan_may_not_take_a_demo_plan_s_code_with_other_terms() -> None:
    plan = {"code": "basic-monthly", "name": "Cheaper", "amount_minor": 100}
    plan |= {"currency": "USD", "interval": "month"}
    with pytest.raises(ScenarioError) as error:
        parse_scenario({**BASE, "subscriptions": [{"plan": plan}]})
    assert error.value.field == "subscriptions[0].plan.code"
    assert "is a demo plan's code with other terms" in error.value.message


def test_the_scenario_and_timeline_modules_are_pure() -> None:
    # They validate and render anywhere: no Temporal, database, Stripe or workflow import.
    code = (
        "import sys\n"
        "import billing.simulate, billing.simulate.render, billing.simulate.schema\n"
        "heavy = ('temporalio', 'sqlalchemy', 'stripe', 'db', 'activities', 'workflows')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert result.stdout.strip() == "[]"
