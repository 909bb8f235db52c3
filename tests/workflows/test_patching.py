"""The procedure in docs/workflow-changes.md on a real change: runs recorded before the
"local-db-steps" change replay on today's code because of its ``workflow.patched`` guard, and
would break without it."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio import workflow
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer, UnsandboxedWorkflowRunner

from workflows.subscription import PATCH_LOCAL_DB_STEPS, SubscriptionWorkflow

RECORDED_BEFORE = (
    Path(__file__).parents[1]
    / "histories"
    / "v2"
    / "test_leap_year_month_end_anchor_bills_twelve_exact_invoices_sqlite_-s0-run1.json"
)


async def replay(path: Path) -> Exception | None:
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    # Unsandboxed, so the test can swap the guard out of the workflow module it runs.
    replayer = Replayer(
        workflows=[SubscriptionWorkflow], workflow_runner=UnsandboxedWorkflowRunner()
    )
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    return result.replay_failure


async def test_a_run_recorded_before_the_change_replays_behind_the_guard() -> None:
    assert await replay(RECORDED_BEFORE) is None


async def test_the_same_change_without_its_guard_breaks_that_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_patched = workflow.patched

    def unguarded(patch_id: str) -> bool:
        # "Always take the new path": what the change would be without workflow.patched.
        return True if patch_id == PATCH_LOCAL_DB_STEPS else real_patched(patch_id)

    monkeypatch.setattr(workflow, "patched", unguarded)
    failure = await replay(RECORDED_BEFORE)
    assert failure is not None
    assert "nondetermin" in str(failure).lower(), failure
