"""Ledger activities: payouts and balance transactions imported from Stripe, and the daily
reconciliation of charges. Reads only at the provider; every write is keyed by Stripe's ids
(``db.repositories.ledger``), so a retried or repeated import changes nothing."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session, sessionmaker
from temporalio import activity
from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy

from activities import event_log
from activities.errors import domain_errors_are_final
from billing.charge_reconciliation import (
    CANCELABLE_INTENT_STATUSES,
    CHARGE_SEVERITY,
    UNKNOWN_OUTCOME_AFTER,
    ChargeFindingKind,
    reconcile_charge,
)
from billing.clock import Clock
from billing.ids import new_id
from billing.ledger import LedgerGateway, PayoutStatus, ProviderBalanceTransaction, ProviderPayout
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
            now = self.clock.now()
            new = self._record(session, transactions)
            stored = ledger_repo.record_payout(session, payout, at=now)
            ledger_repo.record_payout_items(
                session, stored, [t.transaction_id for t in transactions], at=now
            )
            # Its events in the same transaction (each once per payout: a repeated webhook or
            # the daily sync writes none again): the status it reached, then, for a paid
            # automatic payout (the only kind whose transactions Stripe lists, as Stripe's own
            # reconciliation), the reconciliation of what it paid out.
            shown = ledger_repo.get_payout(session, stored.id) or stored  # imported now
            event_log.payout_recorded(session, shown, now)
            if shown.automatic and PayoutStatus(shown.status) == PayoutStatus.PAID:
                event_log.payout_reconciled(
                    session,
                    shown,
                    lambda: ledger_repo.payout_reconciliation(session, shown),
                    now,
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
        canceled = self._cancel_intents_of_closed_invoices(
            closed_since=now - timedelta(days=input.days), now=now, run_id=run_id
        )
        if canceled:
            new[ChargeFindingKind.OPEN_INTENT_CANCELED.value] = canceled
        if new:
            log.warning("charge reconciliation %s found %s", run_id, new)
        return ReconcileChargesResult(charges_checked=len(charges), new_findings=new)

    def _cancel_intents_of_closed_invoices(
        self, *, closed_since: datetime, now: datetime, run_id: str
    ) -> int:
        """Every PaymentIntent of an invoice closed in the window (void, written off, or paid
        without it) that is still open at Stripe is canceled, so it can never be confirmed
        later, and reported once. The workflows cancel them as they close an invoice; this
        catches what they could not: an invoice closed by code before that, or paid by a credit
        note whose subscription workflow has ended and never heard. A read first, so intents
        already canceled cost no write; a cancel is idempotent at Stripe."""
        with unit_of_work(self.session_factory) as session:
            # An hour's grace: the invoice's own workflow cancels its intent as it closes it.
            candidates = ledger_repo.closed_invoice_intents(
                session, closed_since=closed_since, closed_before=now - UNKNOWN_OUTCOME_AFTER
            )
        canceled = 0
        for closed in candidates:
            status = self.gateway.payment_intent_status(payment_intent_id=closed.payment_intent_id)
            if status not in CANCELABLE_INTENT_STATUSES:
                continue
            result = self.gateway.cancel_payment_intent(payment_intent_id=closed.payment_intent_id)
            if result.paid is not None:
                # Confirmed between the read and the cancel: money taken for a closed invoice.
                # The charge's own reconciliation (late success) reports it; never booked here.
                log.error(
                    "payment intent %s of %s invoice %s succeeded while it was being canceled",
                    closed.payment_intent_id,
                    closed.status,
                    closed.number,
                )
                continue
            with unit_of_work(self.session_factory) as session:
                _, inserted = ledger_repo.record_finding(
                    session,
                    ReconciliationFindingRecord(
                        id=new_id("rcf"),
                        kind=ChargeFindingKind.OPEN_INTENT_CANCELED.value,
                        severity=CHARGE_SEVERITY[ChargeFindingKind.OPEN_INTENT_CANCELED].value,
                        subject_key=closed.payment_intent_id,
                        detail=(
                            f"payment intent {closed.payment_intent_id} of {closed.status} "
                            f"invoice {closed.number} was still open at Stripe ({status}); "
                            "canceled so it can never be confirmed"
                        )[:1000],
                        found_at=now,
                        run_id=run_id[:100],
                        invoice_id=closed.invoice_id,
                        payment_intent_id=closed.payment_intent_id,
                        amount_minor=closed.amount_due_minor,
                        currency=closed.currency,
                    ),
                )
            canceled += int(inserted)
        return canceled


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
