"""Recorded histories of the workflow scenarios replay against today's workflow code without
non-determinism. Re-record after an intended, patched change with:

    BILLING_RECORD_HISTORIES=1 pytest tests/workflows

The settlement workflows' histories come from their tests in tests/workflows
(test_refund_workflow, test_settlement_schedule) and tests/api (test_payout_webhooks, and
test_webhooks' late success for an invoice no workflow settles: InvoicePaymentWorkflow).

Keep the previous recordings in a versioned subfolder (tests/histories/v1/, ...): workflows
started by earlier code are still running somewhere and must replay on the new code.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

import billing.calendar
from tests.cldr import cldr_without
from workflows.invoice_payment import InvoicePaymentWorkflow
from workflows.ledger import PayoutImportWorkflow, SettlementSyncWorkflow
from workflows.refund import RefundSweepWorkflow, RefundWorkflow
from workflows.subscription import SubscriptionWorkflow

#: Every workflow the billing worker runs: a history replays on the class its type names.
#: Histories of the settlement workflows (issue 13) are named after their test and type
#: (``...-RefundWorkflow.json``), recorded by ``tests.conftest.record_workflow_history``.
WORKFLOWS = [
    SubscriptionWorkflow,
    InvoicePaymentWorkflow,
    RefundWorkflow,
    RefundSweepWorkflow,
    PayoutImportWorkflow,
    SettlementSyncWorkflow,
]

ROOT = Path(__file__).parents[1] / "histories"
#: Current recordings at the top level; recordings made by earlier workflow versions in
#: subfolders, which must keep replaying: v1, one billed period per run; v2, 12 periods per
#: run with every step an ordinary activity (before the "local-db-steps" patch and the
#: charge that settles its own payment); v3, the code before the money-safety issue (one
#: PaymentIntent per attempt, no retry spacing, no needs_attention).
HISTORIES = sorted(ROOT.rglob("*.json"))
CURRENT = sorted(ROOT.glob("*.json"))


def test_histories_are_recorded_for_every_scenario() -> None:
    names = " ".join(p.name for p in CURRENT)
    for scenario in (
        "leap_year",
        "feb_29",
        "trial",
        "card_update_on_day_4",
        "exhausted_dunning_cancels",
        "mark_unpaid",
        "hard_decline",
        "authentication_required",
        "cancel_at_period_end",
        "cancel_immediately",
        "pause_skips_billing",
        "ten_years",
        "upgrade_now_is_previewed",
        "downgrade_waits_for_the_renewal",
        "change_during_dunning",
        "change_racing_the_renewal",
        "monthly_to_annual",
        "create_prorations_carries",
        "credit_note_lowers_the_next_retry",
        "lost_signal_leaves_the_next_retry",
    ):
        assert scenario in names, f"no recorded history for {scenario}; re-record (see docstring)"


def test_histories_are_recorded_for_every_settlement_workflow() -> None:
    names = " ".join(p.name for p in CURRENT)
    for workflow_type in (
        "-RefundWorkflow.json",
        "-RefundSweepWorkflow.json",
        "-PayoutImportWorkflow.json",
        "-SettlementSyncWorkflow.json",
        "-InvoicePaymentWorkflow.json",
    ):
        assert workflow_type in names, (
            f"no recorded history of {workflow_type[1:-5]}; re-record (see docstring)"
        )


@pytest.mark.parametrize(
    "path", HISTORIES, ids=[str(p.relative_to(ROOT).with_suffix("")) for p in HISTORIES]
)
async def test_recorded_history_replays(path: Path) -> None:
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    result = await Replayer(workflows=WORKFLOWS).replay_workflow(
        history, raise_on_replay_failure=False
    )
    assert result.replay_failure is None, f"{path.name}: {result.replay_failure}"


@pytest.mark.parametrize(
    "path", HISTORIES, ids=[str(p.relative_to(ROOT).with_suffix("")) for p in HISTORIES]
)
async def test_recorded_history_replays_after_a_babel_that_refuses_its_currency(
    path: Path,
) -> None:
    # A babel release whose CLDR data drops or changes the plans' currencies must not stop a
    # running subscription: its recorded inputs (and continue-as-new payloads) decode as
    # recorded, and the workflow never asks babel again.
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    with cldr_without("USD", "EUR", "JPY"):
        result = await Replayer(workflows=WORKFLOWS).replay_workflow(
            history, raise_on_replay_failure=False
        )
    assert result.replay_failure is None, f"{path.name}: {result.replay_failure}"


@pytest.mark.parametrize(
    "path", CURRENT, ids=[str(p.relative_to(ROOT).with_suffix("")) for p in CURRENT]
)
async def test_recorded_history_replays_under_other_zone_rules(path: Path) -> None:
    # A tzdata release changes dates, never commands: a replay on a worker with other rules
    # (here every zone is Kathmandu's, +05:45) must not fail with a non-determinism error.
    source = resources.files("tzdata").joinpath("zoneinfo", "Asia", "Kathmandu")
    with source.open("rb") as tzif:
        other_rules = ZoneInfo.from_file(tzif, key="Asia/Kathmandu")
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(billing.calendar, "_zone", lambda name: other_rules)
        result = await Replayer(workflows=WORKFLOWS).replay_workflow(
            history, raise_on_replay_failure=False
        )
    assert result.replay_failure is None, f"{path.name}: {result.replay_failure}"
