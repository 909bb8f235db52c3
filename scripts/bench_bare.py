"""The bare billing cycle: the least a Temporal workflow can do per cycle, one durable timer
and one activity. ``scripts/bench.py`` measures it as the baseline for the billing burst.

Run as a worker process (what bench.py does), like ``billing worker`` runs the real one:

    .venv/bin/python scripts/bench_bare.py --address 127.0.0.1:7233 --task-queue bare

Same worker settings as the billing worker: sandboxed workflows, a synchronous activity in a
16-thread pool.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta

from temporalio import activity, workflow

WORKFLOW_NAME = "BareCycle"


@dataclass
class BareCycleInput:
    #: The instant (Unix seconds, UTC) the timer is due: every workflow of a burst gets the same.
    due_at_epoch_s: float


@activity.defn(name="bare_cycle_effect")
def bare_cycle_effect() -> float:
    """The cycle's one effect: when it ran (Unix seconds)."""
    return time.time()


@workflow.defn(name=WORKFLOW_NAME)
class BareCycleWorkflow:
    @workflow.run
    async def run(self, input: BareCycleInput) -> float:
        delay = input.due_at_epoch_s - workflow.now().timestamp()
        if delay > 0:
            await workflow.sleep(timedelta(seconds=delay))
        done: float = await workflow.execute_activity(
            bare_cycle_effect, start_to_close_timeout=timedelta(seconds=60)
        )
        return done


async def run_worker(address: str, task_queue: str) -> None:
    # Imported by its module name (not __main__) so the sandbox can re-import it.
    import bench_bare
    from temporalio.client import Client
    from temporalio.worker import Worker

    client = await Client.connect(address)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    worker = Worker(
        client,
        task_queue=task_queue,
        workflows=[bench_bare.BareCycleWorkflow],
        activities=[bench_bare.bare_cycle_effect],
        activity_executor=ThreadPoolExecutor(max_workers=16),
        max_concurrent_activities=16,
    )
    async with worker:
        print(f"bare worker running on {task_queue}", flush=True)
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="the bare-cycle worker")
    parser.add_argument("--address", required=True)
    parser.add_argument("--task-queue", required=True)
    args = parser.parse_args()
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    asyncio.run(run_worker(args.address, args.task_queue))


if __name__ == "__main__":
    main()
