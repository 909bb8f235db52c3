"""The scenario fuzzer: hypothesis writes scenarios nobody wrote (cards that fail, need
authentication, are reported stolen, recover; new cards that succeed or fail, at the API or at
the provider; cancels now or at period end; pauses and resumes; the customer authenticating;
webhooks late, twice or out of order; one to three subscriptions per customer), runs each
through ``billing simulate``'s runner (the real workflow on the time-skipping server,
localstripe, a real database) and checks the money-safety invariants
(``tests/simulate/fuzz_invariants.py``) on the records, the workflows and localstripe's own
charges.

CI runs a fixed, derandomized budget (``BILLING_FUZZ_SCENARIOS``, default below; no example
database; no shrinking, which would rerun failures for minutes). A long search:

    BILLING_FUZZ_SCENARIOS=2000 BILLING_FUZZ_SEED=random \\
        .venv/bin/pytest tests/simulate/test_fuzz.py -k search -p no:cacheprovider -s

shrinks what it finds and prints it as a scenario file ``billing simulate`` takes; keep it as
``examples/regressions/NAME.yaml`` and ``test_regression`` runs it from then on.
"""

from __future__ import annotations

import asyncio
import os
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from dateutil.relativedelta import relativedelta
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

from billing.simulate import load_scenario, parse_scenario
from billing.simulate.runner import Simulation, run_scenario
from billing.simulate.timeline import Timeline
from billing.testing.localstripe import LocalStripe
from tests.simulate.fuzz_invariants import check

REGRESSIONS = Path(__file__).parents[2] / "examples" / "regressions"
#: The CI budget: about 3 s a scenario on the loaded 2-core machine (see docs/scenarios.md).
CI_SCENARIOS = 40
SCENARIOS = int(os.environ.get("BILLING_FUZZ_SCENARIOS", CI_SCENARIOS))
LONG_SEARCH = "BILLING_FUZZ_SCENARIOS" in os.environ

# ---- scenarios -------------------------------------------------------------------------------

#: Far enough ahead that the time-skipping server's clock (the real time) is before them.
EARLIEST = datetime(2032, 1, 1)
PLANS = ("basic-monthly", "pro-monthly", "pro-annual", "basic-monthly", "team-weekly")
CARDS = ("succeeds", "declines", "requires_authentication")
NEW_CARDS = (*CARDS, "stolen")


#: Billing steps of the demo plans (approximate for months: only to place actions).
_INTERVALS = {
    "basic-monthly": relativedelta(months=1),
    "pro-monthly": relativedelta(months=1),
    "pro-annual": relativedelta(years=1),
    "team-weekly": relativedelta(weeks=1),
}
_TRIALS = {"pro-monthly": 14}


