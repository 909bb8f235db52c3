"""Settlement activities: refunds of credit notes, and the sweep that makes sure each is
followed to its end.

A refund follows the charge's crash-proof discipline:

* it is recorded ``pending``, with its key ``{credit note}-refund-{n}``, in the transaction that
  issues its credit note, before the provider hears of it;
* ``execute_refund`` first asks the provider whether a refund with that key exists (the key
  rides in the refund's metadata), and sends one only if none does, under that key: a worker
  killed before Stripe answered, or after it answered and before our write, finds the refund
  on its retry and records it; nothing is refunded twice, even after Stripe forgot the key
  (24 hours), and even on a Stripe double that ignores keys;
* a refund with a provider id is only read again (Stripe's pending refunds), never re-sent;
* a refusal the provider will repeat (more than is left of the charge, a charge refunded or
  disputed elsewhere meanwhile) is recorded ``failed`` with the provider's reason, visible to
  finance, instead of being retried forever.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session, sessionmaker
from temporalio import activity
from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy

from activities import event_log
from activities.errors import domain_errors_are_final
from billing.clock import Clock
from billing.contracts import InvoiceCreditedInput, SubscriptionMessage, workflow_id_for
from billing.credit_notes import RefundReason, RefundSource, refund_workflow_id_for
from billing.errors import NotFound
from billing.invoices import InvoiceStatus
from billing.records import InvoiceRecord, RefundRecord
from billing.refunds import ProviderRefund, RefundGateway, RefundRefused
from billing.settlement import (
    ExecuteRefundInput,
    ExecuteRefundResult,
    RefundWorkflowInput,
    SettlementActivityName,
    SettlementWorkflowName,
    SweepRefundsInput,
    SweepRefundsResult,
)
from billing.text import FAILURE_MESSAGE, clean_provider_text
from db.engine import unit_of_work
from db.repositories import credit_notes as credit_notes_repo

log = logging.getLogger(__name__)


#: TEST ONLY: called with the refund's key after the provider answered its create and before
#: that answer is written down (the instant a crash leaves a refund made with only a pending
#: row to show for it). Tests and fault-injection runs kill the worker here.
AfterRefundHook = Callable[[str], None]


def _result(refund: RefundRecord) -> ExecuteRefundResult:
    return ExecuteRefundResult(
        refund_id=refund.id,
        status=refund.status,
        stripe_refund_id=refund.stripe_refund_id,
        failure_reason=refund.failure_reason,
    )


class SettlementActivities:
    def __init__(
        self,
        session_factory: sessionmaker[Session],
        gateway: RefundGateway,
        clock: Clock,
        *,
        after_refund_hook: AfterRefundHook | None = None,
    ) -> None:
        self.session_factory = session_factory
        self.gateway = gateway
        self.clock = clock
        self._after_refund_hook = after_refund_hook

    def provider(self) -> list[Callable[..., Any]]:
        """The activities that call the provider (the payments task queue)."""
        return [self.execute_refund]

    @activity.defn(name=SettlementActivityName.EXECUTE_REFUND)
    @domain_errors_are_final
    def execute_refund(self, input: ExecuteRefundInput) -> ExecuteRefundResult:
        """Carry the refund one step towards its end (see the module docstring)."""
        with unit_of_work(self.session_factory) as session:
            refund = credit_notes_repo.get_refund(session, input.refund_id)
        if refund is None:
            raise NotFound(f"refund {input.refund_id} not found")
        if refund.status.final:
            return _result(refund)
        if refund.stripe_refund_id is not None:
            # Made at the provider already: only read it (Stripe's pending refund).
            reported = self.gateway.retrieve_refund(refund_id=refund.stripe_refund_id)
            return _result(self._record(refund, reported))
        if refund.source != RefundSource.CREDIT_NOTE or refund.idempotency_key is None:
            raise NotFound(f"refund {refund.id} has neither a provider id nor a key to send")
        if refund.stripe_charge_id is None:
            raise NotFound(f"refund {refund.id} names no charge to refund")
        key = refund.idempotency_key
        # Read before any send: a send whose answer was lost must be found, never repeated.
        found = self.gateway.find_refund(charge_id=refund.stripe_charge_id, idempotency_key=key)
        if found is not None:
            log.info(
                "refund %s (%s) was made before its answer was lost: %s",
                refund.id,
                key,
                found.refund_id,
            )
            return _result(self._record(refund, found))
        try:
            made = self.gateway.create_refund(
                charge_id=refund.stripe_charge_id,
                amount_minor=refund.amount_minor,
                currency=refund.currency,
                reason=refund.reason or RefundReason.REQUESTED_BY_CUSTOMER,
                idempotency_key=key,
                metadata={
                    "refund_id": refund.id,
                    "credit_note_id": refund.credit_note_id or "",
                    "invoice_id": refund.invoice_id,
                },
            )
        except RefundRefused as refused:
            log.warning("refund %s refused by the provider: %s", refund.id, refused)
            return _result(self._record_refusal(refund, str(refused)))
        if self._after_refund_hook is not None:
            self._after_refund_hook(key)
        return _result(self._record(refund, made))

    def _record(self, refund: RefundRecord, reported: ProviderRefund) -> RefundRecord:
        at = self.clock.now()
        with unit_of_work(self.session_factory) as session:
            recorded = credit_notes_repo.record_refund_outcome(
                session, refund.id, _cleaned(reported), at=at
            )
            # The status it reached, in the same transaction (once per status: a retry, or
            # the webhook that recorded it first, finds the event written).
            event_log.refund_recorded(session, recorded, at)
            return recorded

    def _record_refusal(self, refund: RefundRecord, reason: str) -> RefundRecord:
        at = self.clock.now()
        with unit_of_work(self.session_factory) as session:
            recorded = credit_notes_repo.record_refund_refusal(
                session,
                refund.id,
                clean_provider_text(reason, FAILURE_MESSAGE) or "refused",
                at=at,
            )
            event_log.refund_recorded(session, recorded, at)
            return recorded


def _cleaned(reported: ProviderRefund) -> ProviderRefund:
    """The provider's text made storable (its failure reason is free text from Stripe)."""
    return replace(
        reported, failure_reason=clean_provider_text(reported.failure_reason, FAILURE_MESSAGE)
    )


