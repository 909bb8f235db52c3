"""Ledger workflows: a payout's import (started by its ``payout.*`` webhooks) and the daily
settlement sync run by a Temporal Schedule (the ledger's periodic import, then the charge
reconciliation). Thin: each runs provider-reading activities whose writes are keyed by Stripe's
ids, so a repeat or an overlap changes nothing."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from billing.contracts import PROVIDER_HEARTBEAT_TIMEOUT
    from billing.settlement import (
        ImportPayoutInput,
        ImportPayoutResult,
        LedgerActivityName,
        LedgerWorkflowName,
        PayoutImportWorkflowInput,
        ReconcileChargesInput,
        ReconcileChargesResult,
        SettlementSyncInput,
        SettlementSyncResult,
        SyncLedgerInput,
        SyncLedgerResult,
    )

_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    maximum_interval=timedelta(minutes=5),
    maximum_attempts=50,
    non_retryable_error_types=["InvalidInput", "NotFound", "PaymentProviderError"],
)
#: Listing a month of transactions takes many pages: longer than one provider call.
_SYNC_TIMEOUT = timedelta(minutes=10)


@workflow.defn(name=LedgerWorkflowName.PAYOUT_IMPORT)
class PayoutImportWorkflow:
    @workflow.run
    async def run(self, input: PayoutImportWorkflowInput) -> ImportPayoutResult:
        result: ImportPayoutResult = await workflow.execute_activity(
            LedgerActivityName.IMPORT_PAYOUT,
            ImportPayoutInput(stripe_payout_id=input.stripe_payout_id),
            result_type=ImportPayoutResult,
            task_queue=input.payments_task_queue,
            start_to_close_timeout=_SYNC_TIMEOUT,
            heartbeat_timeout=PROVIDER_HEARTBEAT_TIMEOUT,
            retry_policy=_RETRY,
        )
        return result


@workflow.defn(name=LedgerWorkflowName.SETTLEMENT_SYNC)
class SettlementSyncWorkflow:
    """What the daily Schedule runs: the ledger and payouts of the last days, then the charge
    reconciliation. Its findings are in the database (API, CLI, metric)."""

    @workflow.run
    async def run(self, input: SettlementSyncInput) -> SettlementSyncResult:
        synced = await workflow.execute_activity(
            LedgerActivityName.SYNC_LEDGER,
            SyncLedgerInput(days=input.days),
            result_type=SyncLedgerResult,
            task_queue=input.payments_task_queue,
            start_to_close_timeout=_SYNC_TIMEOUT,
            heartbeat_timeout=PROVIDER_HEARTBEAT_TIMEOUT,
            retry_policy=_RETRY,
        )
        reconciled = await workflow.execute_activity(
            LedgerActivityName.RECONCILE_CHARGES,
            ReconcileChargesInput(days=input.days, run_id=workflow.info().workflow_id),
            result_type=ReconcileChargesResult,
            task_queue=input.payments_task_queue,
            start_to_close_timeout=_SYNC_TIMEOUT,
            heartbeat_timeout=PROVIDER_HEARTBEAT_TIMEOUT,
            retry_policy=_RETRY,
        )
        return SettlementSyncResult(
            payouts=synced.payouts,
            new_ledger_entries=synced.new_ledger_entries,
            charges_checked=reconciled.charges_checked,
            new_findings=reconciled.new_findings,
        )


__all__ = ["PayoutImportWorkflow", "SettlementSyncWorkflow"]
