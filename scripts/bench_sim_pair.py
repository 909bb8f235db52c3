"""The simulate phase's figures for the code on ``PYTHONPATH`` (a script that prints figures):
each simulation of ``scripts/bench_simulate.py`` against its bare loop, wall and CPU.

    PYTHONPATH=CHECKOUT .venv/bin/python scripts/bench_sim_pair.py [10y] [100x1y]

One JSON object on stdout: per scenario the simulation's and the bare loop's wall seconds and
their ratio (``sim_*_ratio_to_bare``), the CPU seconds of this process for each and their ratio
(``sim_*_cpu_ratio_to_bare``), the CPU of its ended children (localstripe, the payments
process, the test servers) and the load. Run it alternately with two checkouts (e.g. main's
and a branch's, each its own ``PYTHONPATH``) to compare code in one run on a shared machine;
the figures are computed as ``scripts/bench.py --phases simulate`` computes them.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
from pathlib import Path
from typing import Any

CHECKOUT = Path(os.environ.get("PYTHONPATH", ".").split(os.pathsep)[0]).resolve()
sys.path.insert(0, str(CHECKOUT / "scripts"))

import bench_simulate  # noqa: E402

SCENARIOS = {
    "10y": bench_simulate.ten_years_with_yearly_dunning,
    "100x1y": bench_simulate.hundred_subscriptions_one_year,
}


def cpu_s(who: int = resource.RUSAGE_SELF) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


async def main() -> None:
    import billing

    figures: dict[str, Any] = {"billing": billing.__file__}
    children = resource.RUSAGE_CHILDREN
    for name in sys.argv[1:] or list(SCENARIOS):
        cpu0, kids0 = cpu_s(), cpu_s(children)
        seconds, timeline = await bench_simulate.measure(SCENARIOS[name]())
        cpu1, kids1 = cpu_s(), cpu_s(children)
        cycles = bench_simulate.cycles_of(timeline)
        bare = await bench_simulate.measure_bare(cycles)
        cpu2, kids2 = cpu_s(), cpu_s(children)
        figures[name] = {
            "s": round(seconds, 2),
            "bare_s": round(bare, 2),
            "ratio": round(seconds / bare, 2),
            "cpu": round(cpu1 - cpu0, 2),
            "bare_cpu": round(cpu2 - cpu1, 2),
            "cpu_ratio": round((cpu1 - cpu0) / (cpu2 - cpu1), 2),
            "children": round(kids1 - kids0, 2),
            "bare_children": round(kids2 - kids1, 2),
            "cycles": sum(cycles),
            "load": round(os.getloadavg()[0], 1),
        }
        print(name, figures[name], file=sys.stderr, flush=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    asyncio.run(main())
