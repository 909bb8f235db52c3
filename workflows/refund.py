"""RefundWorkflow: carries one refund, recorded ``pending`` by its credit note, to a final
status at the provider.

Its one provider activity, ``execute_refund``, is idempotent (see ``activities.settlement``):
it never sends a refund our records or the provider already know, and re-sends a lost one under
the same key. A refund Stripe keeps pending is read again after 1 min, 5 min, 30 min, then every
6 hours, until it succeeds, fails or is canceled (``charge.refund.updated`` records it sooner;
the next read then finds it final). The workflow never fails: an error retrying cannot fix (a
misconfigured provider) waits an hour and tries again, visible in its history and logs.
Started by the API as ``refund-{refund id}`` (a second start joins the first) and by the sweep.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from billing.contracts import PROVIDER_ACTIVITY_TIMEOUT, PROVIDER_HEARTBEAT_TIMEOUT
    from billing.settlement import (
        REFUND_POLL_DELAYS,
        ExecuteRefundInput,
        ExecuteRefundResult,
        RefundSweepInput,
        RefundWorkflowInput,
        RefundWorkflowResult,
        SettlementActivityName,
        SettlementWorkflowName,
        SweepRefundsInput,
        SweepRefundsResult,
    )

_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    maximum_interval=timedelta(minutes=5),
    # A run of transient faults is retried for 12 hours, then the workflow waits and re-drives.
    maximum_attempts=0,
    non_retryable_error_types=["InvalidInput", "NotFound", "PaymentProviderError", "ChangeRefused"],
)
_GIVE_UP_AFTER = timedelta(hours=12)
_AFTER_ERROR = timedelta(hours=1)
#: Reads before the workflow continues as new (bounded history).
_POLLS_PER_RUN = 50


@workflow.defn(name=SettlementWorkflowName.REFUND)
class RefundWorkflow:
    @workflow.run
    async def run(self, input: RefundWorkflowInput) -> RefundWorkflowResult:
        polls = input.polls
        for _ in range(_POLLS_PER_RUN):
            try:
                result = await workflow.execute_activity(
                    SettlementActivityName.EXECUTE_REFUND,
                    ExecuteRefundInput(refund_id=input.refund_id),
                    result_type=ExecuteRefundResult,
                    task_queue=input.payments_task_queue,
                    start_to_close_timeout=PROVIDER_ACTIVITY_TIMEOUT,
                    heartbeat_timeout=PROVIDER_HEARTBEAT_TIMEOUT,
                    schedule_to_close_timeout=_GIVE_UP_AFTER,
                    retry_policy=_RETRY,
                )
            except ActivityError as error:
                # Never fail: the refund is recorded pending and must reach its end.
                workflow.logger.error(
                    "refund %s could not be carried out (%s); trying again in %s",
                    input.refund_id,
                    error.cause or error,
                    _AFTER_ERROR,
                )
                await workflow.sleep(_AFTER_ERROR)
                continue
            if result.status.final:
                return RefundWorkflowResult(
                    refund_id=input.refund_id,
                    status=result.status,
                    stripe_refund_id=result.stripe_refund_id,
                    failure_reason=result.failure_reason,
                )
            await workflow.sleep(REFUND_POLL_DELAYS[min(polls, len(REFUND_POLL_DELAYS) - 1)])
            polls += 1
        workflow.continue_as_new(
            RefundWorkflowInput(
                refund_id=input.refund_id,
                payments_task_queue=input.payments_task_queue,
                polls=polls,
            )
        )


@workflow.defn(name=SettlementWorkflowName.REFUND_SWEEP)
class RefundSweepWorkflow:
    """Every ``interval_s``: start (or join) the workflow of each refund still unfinished
    after the grace period. Runs forever under ``refund-sweeper-{task queue}``, continues as
    new every ``sweeps_per_run`` sweeps, never fails: the next sweep retries a failed one."""

    @workflow.run
    async def run(self, input: RefundSweepInput) -> None:
        for _ in range(input.sweeps_per_run):
            try:
                await workflow.execute_activity(
                    SettlementActivityName.SWEEP_REFUNDS,
                    SweepRefundsInput(grace_s=input.grace_s),
                    result_type=SweepRefundsResult,
                    start_to_close_timeout=timedelta(minutes=5),
                    retry_policy=RetryPolicy(maximum_attempts=2),
                )
            except ActivityError as error:
                workflow.logger.warning("refund sweep failed: %s", error)
            await workflow.sleep(timedelta(seconds=input.interval_s))
        workflow.continue_as_new(input)
