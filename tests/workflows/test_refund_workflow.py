"""RefundWorkflow and the refund sweep on the time-skipping server, with the real activities,
localstripe (with the settlement double) and a real database: a refund whose answer is lost is
retried by Temporal and made once; one Stripe keeps pending is read until it ends; a refund
whose workflow never started is started by the sweep."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.testing import WorkflowEnvironment

from activities.settlement import start_refund_workflow
from billing.credit_notes import CreditNoteRequest, RefundStatus, refund_workflow_id_for
from billing.invoices import InvoiceStatus
from billing.payments import TransientPaymentError
from billing.refunds import ProviderRefund
from billing.settlement import RefundSweepInput, RefundWorkflowResult, SettlementWorkflowName
from billing.testing.cards import SUCCEEDS
from billing.testing.harness import BillingHarness
from billing.testing.localstripe import LocalStripe
from billing.testing.settlement_double import move_refund, set_new_refund_status
from db.engine import unit_of_work
from db.repositories import credit_notes as credit_notes_repo
from tests.conftest import BOTH_BACKENDS, record_workflow_history


class LosesTheFirstAnswer:
    """The real gateway; the first refund reaches Stripe but its answer is lost."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.creates = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def create_refund(self, **kwargs: Any) -> ProviderRefund:
        self.creates += 1
        made: ProviderRefund = self._inner.create_refund(**kwargs)
        if self.creates == 1:
            raise TransientPaymentError("connection reset while reading Stripe's answer")
        return made


async def paid(h: BillingHarness) -> tuple[str, str]:
    result = await h.signup("basic-monthly", card=SUCCEEDS)
    for _ in range(300):
        snap = h.snapshot(result.subscription_id)
        for invoice in snap.invoices:
            if invoice.status == InvoiceStatus.PAID and snap.payments[invoice.id]:
                charge = snap.payments[invoice.id][0].stripe_charge_id
                assert charge is not None
                return invoice.id, charge
        await asyncio.sleep(0.05)
    raise AssertionError("the first invoice was not paid")


def issue(h: BillingHarness, invoice_id: str, amount: int) -> str:
    with unit_of_work(h.session_factory) as session:
        issued = credit_notes_repo.issue_credit_note(
            session, invoice_id, CreditNoteRequest(refund_amount_minor=amount), at=h.clock.now()
        )
    return issued.refunds[0].id


@BOTH_BACKENDS
async def test_a_refund_whose_answer_is_lost_is_retried_by_temporal_and_made_once(
    request: pytest.FixtureRequest,
    temporal_env: WorkflowEnvironment,
    localstripe: LocalStripe,
    database_url: str,
) -> None:
    h = BillingHarness(temporal_env, database_url=database_url, stripe_api_base=localstripe.url)
    lossy = LosesTheFirstAnswer(h.stripe_gateway)
    h.deps.refund_gateway = lossy
    async with h:
        invoice_id, charge_id = await paid(h)
        refund_id = issue(h, invoice_id, 450)
        await start_refund_workflow(
            h.client, refund_id, task_queue=h.task_queue, payments_task_queue=h.payments_task_queue
        )
        result = await h.client.get_workflow_handle(
            refund_workflow_id_for(refund_id), result_type=RefundWorkflowResult
        ).result()
        assert result.status == RefundStatus.SUCCEEDED
        made = list(h.stripe.v1.refunds.list(params={"charge": charge_id}).data)
        assert [r.amount for r in made] == [450]
        assert result.stripe_refund_id == made[0].id
        # The retry found the refund by its key: it sent nothing again.
        assert lossy.creates == 1
        await record_workflow_history(
            h.client, refund_workflow_id_for(refund_id), request.node.name
        )


async def test_a_pending_refund_is_read_until_it_ends_and_the_sweep_starts_a_forgotten_one(
    request: pytest.FixtureRequest,
    temporal_env: WorkflowEnvironment,
    localstripe: LocalStripe,
    database_url: str,
) -> None:
    async with BillingHarness(
        temporal_env, database_url=database_url, stripe_api_base=localstripe.url
    ) as h:
        invoice_id, charge_id = await paid(h)
        set_new_refund_status(localstripe.url, "pending")
        try:
            refund_id = issue(h, invoice_id, 100)
            # Nobody starts its workflow (an API whose start Temporal never confirmed): the
            # sweep does, once the refund is older than its grace.
            await h.client.start_workflow(
                SettlementWorkflowName.REFUND_SWEEP,
                RefundSweepInput(interval_s=30, grace_s=0, sweeps_per_run=3),
                id=f"refund-sweeper-{h.task_queue}",
                task_queue=h.task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            )
            handle = h.client.get_workflow_handle(
                refund_workflow_id_for(refund_id), result_type=RefundWorkflowResult
            )
            for _ in range(200):
                with unit_of_work(h.session_factory) as session:
                    refund = credit_notes_repo.get_refund(session, refund_id)
                assert refund is not None
                if refund.stripe_refund_id is not None:
                    break
                await asyncio.sleep(0.05)
            assert refund.status == RefundStatus.PENDING and refund.stripe_refund_id
            # Stripe finishes it later; the workflow's next read (after its timer) sees it.
            move_refund(localstripe.url, refund.stripe_refund_id, "succeeded")
            await temporal_env.sleep(timedelta(minutes=2))
            result = await handle.result()
            assert result.status == RefundStatus.SUCCEEDED
            assert len(list(h.stripe.v1.refunds.list(params={"charge": charge_id}).data)) == 1
            await record_workflow_history(
                h.client, refund_workflow_id_for(refund_id), request.node.name
            )
        finally:
            set_new_refund_status(localstripe.url, "succeeded")
            await h.client.get_workflow_handle(f"refund-sweeper-{h.task_queue}").terminate()
            await record_workflow_history(
                h.client, f"refund-sweeper-{h.task_queue}", request.node.name
            )
