"""InvoicePaymentWorkflow: records a payment that no subscription workflow will settle.

A ``payment_intent.succeeded`` for an invoice that was closed unpaid (void, uncollectible), or
for an open invoice whose subscription workflow has ended, would otherwise be dropped: money
taken and never booked. The webhook starts this workflow instead, with the id
``invoice-payment-{invoice_id}`` and a conflict policy that joins a run already going, so a
redelivered or repeated event is harmless. It runs one provider activity,
``record_invoice_payment``, which checks the intent with the provider and books it with the
same settlement code as every charge (payment row with fee and net, invoice paid, the reason
on a closed invoice). That activity is idempotent, so a second run after the first finished
records nothing new.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from billing.contracts import (
        PROVIDER_ACTIVITY_TIMEOUT,
        PROVIDER_HEARTBEAT_TIMEOUT,
        ActivityName,
        InvoicePaymentWorkflowInput,
        InvoicePaymentWorkflowResult,
        RecordInvoicePaymentInput,
        RecordInvoicePaymentResult,
        WorkflowName,
    )

#: A provider call, retried until the provider and database answer: the money is already
#: taken, so this must not give up on a passing fault. Errors a retry cannot fix (a payment
#: that does not match the invoice, a misconfigured provider) stop it, visibly failed, for an
#: operator; the event is recorded either way.
_RECORD_TIMEOUT = PROVIDER_ACTIVITY_TIMEOUT
_RECORD_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    maximum_interval=timedelta(minutes=5),
    non_retryable_error_types=[
        "InvalidInput",
        "ChangeRefused",
        "NotFound",
        "PaymentProviderError",
    ],
)


@workflow.defn(name=WorkflowName.INVOICE_PAYMENT)
class InvoicePaymentWorkflow:
    @workflow.run
    async def run(self, input: InvoicePaymentWorkflowInput) -> InvoicePaymentWorkflowResult:
        result = await workflow.execute_activity(
            ActivityName.RECORD_INVOICE_PAYMENT,
            RecordInvoicePaymentInput(
                invoice_id=input.invoice_id, payment_intent_id=input.payment_intent_id
            ),
            result_type=RecordInvoicePaymentResult,
            task_queue=input.payments_task_queue,
            start_to_close_timeout=_RECORD_TIMEOUT,
            heartbeat_timeout=PROVIDER_HEARTBEAT_TIMEOUT,
            retry_policy=_RECORD_RETRY,
        )
        return InvoicePaymentWorkflowResult(
            recorded=result.recorded, payment_id=result.payment_id, reason=result.reason
        )