class RefundSweepActivities:
    """Starts the workflow of every refund still unfinished after a grace period: a start the
    API could not make, or one whose run ended without a final status. Async: it starts
    workflows through the worker's own client."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        clock: Clock,
        *,
        task_queue: str,
        payments_task_queue: str | None,
    ) -> None:
        self.session_factory = session_factory
        self.clock = clock
        self.task_queue = task_queue
        self.payments_task_queue = payments_task_queue

    @activity.defn(name=SettlementActivityName.SWEEP_REFUNDS)
    async def sweep_refunds(self, input: SweepRefundsInput) -> SweepRefundsResult:
        before = self.clock.now() - timedelta(seconds=input.grace_s)

        def read() -> list[RefundRecord]:
            with unit_of_work(self.session_factory) as session:
                return credit_notes_repo.list_unfinished_refunds(session, created_before=before)

        refunds = await asyncio.to_thread(read)
        started = []
        for refund in refunds:
            if refund.source != RefundSource.CREDIT_NOTE and refund.stripe_refund_id is None:
                continue
            await start_refund_workflow(
                activity.client(),
                refund.id,
                task_queue=self.task_queue,
                payments_task_queue=self.payments_task_queue,
            )
            started.append(refund.id)
        return SweepRefundsResult(started=started)


async def start_refund_workflow(
    client: Client, refund_id: str, *, task_queue: str, payments_task_queue: str | None
) -> str:
    """Start the refund's workflow, or join the one running (``refund-{id}``); a finished run
    may run again (its activity does nothing twice). Returns the workflow id."""
    workflow_id = refund_workflow_id_for(refund_id)
    await client.start_workflow(
        SettlementWorkflowName.REFUND,
        RefundWorkflowInput(refund_id=refund_id, payments_task_queue=payments_task_queue),
        id=workflow_id,
        task_queue=task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
    )
    return workflow_id


async def signal_invoice_credited(
    client: Client, invoice: InvoiceRecord, credit_note_id: str
) -> None:
    """After a pre-payment credit note committed: tell the invoice's subscription workflow its
    amount due (0: the credit paid it, and dunning stops now). True if Temporal took the
    signal. A lost signal costs nothing but time: the workflow's next charge attempt reads the
    invoice under the customer's lock, charges the lower amount or finds it paid. Raises what
    the client raises (no such workflow, Temporal unreachable)."""
    await client.get_workflow_handle(workflow_id_for(invoice.subscription_id)).signal(
        SubscriptionMessage.INVOICE_CREDITED,
        InvoiceCreditedInput(
            invoice_id=invoice.id,
            # Paid (by the credit, or carried as below the minimum charge): nothing is due.
            amount_due_minor=0
            if invoice.status == InvoiceStatus.PAID
            else invoice.amount_due_minor,
            credit_note_id=credit_note_id,
        ),
    )


__all__ = [
    "AfterRefundHook",
    "RefundSweepActivities",
    "SettlementActivities",
    "signal_invoice_credited",
    "start_refund_workflow",
]
