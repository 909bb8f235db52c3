"""Contracts of the settlement workflows and activities (credit note refunds, the refund
sweep): one ``XInput`` / ``XResult`` each. New fields get defaults, so recorded histories
decode. Kept apart from ``billing.contracts`` (the subscription's) to ease merges."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from billing.credit_notes import RefundStatus


class SettlementActivityName:
    EXECUTE_REFUND = "execute_refund"
    SWEEP_REFUNDS = "sweep_refunds"


class SettlementWorkflowName:
    REFUND = "RefundWorkflow"
    REFUND_SWEEP = "RefundSweepWorkflow"


#: How long a refund recorded ``pending`` may wait before the sweep makes sure its workflow
#: runs (the API starts it at once; this catches a start that never happened).
REFUND_SWEEP_GRACE = timedelta(minutes=2)

#: The waits between two reads of a refund Stripe keeps pending (asynchronous payment
#: methods): 1 min, 5 min, 30 min, then every 6 hours, until it is final.
REFUND_POLL_DELAYS = (
    timedelta(minutes=1),
    timedelta(minutes=5),
    timedelta(minutes=30),
    timedelta(hours=6),
)


@dataclass
class ExecuteRefundInput:
    refund_id: str


@dataclass
class ExecuteRefundResult:
    refund_id: str
    status: RefundStatus
    stripe_refund_id: str | None = None
    #: Why it failed (the provider's refusal or failure reason).
    failure_reason: str | None = None

    @property
    def final(self) -> bool:
        return self.status.final


@dataclass
class RefundWorkflowInput:
    refund_id: str
    #: Task queue of the provider activity (None: the workflow's own).
    payments_task_queue: str | None = None
    #: Reads of a still-pending refund already made by earlier runs (continue-as-new).
    polls: int = 0


@dataclass
class RefundWorkflowResult:
    refund_id: str
    status: RefundStatus
    stripe_refund_id: str | None = None
    failure_reason: str | None = None


@dataclass
class SweepRefundsInput:
    grace_s: float = REFUND_SWEEP_GRACE.total_seconds()


@dataclass
class SweepRefundsResult:
    #: Refund ids whose workflow was started (or found running).
    started: list[str] = field(default_factory=list)


@dataclass
class RefundSweepInput:
    interval_s: float = 60.0
    grace_s: float = REFUND_SWEEP_GRACE.total_seconds()
    sweeps_per_run: int = 100


def refund_sweeper_workflow_id(task_queue: str) -> str:
    return f"refund-sweeper-{task_queue}"


# ---- the ledger and payouts --------------------------------------------------------------


class LedgerActivityName:
    IMPORT_PAYOUT = "import_payout"
    SYNC_LEDGER = "sync_ledger"
    RECONCILE_CHARGES = "reconcile_charges"


class LedgerWorkflowName:
    PAYOUT_IMPORT = "PayoutImportWorkflow"
    SETTLEMENT_SYNC = "SettlementSyncWorkflow"


def payout_import_workflow_id(stripe_payout_id: str) -> str:
    return f"payout-import-{stripe_payout_id}"


#: The Temporal Schedule that runs ``SettlementSyncWorkflow`` (one per task queue).
def settlement_schedule_id(task_queue: str) -> str:
    return f"settlement-daily-{task_queue}"


@dataclass
class ImportPayoutInput:
    stripe_payout_id: str


@dataclass
class PayoutImportWorkflowInput:
    stripe_payout_id: str
    payments_task_queue: str | None = None


@dataclass
class ImportPayoutResult:
    payout_id: str
    status: str
    transactions: int = 0
    new_ledger_entries: int = 0


@dataclass
class SyncLedgerInput:
    #: Import what Stripe created in the last ``days`` days (payouts and transactions).
    days: int = 3


@dataclass
class SyncLedgerResult:
    payouts: int = 0
    new_ledger_entries: int = 0


@dataclass
class ReconcileChargesInput:
    #: Compare the provider's charges of the last ``days`` days with our attempts.
    days: int = 3
    #: Names the run in its findings (the schedule's day); "" for a run by hand.
    run_id: str = ""


@dataclass
class ReconcileChargesResult:
    charges_checked: int = 0
    #: New findings by kind (findings already recorded by an earlier run are not counted).
    new_findings: dict[str, int] = field(default_factory=dict)


@dataclass
class SettlementSyncInput:
    days: int = 3
    payments_task_queue: str | None = None


@dataclass
class SettlementSyncResult:
    payouts: int = 0
    new_ledger_entries: int = 0
    charges_checked: int = 0
    new_findings: dict[str, int] = field(default_factory=dict)
