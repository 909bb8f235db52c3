"""Wall time of `billing simulate` runs (a script that prints figures; never a timed test).

    .venv/bin/python scripts/bench_simulate.py [--repeat N] [--no-cli]

1. Ten years of monthly billing with a dunning episode each year: the card fails before the
   March renewal and recovers nine days later, so each March invoice is paid by a retry.
2. 100 subscriptions (one customer) over one year of monthly billing.

Each figure is the whole run: test server, localstripe and database start-up included. Two
ways, each repeated (the machines are shared and noisy; the median is the figure to quote):

- ``run_scenario`` in this process (what ``scripts/bench.py`` reports);
- the ``billing simulate FILE --json`` command as a user runs it, interpreter start-up and
  imports included.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from temporalio import activity, workflow
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from billing.simulate.runner import quiet_runtime, run_scenario
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


@dataclass
class BareLoopInput:
    #: Timer-plus-activity cycles to run, one after another.
    cycles: int
    #: Each timer's length, days. Time-skipped, so its length costs nothing; short, so even
    #: the ten-year simulation's count of timers (dunning retries included) stays inside the
    #: test server's default run timeout of 10 years.
    every_days: int = 7


@activity.defn(name="bare_sim_effect")
def bare_sim_effect() -> None:
    """The cycle's one effect: nothing (the baseline is Temporal's own cost)."""


@workflow.defn(name="BareSimLoop")
class BareLoopWorkflow:
    """The bare simulation: the same number of timers and activities as a subscription's
    simulation, and nothing else."""

    @workflow.run
    async def run(self, input: BareLoopInput) -> int:
        for _ in range(input.cycles):
            await workflow.sleep(timedelta(days=input.every_days))
            await workflow.execute_activity(
                bare_sim_effect, start_to_close_timeout=timedelta(seconds=60)
            )
        return input.cycles


def cycles_of(timeline: Timeline) -> list[int]:
    """Per subscription, the timer-plus-activity cycles its simulation ran: one per charge
    attempt (a billing date or a dunning retry is a timer, then the charge activity)."""
    return [
        max(1, sum(len(invoice.attempts) for invoice in sub.invoices))
        for sub in timeline.subscriptions
    ]


async def measure_bare(cycles: list[int]) -> float:
    """Seconds for bare loops of ``cycles`` (one workflow each, all at once) on a time-skipping
    test server, start-up included as in ``measure``: the same worker runner, activity
    threads and build id as the simulation (unsandboxed, 16 threads; a named build id, where
    the SDK's default would hash every loaded module the first time in the process)."""
    from billing.testing.harness import start_time_skipping_environment
    from billing.testing.payments_process import HARNESS_BUILD_ID

    started = time.perf_counter()
    env = await start_time_skipping_environment(runtime=quiet_runtime())
    try:
        queue = f"bare-sim-{uuid.uuid4().hex[:8]}"
        with ThreadPoolExecutor(16) as threads:
            async with Worker(
                env.client,
                task_queue=queue,
                workflows=[BareLoopWorkflow],
                activities=[bare_sim_effect],
                activity_executor=threads,
                workflow_runner=UnsandboxedWorkflowRunner(),
                build_id=HARNESS_BUILD_ID,
            ):
                handles = [
                    await env.client.start_workflow(
                        BareLoopWorkflow.run,
                        BareLoopInput(n),
                        id=f"bare-sim-{i}-{uuid.uuid4().hex[:8]}",
                        task_queue=queue,
                    )
                    for i, n in enumerate(cycles)
                ]
                # One at a time: gathering results can crash the time-skipping server.
                for handle in handles:
                    await handle.result()
    finally:
        await env.shutdown()
    return time.perf_counter() - started


def cli_seconds(data: dict[str, Any]) -> float:
    """Wall time of ``billing simulate FILE --json`` in a new process."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "scenario.json"
        path.write_text(json.dumps(data))
        billing = Path(sys.executable).with_name("billing")
        started = time.perf_counter()
        command = [str(billing), "simulate", str(path), "--json"]
        subprocess.run(command, check=True, capture_output=True)
        return time.perf_counter() - started


def figures(label: str, runs: list[float]) -> str:
    listed = ", ".join(f"{r:.2f}" for r in runs)
    return f"{label}: median {statistics.median(runs):.2f} s (runs: {listed})"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each (default 3)")
    parser.add_argument("--no-cli", action="store_true", help="skip the command-line runs")
    args = parser.parse_args()
    for name, make in (
        ("ten years monthly + yearly dunning", ten_years_with_yearly_dunning),
        ("100 subscriptions over one year", hundred_subscriptions_one_year),
    ):
        runs = []
        for _ in range(args.repeat):
            seconds, timeline = await measure(make())
            runs.append(seconds)
        invoices = [i for sub in timeline.subscriptions for i in sub.invoices]
        attempts = sum(len(i.attempts) for i in invoices)
        paid = sum(1 for i in invoices if i.status == "paid")
        print(
            figures(f"{name}, run_scenario", runs)
            + f" [{len(timeline.subscriptions)} subscriptions, {len(invoices)} invoices, "
            f"{attempts} charge attempts, {paid} paid]",
            flush=True,
        )
        if not args.no_cli:
            cli = [cli_seconds(make()) for _ in range(args.repeat)]
            print(figures(f"{name}, billing simulate --json", cli), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
