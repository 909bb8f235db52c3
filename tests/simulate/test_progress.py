"""The progress callback behind `billing simulate`'s progress bar: it follows the simulated
clock forward, step by step, and ends at the horizon."""

from __future__ import annotations

import itertools
from datetime import datetime

from billing.simulate.runner import run_scenario
from billing.simulate.scenario import parse_scenario


async def test_progress_moves_forward_in_steps_to_the_horizon() -> None:
    scenario = parse_scenario(
        {
            "start": "2033-01-10T09:00",
            "subscriptions": [{"plan": "pro-annual"}],
            "timeline": [{"at": "2034-06-01", "action": "card_starts_failing"}],
            "horizon": "2036-01-10",
        }
    )
    seen: list[datetime] = []

    timeline = await run_scenario(scenario, progress=seen.append)

    assert seen == sorted(seen)
    assert seen[0] > scenario.start and seen[-1] == scenario.horizon
    # One subscription: steps of up to a year, cut at the action (3 years: at least 4 steps).
    assert len(seen) >= 4
    longest = max(b - a for a, b in itertools.pairwise(seen))
    assert longest <= (scenario.horizon - scenario.start) / 2
    [sub] = timeline.subscriptions
    assert len(sub.invoices) == 3
