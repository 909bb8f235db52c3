"""PendingSignupSweepWorkflow: every ``interval_s`` seconds, sweep the signups still pending
after a grace period (start their workflow, or clean up one that can never start). It runs
forever under a fixed id, continues as new every ``sweeps_per_run`` sweeps, and never fails:
a sweep that errors is retried by the next one."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from billing.signup_sweep import (
        SWEEP_PENDING_SIGNUPS,
        PendingSignupSweepInput,
        SweepPendingSignupsInput,
        SweepPendingSignupsResult,
    )


@workflow.defn(name="PendingSignupSweepWorkflow")
class PendingSignupSweepWorkflow:
    @workflow.run
    async def run(self, input: PendingSignupSweepInput) -> None:
        for _ in range(input.sweeps_per_run):
            try:
                result = await workflow.execute_activity(
                    SWEEP_PENDING_SIGNUPS,
                    SweepPendingSignupsInput(grace_s=input.grace_s),
                    result_type=SweepPendingSignupsResult,
                    start_to_close_timeout=timedelta(minutes=5),
                    # The next sweep is the retry; a failed one must not fail this workflow.
                    retry_policy=RetryPolicy(maximum_attempts=2),
                )
                if result.started or result.cleaned_up or result.failed:
                    workflow.logger.info(
                        "pending signups: %d started, %d cleaned up, %d left",
                        len(result.started),
                        len(result.cleaned_up),
                        len(result.failed),
                    )
            except ActivityError as error:
                workflow.logger.warning("pending-signup sweep failed: %s", error)
            await workflow.sleep(timedelta(seconds=input.interval_s))
        workflow.continue_as_new(input)
