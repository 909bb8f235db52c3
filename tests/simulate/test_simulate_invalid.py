"""Invalid scenarios: the real `billing simulate` command exits with code 2 and a message
that names the file, the line and the field at fault, and says what is wrong. Nothing is
printed on stdout and (except for a start in the past, which needs the test server's clock)
nothing is started."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.simulate.cli import run_cli

VALID = """\
name: valid
start: 2032-01-15T09:00
timezone: Europe/Paris
subscriptions:
  - plan: basic-monthly
timeline:
  - at: 2032-04-01
    action: card_starts_failing
  - at: 2032-05-01
    action: card_recovers
horizon: 2032-08-01
"""


def write(tmp_path: Path, text: str, name: str = "scenario.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def fails_with(path: Path | str, *args: str) -> str:
    result = run_cli(path, "--json", *args)
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert result.stdout == ""
    message: str = result.stderr.strip()
    assert message.startswith("error: ")
    return message.removeprefix("error: ")


CASES = {
    "unknown field": (
        VALID.replace("horizon:", "horizn:"),
        "scenario.yaml:11: horizn: unknown field (did you mean 'horizon'?); a scenario takes: "
        "version, name, description, start, timezone, card, subscriptions, dunning, "
        "timeline, horizon",
    ),
    "unknown field in an action": (
        VALID.replace("    action: card_recovers", "    action: card_recovers\n    when: now"),
        "scenario.yaml:11: timeline[1].when: unknown field; a 'card_recovers' action takes: "
        "at, action",
    ),
    "bad time zone": (
        VALID.replace("Europe/Paris", "Europe/Pariss"),
        "scenario.yaml:3: timezone: unknown time zone 'Europe/Pariss'; use an IANA name such "
        "as 'Europe/Paris'",
    ),
    "actions out of order": (
        VALID.replace("2032-05-01", "2032-03-01"),
        "scenario.yaml:9: timeline[1].at: actions out of order (2032-02-29T23:00:00Z is "
        "before 2032-03-31T22:00:00Z, the instant of timeline[0])",
    ),
    "horizon before start": (
        VALID.replace("horizon: 2032-08-01", "horizon: 2032-01-01"),
        "scenario.yaml:11: horizon: 2031-12-31T23:00:00Z is before the start "
        "(2032-01-15T08:00:00Z); the horizon must come after it",
    ),
    "unknown plan": (
        VALID.replace("basic-monthly", "pro-mnthly"),
        "scenario.yaml:5: subscriptions[0].plan: unknown plan 'pro-mnthly'; known plans: "
        "basic-monthly, pro-annual, pro-monthly, team-weekly, tokyo-monthly",
    ),
    "missing required field": (
        VALID.replace("start: 2032-01-15T09:00\n", ""),
        "scenario.yaml:1: start: required field is missing (a scenario)",
    ),
    "instant with seconds": (
        VALID.replace("2032-01-15T09:00", "2032-01-15T09:00:30"),
        "scenario.yaml:2: start: '2032-01-15T09:00:30' has seconds; scenario instants are "
        "given to the minute (seconds 00 or left out)",
    ),
    "plan change without a plan": (
        VALID.replace("action: card_recovers", "action: change_plan"),
        "scenario.yaml:9: timeline[1].plan: required field is missing (a 'change_plan' action)",
    ),
    "plan change with an unknown effective": (
        VALID.replace(
            "action: card_recovers", "action: change_quantity\n    quantity: 2\n    effective: soon"
        ),
        "scenario.yaml:12: timeline[1].effective: must be one of: now, period_end; got 'soon'",
    ),
    "unknown action": (
        VALID.replace("action: card_recovers", "action: card_recover"),
        "scenario.yaml:10: timeline[1].action: unknown action 'card_recover' (did you mean "
        "'card_recovers'?); actions: card_starts_failing, card_needs_authentication, "
        "card_recovers, update_card, cancel, pause, resume, card_reported_stolen, "
        "card_reported_lost, authenticate, change_card_at_provider, change_plan, change_quantity",
    ),
    "stolen card at the start": (
        VALID.replace("start: ", "card: stolen\nstart: ", 1),
        "scenario.yaml:2: card: a stolen card is refused by the provider when it is attached, "
        "so the customer cannot sign up with it; start with another card and use "
        "card_reported_stolen in the timeline",
    ),
    "bad webhook delay": (
        VALID.replace(
            "    action: card_recovers\n",
            "    action: authenticate\n    webhook_delay_minutes: -5\n",
        ),
        "scenario.yaml:11: timeline[1].webhook_delay_minutes: must be a whole number from 0 to "
        "4320; got -5",
    ),
    "bad inline plan": (
        VALID.replace(
            "  - plan: basic-monthly\n",
            "  - plan:\n      code: gold\n      name: Gold\n      amount_minor: 9.5\n"
            "      currency: USD\n      interval: month\n",
        ),
        "scenario.yaml:8: subscriptions[0].plan.amount_minor: amount_minor must be an integer "
        "number of minor units (e.g. 1999 for 19.99); got 9.5",
    ),
    "unknown currency in an inline plan": (
        VALID.replace(
            "  - plan: basic-monthly\n",
            "  - plan:\n      code: gold\n      name: Gold\n      amount_minor: 950\n"
            "      currency: ABC\n      interval: month\n",
        ),
        "scenario.yaml:9: subscriptions[0].plan.currency: unknown currency 'ABC'; use an ISO "
        "4217 code such as 'USD', 'EUR' or 'JPY'",
    ),
    "bad final action in the dunning override": (
        VALID.replace("subscriptions:", "dunning:\n  final_action: delete\nsubscriptions:"),
        "scenario.yaml:5: dunning.final_action: unknown final_action 'delete'; use one of: "
        "cancel, mark_unpaid",
    ),
    "bad dunning override": (
        VALID.replace("subscriptions:", "dunning:\n  retry_offsets_days: [3, 1]\nsubscriptions:"),
        "scenario.yaml:5: dunning.retry_offsets_days: retry offsets must be strictly "
        "increasing; got [3, 1]",
    ),
    "anchor before the trial ends": (
        VALID.replace(
            "  - plan: basic-monthly\n", "  - plan: pro-monthly\n    anchor: 2032-01-20T09:00\n"
        ),
        "scenario.yaml:6: subscriptions[0].anchor: 2032-01-20T08:00:00Z is before the trial's "
        "end (14 days), 2032-01-29T08:00:00Z; the first billing date cannot come before it",
    ),
    "which subscription": (
        VALID.replace(
            "  - plan: basic-monthly\n", "  - plan: basic-monthly\n  - plan: pro-annual\n"
        ).replace("action: card_recovers", "action: pause"),
        "scenario.yaml:10: timeline[1].subscription: required: the scenario has several "
        "subscriptions (sub-1, sub-2); say which one to pause",
    ),
    "field given twice": (
        VALID + "horizon: 2033-01-01\n",
        "scenario.yaml:12: not valid YAML: field 'horizon' is given twice",
    ),
}


@pytest.mark.parametrize("text,message", CASES.values(), ids=list(CASES))
def test_invalid_scenario_exits_2_naming_the_field(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    assert fails_with(path) == f"{path.parent}/{message}"


def test_json_scenarios_are_read_too_and_their_errors_name_the_field(tmp_path: Path) -> None:
    data = {
        "start": "2032-01-15T09:00",
        "timezone": "Mars/Olympus",
        "subscriptions": [{"plan": "basic-monthly"}],
        "horizon": "2032-03-01",
    }
    path = write(tmp_path, json.dumps(data), "scenario.json")
    assert fails_with(path) == (
        f"{path}: timezone: unknown time zone 'Mars/Olympus'; use an IANA name such as "
        "'Europe/Paris'"
    )


def test_a_start_in_the_past_is_refused_with_the_earliest_allowed_start(
    tmp_path: Path,
) -> None:
    # The time-skipping server's clock starts now and only moves forward.
    path = write(tmp_path, VALID.replace("2032-01-15T09:00", "2020-01-15T09:00"))
    message = fails_with(path)
    assert message.startswith(
        f"{path}:2: start: 2020-01-15T08:00:00Z is in the past for the time-skipping test "
        "server, whose clock starts at the current time and only moves forward; the earliest "
        "allowed start is "
    )
    earliest = re.search(r"earliest allowed start is (\S+)\.", message)
    assert earliest is not None and earliest.group(1) > "2020-01-15T08:00:00Z"


def test_until_before_the_start_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, VALID)
    assert fails_with(path, "--until", "2032-01-01") == (
        "--until: 2031-12-31T23:00:00Z is before the start (2032-01-15T08:00:00Z); the "
        "horizon must come after it"
    )


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    assert fails_with(tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: no such file"
