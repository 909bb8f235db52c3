"""What a simulation does once per run, before its first billed period, is kept cheap: its
workers name their build instead of hashing every loaded module, they use the project's
data converter (``billing.temporal_payloads``), and the caller's objects sit out the garbage
collector's full passes while it runs (the database is a copy of a migrated template,
``tests/db/test_sqlite_template.py``)."""

from __future__ import annotations

import gc

import pytest
import temporalio.worker._worker

from billing.simulate.runner import Simulation, run_scenario
from billing.simulate.scenario import parse_scenario
from billing.simulate.timeline import Timeline
from billing.temporal_payloads import BillingPayloadConverter
from billing.testing.payments_process import HARNESS_BUILD_ID


async def test_a_simulation_s_workers_do_not_hash_the_loaded_modules(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refused(*args: object, **kwargs: object) -> str:
        raise AssertionError("the SDK's default build id was computed")

    # The SDK memoizes the hash per process: refuse it as if it never had been.
    monkeypatch.setattr(temporalio.worker._worker, "load_default_build_id", refused)
    seen: dict[str, object] = {}

    async def inspect(simulation: Simulation, timeline: Timeline) -> None:
        worker = simulation.harness._worker
        assert worker is not None
        seen["build_id"] = worker.config().get("build_id")
        seen["converter"] = simulation.harness.client.data_converter.payload_converter_class
        seen["frozen"] = gc.get_freeze_count() > 0

    scenario = parse_scenario(
        {
            "start": "2033-01-10T09:00",
            "subscriptions": [{"plan": "basic-monthly"}],
            "horizon": "2033-03-11",
        }
    )
    # As a test process that never ran `billing simulate` in-process (which freezes for good).
    gc.unfreeze()
    timeline = await run_scenario(scenario, inspect=inspect)

    [subscription] = timeline.subscriptions
    assert [invoice.status for invoice in subscription.invoices] == ["paid", "paid", "paid"]
    assert seen == {
        "build_id": HARNESS_BUILD_ID,
        "converter": BillingPayloadConverter,
        # The test process's objects sat out the collector's full passes, and no longer do.
        "frozen": True,
    }
    assert gc.get_freeze_count() == 0
