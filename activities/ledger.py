"""Ledger activities: payouts and balance transactions imported from Stripe, and the daily
reconciliation of charges. Reads only at the provider; every write is keyed by Stripe's ids
(``db.repositories.ledger``), so a retried or repeated import changes nothing."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session, sessionmaker
from temporalio import activity
from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy

from activities.errors import domain_errors_are_final
from billing.charge_reconciliation import UNKNOWN_OUTCOME_AFTER, reconcile_charge
from billing.clock import Clock
from billing.ids import new_id
from billing.ledger import LedgerGateway, ProviderBalanceTransaction, ProviderPayout
from billing.records import ReconciliationFindingRecord
from billing.settlement import (
    ImportPayoutInput,
    ImportPayoutResult,
    LedgerActivityName,
    LedgerWorkflowName,
    PayoutImportWorkflowInput,
    ReconcileChargesInput,
    ReconcileChargesResult,
    SyncLedgerInput,
    SyncLedgerResult,
    payout_import_workflow_id,
)
from db.engine import unit_of_work
from db.repositories import ledger as ledger_repo

log = logging.getLogger(__name__)


class LedgerActivities:
    def __init__(
        self, session_factory: sessionmaker[Session], gateway: LedgerGateway, clock: Clock
    ) -> None:
        self.session_factory = session_factory
        self.gateway = gateway
        self.clock = clock

    def all(self) -> list[Callable[..., Any]]:
        return [self.import_payout, self.sync_ledger, self.reconcile_charges]

    @activity.defn(name=LedgerActivityName.IMPORT_PAYOUT)
    @domain_errors_are_final
    def import_payout(self, input: ImportPayoutInput) -> ImportPayoutResult:
        """The payout as Stripe holds it, and (automatic payouts) every balance transaction it
        paid out, into the ledger and the payout's items, in one transaction."""
        payout = self.gateway.retrieve_payout(payout_id=input.stripe_payout_id)
        return self._import(payout)

    def _import(self, payout: ProviderPayout) -> ImportPayoutResult:
        if payout.automatic:
            # Stripe's ``payout`` filter works for automatic payouts only.
            transactions = self.gateway.list_balance_transactions(payout_id=payout.payout_id)
        elif payout.balance_transaction_id is not None:
            transactions = [
                self.gateway.retrieve_balance_transaction(
                    transaction_id=payout.balance_transaction_id
                )
            ]
        else:
            transactions = []
        with unit_of_work(self.session_factory) as session:
            new = self._record(session, transactions)
            stored = ledger_repo.record_payout(session, payout, at=self.clock.now())
            ledger_repo.record_payout_items(
                session, stored, [t.transaction_id for t in transactions], at=self.clock.now()
            )
        return ImportPayoutResult(
            payout_id=stored.id,
            status=payout.status.value,
            transactions=len(transactions),
            new_ledger_entries=new,
        )

    def _record(self, session: Session, transactions: list[ProviderBalanceTransaction]) -> int:
        new = 0
        for txn in transactions:
            _, inserted = ledger_repo.record_transaction(session, txn, at=self.clock.now())
            new += inserted
        return new

    @activity.defn(name=LedgerActivityName.SYNC_LEDGER)
    @domain_errors_are_final
    def sync_ledger(self, input: SyncLedgerInput) -> SyncLedgerResult:
        """Stripe's payouts and balance transactions of the last ``days`` days: what a lost
        or late webhook did not bring."""
        since = self.clock.now() - timedelta(days=input.days)
        payouts = self.gateway.list_payouts(created_from=since)
        new = 0
        for payout in payouts:
            new += self._import(payout).new_ledger_entries
        transactions = self.gateway.list_balance_transactions(created_from=since)
        with unit_of_work(self.session_factory) as session:
            new += self._record(session, transactions)
        return SyncLedgerResult(payouts=len(payouts), new_ledger_entries=new)

    @activity.defn(name=LedgerActivityName.RECONCILE_CHARGES)
    @domain_errors_are_final
    def reconcile_charges(self, input: ReconcileChargesInput) -> ReconcileChargesResult:
        """The provider's charges of the last ``days`` days against our attempts and payments,
        and our attempts still of unknown outcome; each finding recorded once with its
        severity (``billing.charge_reconciliation``)."""
        now = self.clock.now()
        charges = self.gateway.list_charges(created_from=now - timedelta(days=input.days))
        run_id = input.run_id or f"manual-{now.isoformat()}"
        new: dict[str, int] = {}
        with unit_of_work(self.session_factory) as session:
            findings = [
                finding
                for charge in charges
                for finding in reconcile_charge(charge, ledger_repo.our_side(session, charge))
            ]
            findings.extend(
                ledger_repo.unknown_outcomes(session, older_than=now - UNKNOWN_OUTCOME_AFTER)
            )
            for finding in findings:
                _, inserted = ledger_repo.record_finding(
                    session,
                    ReconciliationFindingRecord(
                        id=new_id("rcf"),
                        kind=finding.kind.value,
                        severity=finding.severity.value,
                        subject_key=finding.subject_key,
                        detail=finding.detail[:1000],
                        found_at=now,
                        run_id=run_id[:100],
                        invoice_id=finding.invoice_id,
                        payment_intent_id=finding.payment_intent_id,
                        charge_id=finding.charge_id,
                        amount_minor=finding.amount_minor,
                        currency=finding.currency,
                    ),
                )
                if inserted:
                    new[finding.kind.value] = new.get(finding.kind.value, 0) + 1
        if new:
            log.warning("charge reconciliation %s found %s", run_id, new)
        return ReconcileChargesResult(charges_checked=len(charges), new_findings=new)


async def start_payout_import(
    client: Client, stripe_payout_id: str, *, task_queue: str, payments_task_queue: str | None
) -> str:
    """Start (or join) the payout's import workflow; a finished one may run again."""
    workflow_id = payout_import_workflow_id(stripe_payout_id)
    await client.start_workflow(
        LedgerWorkflowName.PAYOUT_IMPORT,
        PayoutImportWorkflowInput(
            stripe_payout_id=stripe_payout_id, payments_task_queue=payments_task_queue
        ),
        id=workflow_id,
        task_queue=task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
    )
    return workflow_id