def _instant(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M")


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    start = EARLIEST + timedelta(
        days=draw(st.integers(0, 3 * 366)),
        hours=draw(st.integers(0, 23)),
        minutes=draw(st.sampled_from([0, 30])),
    )
    months = draw(st.integers(2, 14))
    horizon = start + timedelta(days=30 * months)
    count = draw(st.integers(1, 3))
    names = [f"s{n + 1}" for n in range(count)]
    subscriptions = []
    for name in names:
        sub: dict[str, Any] = {"name": name, "plan": draw(st.sampled_from(PLANS))}
        if draw(st.booleans()) and draw(st.booleans()):
            sub["trial_days"] = draw(st.sampled_from([0, 3, 14]))
        subscriptions.append(sub)
    # Actions land near the first subscription's billing dates (a few days before, or
    # during the two weeks of dunning after): where a renewal, its retries and the
    # customer's answers meet. Uniform instants would mostly fall where nothing happens.
    first = subscriptions[0]
    step = _INTERVALS[str(first["plan"])]
    trial = int(first.get("trial_days", _TRIALS.get(str(first["plan"]), 0)))
    billing_dates = [start + timedelta(days=trial) + step * k for k in range(months + 1)]
    billing_dates = [d for d in billing_dates if d <= horizon] or [start]
    instants = []
    for _ in range(draw(st.integers(0, 8))):
        base = draw(st.sampled_from(billing_dates))
        at = base + timedelta(
            hours=draw(st.integers(-3 * 24, 15 * 24)),
            minutes=draw(st.sampled_from([-1, 0, 1, 30])),
        )
        instants.append(min(max(at, start), horizon))
    instants.sort()
    timeline = [{"at": _instant(at), **draw(_action(names))} for at in instants]
    scenario: dict[str, Any] = {
        "start": _instant(start),
        "card": draw(st.sampled_from(("succeeds", *CARDS))),
        "subscriptions": subscriptions,
    }
    if draw(st.integers(0, 3)) == 0:
        scenario["dunning"] = {
            "retry_offsets_days": draw(st.sampled_from([[1, 3, 5, 7, 9, 11, 14], [1, 2], [3]])),
            "final_action": draw(st.sampled_from(["cancel", "mark_unpaid"])),
        }
    if timeline:
        scenario["timeline"] = timeline
    scenario["horizon"] = _instant(horizon)
    return scenario


def _action(names: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    several = len(names) > 1
    target = st.sampled_from(names)
    optional_target = st.one_of(st.none(), target) if several else st.none()

    def with_target(action: dict[str, Any], name: str | None) -> dict[str, Any]:
        return {**action, "subscription": name} if name else action

    webhook = st.fixed_dictionaries(
        {},
        optional={
            "webhook_delay_minutes": st.sampled_from([1, 90, 24 * 60, 3 * 24 * 60]),
            "webhook_redelivery_minutes": st.sampled_from([0, 5, 26 * 60]),
        },
    )
    # Blocks (authentication, stolen) and the customer's answers to them are where money
    # goes wrong, so they are drawn more often than the rest.
    return st.one_of(
        st.sampled_from(
            [
                {"action": "card_needs_authentication"},
                {"action": "card_reported_stolen"},
                {"action": "card_starts_failing"},
                {"action": "card_recovers"},
                {"action": "card_reported_lost"},
            ]
        ),
        st.builds(
            lambda card, name: with_target({"action": "update_card", "card": card}, name),
            st.sampled_from(("declines", "succeeds", "requires_authentication")),
            optional_target,
        ),
        st.builds(
            lambda card, name: with_target({"action": "update_card", "card": card}, name),
            st.sampled_from(NEW_CARDS),
            optional_target,
        ),
        st.builds(
            lambda card, quirks: {"action": "change_card_at_provider", "card": card, **quirks},
            st.sampled_from(NEW_CARDS),
            webhook,
        ),
        st.builds(
            lambda success, name, quirks: with_target(
                {"action": "authenticate", "success": success, **quirks}, name
            ),
            st.booleans(),
            optional_target,
            webhook,
        ),
        st.builds(
            lambda end, name: {"action": "cancel", "at_period_end": end, "subscription": name},
            st.booleans(),
            target,
        ),
        st.builds(lambda name: {"action": "pause", "subscription": name}, target),
        st.builds(lambda name: {"action": "resume", "subscription": name}, target),
    )


def as_yaml(scenario: dict[str, Any]) -> str:
    """The scenario as a file ``billing simulate`` takes."""
    header = "# yaml-language-server: $schema=../../docs/scenario.schema.json\n"
    return header + yaml.safe_dump(scenario, sort_keys=False, allow_unicode=True)


# ---- running ---------------------------------------------------------------------------------


def run_and_check(scenario: Any, stripe_api_base: str) -> list[str]:
    problems: list[str] = []

    async def inspect(simulation: Simulation, timeline: Timeline) -> None:
        problems.extend(await check(simulation, timeline))

    asyncio.run(run_scenario(scenario, stripe_api_base=stripe_api_base, inspect=inspect))
    return problems


def _fuzz(localstripe: LocalStripe, data: st.DataObject) -> None:
    raw = data.draw(scenarios(), label="scenario")
    text = as_yaml(raw)
    note(f"scenario (save as examples/regressions/NAME.yaml):\n{text}")
    problems = run_and_check(parse_scenario(raw), localstripe.url)
    assert not problems, "invariants broken:\n" + "\n".join(problems) + "\n\n" + text


@pytest.mark.slow
@pytest.mark.skipif(LONG_SEARCH, reason="the long search runs instead (test_search)")
@settings(
    max_examples=CI_SCENARIOS,
    derandomize=True,
    database=None,
    deadline=None,
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=list(HealthCheck),
)
@given(data=st.data())
def test_fuzz_ci_budget(localstripe: LocalStripe, data: st.DataObject) -> None:
    _fuzz(localstripe, data)


@pytest.mark.skipif(not LONG_SEARCH, reason="set BILLING_FUZZ_SCENARIOS=N for the long search")
@settings(
    max_examples=SCENARIOS,
    derandomize=os.environ.get("BILLING_FUZZ_SEED") != "random",
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
@given(data=st.data())
def test_search(localstripe: LocalStripe, data: st.DataObject) -> None:
    _fuzz(localstripe, data)


REGRESSION_FILES = sorted(REGRESSIONS.glob("*.yaml"))


@pytest.mark.parametrize("path", REGRESSION_FILES, ids=[p.stem for p in REGRESSION_FILES])
def test_regression(localstripe: LocalStripe, path: Path) -> None:
    """Each scenario the fuzzer found keeps every invariant."""
    problems = run_and_check(load_scenario(path), localstripe.url)
    assert not problems, "invariants broken:\n" + "\n".join(problems)


def test_a_generated_scenario_is_one_billing_simulate_accepts() -> None:
    """What the fuzzer prints is a valid scenario file (the schema's rules, YAML round trip)."""

    @settings(max_examples=200, derandomize=True, database=None, deadline=None)
    @given(raw=scenarios())
    def round_trip(raw: dict[str, Any]) -> None:
        from billing.simulate.scenario import parse_scenario_text

        parse_scenario_text(as_yaml(raw))

    round_trip()
