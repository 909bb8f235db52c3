"""``scripts/bench.py --quick --json`` runs end to end, so the benchmark cannot rot. It checks
that every figure is there and sane, never how fast anything was (benchmarks print figures;
the suite asserts no timings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import require_postgres

BENCH = Path(__file__).parents[2] / "scripts" / "bench.py"

POSITIVE = (
    "bare_cycles_per_s",
    "billing_cycles_per_s",
    "billing_cycles_per_s_uncapped",
    "stripe_fake_ceiling_per_s",
    "burst_ratio",
    "events_per_paid_cycle",
    "max_events_per_run",
    "signup_p50_ms",
    "signup_p99_ms",
    "signup_ratio_to_bare_start",
    "invoice_query_p50_ms",
    "invoice_query_p99_ms",
    "invoices_in_db",
    "sim_10y_s",
    "worker_rss_mb_per_1k_idle",
    "max_charge_rate_per_s",
    "configured_charge_rate_per_s",
    "report_mrr_p99_ms",
    "report_ar_aging_p99_ms",
    "report_dunning_p99_ms",
    "report_collections_p99_ms",
    "report_dashboard_overview_p99_ms",
)


#: How far over the cap the charges' *arrivals* at the provider may count in a one-second
#: window: requests leave when their threads wake, a little after their turns.
CHARGE_ARRIVAL_TOLERANCE = 0.1


def test_bench_quick_reports_every_figure() -> None:
    require_postgres()
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    figures = json.loads(done.stdout)
    for key in POSITIVE:
        assert isinstance(figures[key], int | float) and figures[key] > 0, (key, figures)
    # Sane relations, not speeds: every burst subscription was paid, the rate cap held, no
    # request beyond Stripe's limit, the history of a paid cycle at least the bare floor.
    assert figures["burst_paid"] == figures["burst_size"]
    # The cap holds exactly on the turns the shared schedule grants (tests/workflows); this
    # figure counts when the charges reached the provider, a little after their turns: on this
    # 2-core machine, shared and CPU-starved, a late wake-up was measured to put 21 in a
    # one-second window under a cap of 20. Without the schedule, Temporal's token bucket alone
    # lets 29 through in one second in the same burst.
    cap = figures["configured_charge_rate_per_s"]
    assert figures["max_charge_rate_per_s"] <= cap * (1 + CHARGE_ARRIVAL_TOLERANCE), figures
    assert figures["stripe_rate_limit_errors"] == 0
    assert figures["events_per_paid_cycle"] >= 11
    assert figures["max_events_per_run"] < 10_240  # continue-as-new keeps runs bounded
    assert figures["signup_p50_ms"] <= figures["signup_p99_ms"]
    assert figures["invoice_query_p50_ms"] <= figures["invoice_query_p99_ms"]
    assert figures["burst_ratio"] == round(
        figures["billing_cycles_per_s"] / figures["bare_cycles_per_s"], 3
    )
    assert "sim_100x1y_s" in figures  # None in --quick: a minute is too long for CI
