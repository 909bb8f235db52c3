"""CPU per replay of recorded subscription histories, sandboxed, as a worker replays a
subscription evicted from its sticky cache when it wakes (a fresh sandboxed instance, then the
current run's events). Process CPU, so a loaded machine changes it little.

    .venv/bin/python scripts/replay_cost.py [--times 20]

Prints one JSON line per history: the shortest, the median and the longest recorded
``SubscriptionWorkflow`` run under ``tests/histories``. docs/benchmarks.md ("Issue 16,
session 8") uses it for what a cache smaller than a billing-day burst costs per cycle.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from pathlib import Path

from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from billing.temporal_payloads import DATA_CONVERTER
from workflows.subscription import SubscriptionWorkflow

HISTORIES = Path(__file__).resolve().parents[1] / "tests" / "histories"


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def subscription_histories() -> list[WorkflowHistory]:
    found = []
    for path in sorted(HISTORIES.glob("*.json")):
        history = WorkflowHistory.from_json(path.stem, path.read_text())
        started = history.events[0].workflow_execution_started_event_attributes
        if started.workflow_type.name == SubscriptionWorkflow.__name__:
            found.append(history)
    return sorted(found, key=lambda h: len(h.events))


async def main(times: int) -> None:
    histories = subscription_histories()
    picks = [histories[0], histories[len(histories) // 2], histories[-1]]
    replayer = Replayer(workflows=[SubscriptionWorkflow], data_converter=DATA_CONVERTER)
    await replayer.replay_workflow(picks[0])  # the first one imports into the sandbox
    for history in picks:
        cpu_before, wall_before = cpu_s(), time.perf_counter()
        for _ in range(times):
            await replayer.replay_workflow(history)
        print(
            json.dumps(
                {
                    "events": len(history.events),
                    "cpu_ms_per_replay": round((cpu_s() - cpu_before) * 1000 / times, 1),
                    "wall_ms_per_replay": round(
                        (time.perf_counter() - wall_before) * 1000 / times, 1
                    ),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--times", type=int, default=20, help="replays of each history")
    asyncio.run(main(parser.parse_args().times))
