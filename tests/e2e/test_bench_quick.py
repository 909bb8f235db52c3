"""``scripts/bench.py --quick --json`` runs end to end, so the benchmark cannot rot. It checks
that every figure is there and sane, never how fast anything was (benchmarks print figures;
the suite asserts no timings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from billing.pacing import least_span_s
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
    "worker_rss_mb_1k_idle",
    "worker_rss_mb_10k_idle",
    "max_charge_rate_per_s",
    "max_stripe_requests_per_s",
    "configured_charge_rate_per_s",
    "stripe_requests_per_cycle",
    "signup_stripe_requests",
    "burst_cap_use",
    "burst_ratio_uncapped",
    "sim_10y_ratio_to_bare",
    "report_mrr_p99_ms",
    "report_mrr_creation_p99_ms",
    "report_mrr_36_months_p99_ms",
    "report_ar_aging_p99_ms",
    "report_dunning_p99_ms",
    "report_collections_p99_ms",
    "report_dashboard_overview_p99_ms",
    "report_dashboard_invoices_p99_ms",
)
#: The issue's figures that --quick measures, each reported with its goal.
WITH_GOALS = (
    "stripe_requests_per_cycle",
    "signup_stripe_requests",
    "burst_cap_use",
    "burst_ratio_uncapped",
    "signup_p99_ms",
    "worker_rss_mb_10k_idle",
    "sim_10y_ratio_to_bare",
    "max_stripe_requests_per_s",
    # Issue 15: each report and dashboard page, p99 under 200 ms.
    "report_mrr_p99_ms",
    "report_mrr_creation_p99_ms",
    "report_mrr_36_months_p99_ms",
    "report_ar_aging_p99_ms",
    "report_dunning_p99_ms",
    "report_collections_p99_ms",
    "report_dashboard_overview_p99_ms",
    "report_dashboard_invoices_p99_ms",
)


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
    # Counted from what localstripe received: one request per paid cycle, one per new
    # customer's signup (its card created beforehand, as Stripe.js does).
    assert figures["stripe_requests_per_cycle_by_kind"] == {"POST /v1/payment_intents": 1.0}
    assert figures["signup_stripe_requests_by_kind"] == {"POST /v1/customers": 1.0}
    # Charges are among the requests. Whether the cap held at Stripe's end is a figure with a
    # goal, not an assert: the pacer spaces the turns (tests/workflows/test_capped_burst.py),
    # and a request that leaves late on a starved machine can share a window with one turn
    # too many (docs/benchmarks.md, "The rate cap").
    assert 0 < figures["max_charge_rate_per_s"] <= figures["max_stripe_requests_per_s"]
    assert figures["burst_cap_use"] == round(
        figures["billing_cycles_per_s"] / figures["configured_charge_rate_per_s"], 3
    )
    # What a cycle asked of Temporal, from the dev server's metrics (counted, for the bare
    # cycle too), and the dispatcher's wake-ups spaced, not one per receipt.
    for key in ("service", "persistence"):
        assert figures[f"bare_temporal_{key}_requests_per_cycle"] > 0
        assert figures[f"temporal_{key}_requests_per_cycle"] > 0
    wakes = figures["temporal_service_requests_per_cycle_top"].get(
        "frontend:SignalWithStartWorkflowExecution", 0
    )
    assert wakes < 0.4, wakes  # a wake-up per receipt was 0.8 per paid cycle
    # The whole machine's CPU and PostgreSQL's are in the account.
    cpu = figures["burst_cpu_cores"]["cpu_s"]
    assert 0 < cpu["postgres"] < cpu["machine"] and cpu["worker"] < cpu["machine"], cpu
    # The burst's start in steps: the first invoice, its attempt, then its charge at Stripe.
    assert 0 <= figures["burst_first_invoice_s"] <= figures["burst_first_attempt_s"]
    assert figures["burst_first_attempt_s"] <= figures["burst_start_s"]
    assert figures["burst_timer_fired_late_s_median"] >= 0
    # Once charging, the pacer's turns being spaced, the rate is never above the cap by more
    # than one request's share.
    # At most what the pacer's ring allows: its first ring goes out at twice the sustained
    # rate, so a short burst's charging rate may exceed the cap (1.135 of it for 60 at 20).
    size, cap = figures["burst_size"], figures["configured_charge_rate_per_s"]
    most = (size - 1) / least_span_s(size, cap) / cap
    assert 0 < figures["burst_cap_use_charging"] <= most + 0.01
    for key in WITH_GOALS:
        assert isinstance(figures["goals"][key]["met"], bool), (key, figures["goals"])
    assert figures["goals"]["stripe_requests_per_cycle"]["met"] is True
    assert figures["stripe_rate_limit_errors"] == 0
    assert figures["events_per_paid_cycle"] >= 11
    assert figures["max_events_per_run"] < 10_240  # continue-as-new keeps runs bounded
    assert figures["signup_p50_ms"] <= figures["signup_p99_ms"]
    assert figures["invoice_query_p50_ms"] <= figures["invoice_query_p99_ms"]
    assert figures["burst_ratio"] == round(
        figures["billing_cycles_per_s"] / figures["bare_cycles_per_s"], 3
    )
    # None in --quick: a minute is too long for CI.
    assert figures["sim_100x1y_s"] is None and figures["sim_100x1y_ratio_to_bare"] is None
