"""Measure workflow history cost: events per paid billing cycle and per continue-as-new run.

Runs the real workflow and activities on the time-skipping server with localstripe and a
temporary SQLite database, then reads every run's history:

    .venv/bin/python scripts/history_cost.py [--months 24]

Prints, for a subscription paid every month, the events of each continue-as-new run, and
for a subscription whose card fails, the events of the run that holds a full dunning cycle
(8 tries, then the final action).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections import Counter
from datetime import timedelta

from dateutil.relativedelta import relativedelta
from temporalio.api.enums.v1 import EventType

from billing.testing.cards import DECLINES_AFTER_ATTACH, SUCCEEDS
from billing.testing.database import temporary_database
from billing.testing.harness import BillingHarness, start_time_skipping_environment
from billing.testing.localstripe import LocalStripe


def _kinds_by_activity(history: object) -> Counter[str]:
    events = history.events  # type: ignore[attr-defined]
    return Counter(
        e.activity_task_scheduled_event_attributes.activity_type.name
        for e in events
        if e.HasField("activity_task_scheduled_event_attributes")
    )


def _kinds(history: object) -> Counter[str]:
    events = history.events  # type: ignore[attr-defined]
    return Counter(EventType.Name(e.event_type).removeprefix("EVENT_TYPE_") for e in events)


async def measure(months: int, *, quiet: bool = False) -> dict[str, float]:
    """Print the figures (unless ``quiet``) and return the headline ones:
    ``events_per_paid_cycle`` (mean of the steady-state runs), ``max_events_per_run``,
    ``paid_cycles``, ``runs`` and ``dunning_run_events``."""

    def print_(*args: object) -> None:
        if not quiet:
            print(*args)

    with LocalStripe() as stripe_server, temporary_database("sqlite") as url:
        env = await start_time_skipping_environment()
        try:
            async with BillingHarness(
                env, database_url=url, stripe_api_base=stripe_server.url
            ) as h:
                now = await h.now()
                anchor = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
                started = time.perf_counter()
                paid = await h.signup("basic-monthly", card=SUCCEEDS, billing_anchor_at=anchor)
                failing = await h.signup(
                    "basic-monthly", card=DECLINES_AFTER_ATTACH, billing_anchor_at=anchor
                )
                await h.advance_to(anchor + relativedelta(months=months) - timedelta(days=1))
                elapsed = time.perf_counter() - started

                runs = await h.run_histories(paid.subscription_id)
                sizes = [len(r.events) for r in runs]
                invoices = len(h.snapshot(paid.subscription_id).invoices)
                # Cycles in a run = charges it made (one per period for a card that pays;
                # invoices are created by a local activity, which leaves only a marker).
                # Complete runs after the first (which also holds the start) give the
                # steady-state cost of one paid cycle: their events, less the run's own start
                # and continue-as-new, per cycle.
                cycles = [_kinds_by_activity(r).get("charge_invoice", 0) for r in runs]
                steady = [
                    (size - 5) / n for size, n in zip(sizes[1:-1], cycles[1:-1], strict=True) if n
                ] or [size / max(n, 1) for size, n in zip(sizes, cycles, strict=True)]
                print_(f"simulated {months} months in {elapsed:.1f} s wall clock")
                print_(
                    f"paid subscription: {invoices} invoices, {len(runs)} runs "
                    f"(billed periods per run: {cycles})"
                )
                print_(
                    "  events per continue-as-new run: "
                    f"min {min(sizes)}, median {statistics.median(sizes):.0f}, max {max(sizes)}"
                )
                per_cycle = statistics.median(steady)
                print_(f"  events per paid billing cycle (steady state): {per_cycle:.1f}")
                print_(f"  total events for {invoices} paid cycles: {sum(sizes)}")
                print_("  one steady-state run by event type:")
                for kind, count in sorted(_kinds(runs[1]).items()):
                    print_(f"    {count:3d}  {kind}")

                dunning_runs = await h.run_histories(failing.subscription_id)
                dsizes = [len(r.events) for r in dunning_runs]
                snap = h.snapshot(failing.subscription_id)
                attempts = sum(len(a) for a in snap.attempts.values())
                print_(
                    f"failing card: {len(snap.invoices)} invoice, {attempts} charge attempts, "
                    f"final status {snap.subscription.status.value}"
                )
                print_(f"  events in the run holding the whole dunning cycle: {max(dsizes)}")
                return {
                    "events_per_paid_cycle": statistics.fmean(steady),
                    "max_events_per_run": max(sizes),
                    "paid_cycles": invoices,
                    "runs": len(runs),
                    "dunning_run_events": max(dsizes),
                }
        finally:
            await env.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--months", type=int, default=24)
    args = parser.parse_args()
    asyncio.run(measure(args.months))


if __name__ == "__main__":
    main()
