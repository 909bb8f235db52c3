"""Wall time of `billing simulate` runs (a script that prints figures; never a timed test).

    .venv/bin/python scripts/bench_simulate.py

1. Ten years of monthly billing with a dunning episode each year: the card fails before the
   March renewal and recovers nine days later, so each March invoice is paid by a retry.
2. 100 subscriptions (one customer) over one year of monthly billing.

Each figure is the whole run: test server, localstripe and database start-up included.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from billing.simulate.runner import run_scenario
from billing.simulate.scenario import parse_scenario
from billing.simulate.timeline import Timeline


def ten_years_with_yearly_dunning() -> dict[str, Any]:
    timeline: list[dict[str, Any]] = []
    for year in range(2033, 2043):
        timeline.append({"at": f"{year}-02-20", "action": "card_starts_failing"})
        timeline.append({"at": f"{year}-03-10", "action": "card_recovers"})
    return {
        "name": "ten years, a dunning episode each year",
        "start": "2032-06-01T09:00",
        "timezone": "Europe/Paris",
        "subscriptions": [{"plan": "basic-monthly"}],
        "timeline": timeline,
        "horizon": "2042-06-01",
    }


def hundred_subscriptions_one_year() -> dict[str, Any]:
    return {
        "name": "100 subscriptions over a year",
        "start": "2032-06-01T09:00",
        "timezone": "UTC",
        "subscriptions": [{"plan": "basic-monthly"} for _ in range(100)],
        "horizon": "2033-06-01",
    }


async def measure(data: dict[str, Any]) -> tuple[float, Timeline]:
    scenario = parse_scenario(data)
    started = time.perf_counter()
    timeline = await run_scenario(scenario)
    return time.perf_counter() - started, timeline


async def main() -> None:
    seconds, timeline = await measure(ten_years_with_yearly_dunning())
    [sub] = timeline.subscriptions
    attempts = sum(len(i.attempts) for i in sub.invoices)
    print(
        f"ten years monthly + yearly dunning: {seconds:.2f} s wall "
        f"({len(sub.invoices)} invoices, {attempts} charge attempts, "
        f"{sum(1 for i in sub.invoices if i.status == 'paid')} paid)"
    )
    seconds, timeline = await measure(hundred_subscriptions_one_year())
    invoices = sum(len(s.invoices) for s in timeline.subscriptions)
    print(
        f"100 subscriptions over one year: {seconds:.2f} s wall "
        f"({invoices} invoices, {len(timeline.subscriptions)} subscriptions)"
    )


if __name__ == "__main__":
    asyncio.run(main())
