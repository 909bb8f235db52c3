"""SubscriptionWorkflow: one durable workflow per subscription.

It sleeps until each billing date, creates, charges and settles the period's invoice through
activities, runs dunning when a charge fails, and applies the changes callers ask for.

Concurrency model: update and signal handlers never cause effects themselves. They validate,
queue a request in ``self._inbox`` and (for updates) wait for its result. Only the main loop
drains the inbox and runs activities, at points where no charge is in flight. So an immediate
cancel can never void an invoice while its charge is running, and every change is applied in
the order it was accepted.

History stays bounded: the workflow continues-as-new after a number of billed periods (12
by default), at the first period boundary after a run is a year old, and whenever the server
suggests it, carrying ``SubscriptionState``, which describes everything needed to
resume, including dunning progress.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    # Every module whose dataclasses travel in payloads is imported here by name: the payload
    # converter resolves their annotations through the sandbox's sys.modules, which only holds
    # modules imported explicitly inside this block (not their transitive imports).
    import billing.calendar
    import billing.dunning
    import billing.invoices
    import billing.payments
    import billing.plans
    import billing.subscription  # noqa: F401
    from billing.contracts import (
        MAX_INVOICE_IDS_IN_STATE,
        ActivityName,
        AttachPaymentMethodInput,
        AttachPaymentMethodResult,
        CancelInput,
        CancelResult,
        ChargeInvoiceInput,
        ChargeInvoiceResult,
        CloseInvoiceInput,
        CloseInvoiceResult,
        ConfirmAuthenticatedPaymentInput,
        ConfirmAuthenticatedPaymentResult,
        CreateInvoiceInput,
        CreateInvoiceResult,
        EnqueueNotificationInput,
        EnqueueNotificationResult,
        NoticeKind,
        OpenInvoiceView,
        PauseInput,
        PauseResult,
        PaymentAuthenticatedInput,
        PaymentMethodChangedInput,
        ResumeInput,
        ResumeResult,
        SettleInvoiceInput,
        SettleInvoiceResult,
        SubscriptionMessage,
        SubscriptionView,
        SubscriptionWorkflowInput,
        SubscriptionWorkflowResult,
        SyncSubscriptionInput,
        SyncSubscriptionResult,
        UpdatePaymentMethodInput,
        UpdatePaymentMethodResult,
        WorkflowName,
    )
    from billing.dunning import FinalAction
    from billing.errors import ChangeRefused
    from billing.invoices import InvoiceStatus
    from billing.payments import ChargeOutcomeKind
    from billing.subscription import (
        BlockedReason,
        OpenInvoice,
        SubscriptionState,
        SubscriptionStatus,
    )

# Database and notification writes: retried until the database is back.
_DB_TIMEOUT = timedelta(seconds=30)
_DB_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(minutes=1),
    non_retryable_error_types=["InvalidInput", "ChangeRefused", "NotFound"],
)

# Provider calls. Retries re-send the same idempotency key, which the provider honours for 24
# hours; schedule_to_close keeps every retry of one attempt well inside that window.
_PROVIDER_TIMEOUT = timedelta(seconds=60)
_PROVIDER_GIVE_UP = timedelta(hours=12)
_PROVIDER_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    maximum_interval=timedelta(minutes=5),
    non_retryable_error_types=[
        "InvalidInput",
        "ChangeRefused",
        "NotFound",
        "PaymentProviderError",
        "PaymentMethodRejected",
        "MissingPaymentMethod",
    ],
)

_R = TypeVar("_R")


#: Database-only steps (create invoice, sync, notices, close) run as local activities: in the
#: worker, inside the workflow task that decided them, recorded as one marker event each.
#: That saves a server round trip and four history events per step. Patched: runs recorded
#: with them as ordinary activities replay that way (the choice is memoized per run).
PATCH_LOCAL_DB_STEPS = "local-db-steps"


async def _db_activity(name: str, arg: object, result_type: type[_R]) -> _R:
    """A database-only step: retried until the database is back; idempotent like every
    activity (a local activity re-runs if the worker dies before the task completes)."""
    result: _R
    if workflow.patched(PATCH_LOCAL_DB_STEPS):
        result = await workflow.execute_local_activity(
            name,
            arg,
            result_type=result_type,
            start_to_close_timeout=_DB_TIMEOUT,
            retry_policy=_DB_RETRY,
        )
    else:
        result = await workflow.execute_activity(
            name,
            arg,
            result_type=result_type,
            start_to_close_timeout=_DB_TIMEOUT,
            retry_policy=_DB_RETRY,
        )
    return result


async def _provider_activity(
    name: str, arg: object, result_type: type[_R], *, task_queue: str | None
) -> _R:
    """``task_queue``: the rate-capped payments queue from the workflow input (None: the
    workflow's own queue, for runs started before it existed)."""
    result: _R = await workflow.execute_activity(
        name,
        arg,
        result_type=result_type,
        task_queue=task_queue,
        start_to_close_timeout=_PROVIDER_TIMEOUT,
        schedule_to_close_timeout=_PROVIDER_GIVE_UP,
        retry_policy=_PROVIDER_RETRY,
    )
    return result


@dataclass
class _Request:
    """A change accepted by a handler, waiting for the main loop to apply it."""

    kind: str
    payload: Any
    done: bool = False
    result: Any = None
    error: str | None = None
    error_type: str = "ChangeRefused"


#: How long to wait before re-driving a charge whose activity gave up (provider unreachable or
#: misconfigured for 12 hours). The same attempt number, hence the same idempotency key, is
#: re-sent: an attempt whose outcome is unknown must never be replaced by a new key.
PROVIDER_OUTAGE_BACKOFF = timedelta(hours=1)


#: A run continues as new at the first period boundary after it is this old.
MAX_RUN_AGE = timedelta(days=366)
PATCH_RUN_AGE_LIMIT = "continue-as-new-by-run-age"


class _Outcome:
    RETRY = "retry"
    PAYMENT_METHOD_UPDATED = "payment_method_updated"
    AUTHENTICATED = "authenticated"
    EXHAUSTED = "exhausted"
    CANCELED = "canceled"


@workflow.defn(name=WorkflowName.SUBSCRIPTION)
class SubscriptionWorkflow:
    @workflow.init
    def __init__(self, input: SubscriptionWorkflowInput) -> None:
        self.state: SubscriptionState = input.state
        self._periods_per_run = max(1, input.periods_per_run)
        self._periods_billed_this_run = 0
        # Provider calls go to this queue, whose workers cap their rate; fixed by the input, so
        # replay schedules them exactly as the recorded run did.
        self._payments_task_queue = input.payments_task_queue
        self._inbox: list[_Request] = []

    # ================================================================== main loop ==========

    @workflow.run
    async def run(self, input: SubscriptionWorkflowInput) -> SubscriptionWorkflowResult:
        s = self.state
        if s.status == SubscriptionStatus.PENDING:
            await self._start()
        while True:
            await self._drain_inbox()
            if s.status == SubscriptionStatus.CANCELED:
                break
            if s.open_invoice is not None:
                await self._collect(s.open_invoice)
                continue
            if self._should_continue_as_new():
                await self._continue_as_new()
            if s.cancel_at_period_end:
                # Also while paused or unpaid: the subscription still ends when its paid period
                # does (or now, if that end has already passed).
                ends_at = max(s.end_of_paid_through(), workflow.now())
                if await self._sleep_until(ends_at):
                    await self._end(ended_at=ends_at, reason=s.cancel_reason or "canceled")
                continue
            if s.status in (SubscriptionStatus.PAUSED, SubscriptionStatus.UNPAID):
                # Nothing is billed until a resume or a payment-method update arrives.
                await workflow.wait_condition(lambda: bool(self._inbox))
                continue
            due = s.period(s.next_period_index).start
            if await self._sleep_until(due):
                await self._bill_next_period()
        # Requests accepted while the loop was finishing get their refusal, not silence.
        await self._drain_inbox()
        await workflow.wait_condition(workflow.all_handlers_finished)
        return SubscriptionWorkflowResult(
            subscription_id=s.subscription_id,
            status=s.status,
            ended_at=s.ended_at,
            invoices_issued=s.invoices_issued,
        )

    async def _start(self) -> None:
        s = self.state
        trialing = s.trial_end_at is not None and s.trial_end_at > workflow.now()
        s.status = SubscriptionStatus.TRIALING if trialing else SubscriptionStatus.ACTIVE
        await self._sync()

    async def _bill_next_period(self) -> None:
        """Issue the invoice for the next period. Charging happens in ``_collect``."""
        s = self.state
        p = s.period(s.next_period_index)
        if s.status == SubscriptionStatus.TRIALING:
            s.status = SubscriptionStatus.ACTIVE
        invoice: CreateInvoiceResult = await _db_activity(
            ActivityName.CREATE_INVOICE,
            CreateInvoiceInput(
                subscription_id=s.subscription_id,
                customer_id=s.customer_id,
                plan_code=s.plan.code,
                period_index=p.index,
                period_start=p.start,
                period_end=p.end,
                amount_minor=s.plan.amount_minor,
                currency=s.plan.currency,
                description=f"{s.plan.name}",
                issued_at=workflow.now(),
            ),
            CreateInvoiceResult,
        )
        s.next_period_index = p.index + 1
        s.current_period_start, s.current_period_end = p.start, p.end
        s.invoices_issued += 1
        s.invoice_ids.append(invoice.invoice_id)
        del s.invoice_ids[:-MAX_INVOICE_IDS_IN_STATE]
        self._periods_billed_this_run += 1
        if invoice.status == InvoiceStatus.OPEN:
            s.open_invoice = OpenInvoice(
                invoice_id=invoice.invoice_id,
                number=invoice.number,
                period_index=p.index,
                period_start=p.start,
                period_end=p.end,
                amount_minor=invoice.amount_due_minor,
                currency=invoice.currency,
                payment_method_version_seen=s.payment_method_version,
            )
        else:
            # Zero-amount invoices are paid on creation; nothing to collect.
            await self._sync()

    # ================================================================== collection & dunning

    async def _collect(self, inv: OpenInvoice) -> None:
        """Charge the open invoice, then retry on the dunning schedule until it is paid, the
        schedule runs out (final action) or the subscription is canceled."""
        s = self.state
        reason = "scheduled" if inv.attempts == 0 else await self._next_attempt(inv)
        while True:
            if reason == _Outcome.CANCELED or s.open_invoice is not inv:
                return
            if reason == _Outcome.EXHAUSTED:
                await self._final_action(inv)
                return
            if reason == _Outcome.AUTHENTICATED:
                if await self._confirm_authenticated(inv):
                    return
                reason = await self._next_attempt(inv)
                continue
            inv.payment_method_version_seen = s.payment_method_version
            try:
                result: ChargeInvoiceResult = await _provider_activity(
                    ActivityName.CHARGE_INVOICE,
                    ChargeInvoiceInput(
                        invoice_id=inv.invoice_id, attempt_number=inv.attempts + 1, reason=reason
                    ),
                    ChargeInvoiceResult,
                    task_queue=self._payments_task_queue,
                )
            except ActivityError as error:
                # Failing the workflow would stop billing this customer for good; instead wait
                # for an operator to fix the provider, applying changes meanwhile.
                workflow.logger.error(
                    "charge of invoice %s attempt %d failed: %s; retrying the same attempt in %s",
                    inv.invoice_id,
                    inv.attempts + 1,
                    error.cause or error,
                    PROVIDER_OUTAGE_BACKOFF,
                )
                await self._sleep_until(workflow.now() + PROVIDER_OUTAGE_BACKOFF)
                await self._drain_inbox()
                continue
            inv.attempts = result.attempt_number
            inv.last_outcome = result.outcome.value
            if result.outcome == ChargeOutcomeKind.PAID:
                await self._settle(
                    inv,
                    result.attempt_number,
                    result.payment_intent_id,
                    result.charge_id,
                    settled=result.payment_id is not None,
                )
                return
            await self._record_failure(inv, result)
            reason = await self._next_attempt(inv)

    async def _next_attempt(self, inv: OpenInvoice) -> str:
        """Wait for the reason to attempt the invoice again, applying changes meanwhile."""
        s = self.state
        policy = s.plan.dunning
        assert inv.first_failure_at is not None
        while True:
            await self._drain_inbox()
            if s.status == SubscriptionStatus.CANCELED or s.open_invoice is not inv:
                return _Outcome.CANCELED
            if s.payment_method_version != inv.payment_method_version_seen:
                # A new card clears a hard decline or pending authentication: retry at once.
                inv.blocked = None
                return _Outcome.PAYMENT_METHOD_UPDATED
            if s.authenticated_payment_intent_id is not None:
                return _Outcome.AUTHENTICATED
            now = workflow.now()
            next_retry = self._scheduled_retry_at(inv)
            inv.next_retry_at = next_retry
            if next_retry is not None and next_retry <= now:
                inv.scheduled_retries_done += 1
                inv.next_retry_at = None
                return _Outcome.RETRY
            window_end = policy.window_end(inv.first_failure_at)
            if next_retry is None and now >= window_end:
                return _Outcome.EXHAUSTED
            if workflow.info().is_continue_as_new_suggested():
                # Safe mid-dunning: the state carries attempts, schedule position and blocks.
                await self._continue_as_new()
            await self._sleep_until(next_retry if next_retry is not None else window_end)

    def _scheduled_retry_at(self, inv: OpenInvoice) -> datetime | None:
        """The next retry on the dunning schedule; None when exhausted or blocked (a hard
        decline or pending authentication waits for the customer instead)."""
        if inv.blocked is not None or inv.first_failure_at is None:
            return None
        return self.state.plan.dunning.retry_at(inv.first_failure_at, inv.scheduled_retries_done)

    async def _record_failure(self, inv: OpenInvoice, result: ChargeInvoiceResult) -> None:
        s = self.state
        inv.first_failure_at = inv.first_failure_at or workflow.now()
        inv.last_decline_code = result.decline_code
        if result.outcome == ChargeOutcomeKind.HARD_DECLINE:
            inv.blocked = BlockedReason.HARD_DECLINE
        elif result.outcome == ChargeOutcomeKind.AUTHENTICATION_REQUIRED:
            inv.blocked = BlockedReason.AUTHENTICATION_REQUIRED
        else:
            inv.blocked = None
        # Set before anything awaits, so a query never sees past_due without its retry time.
        next_retry = inv.next_retry_at = self._scheduled_retry_at(inv)
        if s.status in (SubscriptionStatus.ACTIVE, SubscriptionStatus.TRIALING):
            # Only the first failure changes what the database shows; later failures are in
            # the attempt rows already, so they cost no extra activity.
            s.status = SubscriptionStatus.PAST_DUE
            await self._sync()
        kind = (
            NoticeKind.ACTION_REQUIRED
            if inv.blocked == BlockedReason.AUTHENTICATION_REQUIRED
            else NoticeKind.PAYMENT_FAILED
        )
        await self._notify(
            kind,
            dedupe_key=f"{inv.invoice_id}:{kind}:{result.attempt_number}",
            invoice_id=inv.invoice_id,
            payload={
                "invoice_number": inv.number,
                "amount_minor": inv.amount_minor,
                "currency": inv.currency,
                "attempt": result.attempt_number,
                "decline_code": result.decline_code,
                "hard_decline": inv.blocked == BlockedReason.HARD_DECLINE,
                "payment_intent_id": result.payment_intent_id,
                "next_retry_at": next_retry.isoformat() if next_retry else None,
            },
        )

    async def _confirm_authenticated(self, inv: OpenInvoice) -> bool:
        s = self.state
        pi_id = s.authenticated_payment_intent_id
        s.authenticated_payment_intent_id = None
        assert pi_id is not None
        confirmed: ConfirmAuthenticatedPaymentResult = await _provider_activity(
            ActivityName.CONFIRM_AUTHENTICATED_PAYMENT,
            ConfirmAuthenticatedPaymentInput(invoice_id=inv.invoice_id, payment_intent_id=pi_id),
            ConfirmAuthenticatedPaymentResult,
            task_queue=self._payments_task_queue,
        )
        if not confirmed.succeeded:
            workflow.logger.info("authenticated payment not confirmed: %s", confirmed.reason)
            return False
        await self._settle(inv, confirmed.attempt_number, pi_id, confirmed.charge_id)
        return True

    async def _settle(
        self,
        inv: OpenInvoice,
        attempt_number: int,
        payment_intent_id: str | None,
        charge_id: str | None,
        *,
        settled: bool = False,
    ) -> None:
        """``settled``: the charge activity already recorded the payment (its result is in
        history, so this choice replays); otherwise ``settle_invoice`` does it now."""
        s = self.state
        if payment_intent_id is None:
            raise ApplicationError(
                f"invoice {inv.invoice_id} was reported paid without a payment intent",
                non_retryable=True,
            )
        if not settled:
            await _provider_activity(
                ActivityName.SETTLE_INVOICE,
                SettleInvoiceInput(
                    invoice_id=inv.invoice_id,
                    attempt_number=attempt_number,
                    payment_intent_id=payment_intent_id,
                    charge_id=charge_id,
                ),
                SettleInvoiceResult,
                task_queue=self._payments_task_queue,
            )
        recovered = inv.first_failure_at is not None
        s.open_invoice = None
        if s.status == SubscriptionStatus.PAST_DUE:
            s.status = SubscriptionStatus.ACTIVE
        await self._sync()
        if recovered:
            await self._notify(
                NoticeKind.PAYMENT_SUCCEEDED_AFTER_FAILURE,
                dedupe_key=f"{inv.invoice_id}:{NoticeKind.PAYMENT_SUCCEEDED_AFTER_FAILURE}",
                invoice_id=inv.invoice_id,
                payload={"invoice_number": inv.number, "attempt": attempt_number},
            )

    async def _final_action(self, inv: OpenInvoice) -> None:
        s = self.state
        closed = await self._close_invoice(inv, InvoiceStatus.UNCOLLECTIBLE, "dunning_exhausted")
        s.open_invoice = None
        if closed.was_paid:
            # Paid out of band (e.g. a webhook) just before the write-off: nothing to do.
            if s.status == SubscriptionStatus.PAST_DUE:
                s.status = SubscriptionStatus.ACTIVE
            await self._sync()
            return
        if s.plan.dunning.final_action == FinalAction.CANCEL:
            await self._end(ended_at=workflow.now(), reason="dunning_exhausted")
        else:
            s.status = SubscriptionStatus.UNPAID
            await self._sync()
            await self._notify(
                NoticeKind.SUBSCRIPTION_UNPAID,
                dedupe_key=f"{inv.invoice_id}:{NoticeKind.SUBSCRIPTION_UNPAID}",
                invoice_id=inv.invoice_id,
                payload={"invoice_number": inv.number},
            )

    async def _close_invoice(
        self, inv: OpenInvoice, status: InvoiceStatus, reason: str
    ) -> CloseInvoiceResult:
        result: CloseInvoiceResult = await _db_activity(
            ActivityName.CLOSE_INVOICE,
            CloseInvoiceInput(
                invoice_id=inv.invoice_id, status=status, reason=reason, at=workflow.now()
            ),
            CloseInvoiceResult,
        )
        return result

    async def _end(self, *, ended_at: datetime, reason: str) -> None:
        s = self.state
        s.status = SubscriptionStatus.CANCELED
        s.canceled_at = s.canceled_at or workflow.now()
        s.ended_at = ended_at
        s.cancel_reason = reason
        await self._sync()
        await self._notify(
            NoticeKind.SUBSCRIPTION_CANCELED,
            dedupe_key=f"{s.subscription_id}:{NoticeKind.SUBSCRIPTION_CANCELED}",
            payload={"reason": reason, "ended_at": ended_at.isoformat()},
        )

    # ================================================================== changes (inbox) =====

    async def _drain_inbox(self) -> None:
        while self._inbox:
            request = self._inbox.pop(0)
            try:
                request.result = await self._apply(request)
            except ChangeRefused as refused:
                request.error = refused.message
            except ApplicationError as error:
                request.error = error.message
                request.error_type = error.type or "ApplicationError"
            except ActivityError as error:
                # e.g. the provider rejected the new card at attach: the caller gets the reason
                # and the subscription carries on unchanged.
                cause = error.cause
                request.error = (
                    cause.message if isinstance(cause, ApplicationError) else str(cause or error)
                )
                request.error_type = (
                    cause.type or "ApplicationError"
                    if isinstance(cause, ApplicationError)
                    else "ActivityError"
                )
            request.done = True

    async def _apply(self, request: _Request) -> Any:
        s = self.state
        now = workflow.now()
        match request.kind:
            case SubscriptionMessage.CANCEL:
                cancel: CancelInput = request.payload
                s.check_cancel(cancel.at_period_end)  # state may have moved since validation
                if cancel.at_period_end:
                    s.cancel_at_period_end = True
                    s.cancel_reason = cancel.reason or "canceled_at_period_end"
                    await self._sync()
                    return CancelResult(s.status, True, max(s.end_of_paid_through(), now))
                voided = None
                if s.open_invoice is not None:
                    closed = await self._close_invoice(
                        s.open_invoice, InvoiceStatus.VOID, "subscription_canceled"
                    )
                    voided = None if closed.was_paid else s.open_invoice.invoice_id
                    s.open_invoice = None
                await self._end(ended_at=now, reason=cancel.reason or "canceled")
                return CancelResult(s.status, s.cancel_at_period_end, now, voided)
            case SubscriptionMessage.PAUSE:
                s.check_pause()
                s.status = SubscriptionStatus.PAUSED
                s.paused_at = now
                await self._sync()
                return PauseResult(s.status, now)
            case SubscriptionMessage.RESUME:
                s.check_resume()
                s.next_period_index = s.next_index_after_resume(now)
                trialing = s.trial_end_at is not None and s.trial_end_at > now
                s.status = SubscriptionStatus.TRIALING if trialing else SubscriptionStatus.ACTIVE
                s.paused_at = None
                await self._sync()
                return ResumeResult(s.status, s.next_billing_at)
            case (
                SubscriptionMessage.UPDATE_PAYMENT_METHOD
                | SubscriptionMessage.PAYMENT_METHOD_CHANGED
            ):
                s.check_payment_method_update()
                pm_id: str = request.payload.payment_method_id
                attached: AttachPaymentMethodResult = await _provider_activity(
                    ActivityName.ATTACH_PAYMENT_METHOD,
                    AttachPaymentMethodInput(
                        subscription_id=s.subscription_id,
                        customer_id=s.customer_id,
                        payment_method_id=pm_id,
                    ),
                    AttachPaymentMethodResult,
                    task_queue=self._payments_task_queue,
                )
                s.payment_method_id = attached.payment_method_id
                s.payment_method_version += 1
                if s.status == SubscriptionStatus.UNPAID:
                    # A working card reactivates billing from the next anchor date.
                    s.next_period_index = s.next_index_after_resume(now)
                    s.status = SubscriptionStatus.ACTIVE
                    await self._sync()
                return UpdatePaymentMethodResult(
                    payment_method_id=attached.payment_method_id,
                    retry_scheduled=s.open_invoice is not None,
                    status=s.status,
                    card_brand=attached.card_brand,
                    card_last4=attached.card_last4,
                )
            case SubscriptionMessage.PAYMENT_AUTHENTICATED:
                auth: PaymentAuthenticatedInput = request.payload
                if s.open_invoice is not None and (
                    auth.invoice_id is None or auth.invoice_id == s.open_invoice.invoice_id
                ):
                    s.authenticated_payment_intent_id = auth.payment_intent_id
                return None
        raise ApplicationError(f"unknown request {request.kind}", non_retryable=True)

    async def _submit(self, kind: str, payload: Any) -> Any:
        """Queue a change for the main loop and wait for its result (updates only)."""
        request = _Request(kind, payload)
        self._inbox.append(request)
        await workflow.wait_condition(lambda: request.done)
        if request.error is not None:
            raise ApplicationError(request.error, type=request.error_type, non_retryable=True)
        return request.result

    @staticmethod
    def _refuse(check: Any, *args: Any) -> None:
        """Run a state check in a validator; a refusal rejects the update before it is
        written to history, with the reason the caller sees."""
        try:
            check(*args)
        except ChangeRefused as refused:
            raise ApplicationError(
                refused.message, type="ChangeRefused", non_retryable=True
            ) from None

    @workflow.update(name=SubscriptionMessage.CANCEL)
    async def cancel(self, input: CancelInput) -> CancelResult:
        result: CancelResult = await self._submit(SubscriptionMessage.CANCEL, input)
        return result

    @cancel.validator
    def _validate_cancel(self, input: CancelInput) -> None:
        self._refuse(self.state.check_cancel, input.at_period_end)

    @workflow.update(name=SubscriptionMessage.PAUSE)
    async def pause(self, input: PauseInput) -> PauseResult:
        result: PauseResult = await self._submit(SubscriptionMessage.PAUSE, input)
        return result

    @pause.validator
    def _validate_pause(self, input: PauseInput) -> None:
        self._refuse(self.state.check_pause)

    @workflow.update(name=SubscriptionMessage.RESUME)
    async def resume(self, input: ResumeInput) -> ResumeResult:
        result: ResumeResult = await self._submit(SubscriptionMessage.RESUME, input)
        return result

    @resume.validator
    def _validate_resume(self, input: ResumeInput) -> None:
        self._refuse(self.state.check_resume)

    @workflow.update(name=SubscriptionMessage.UPDATE_PAYMENT_METHOD)
    async def update_payment_method(
        self, input: UpdatePaymentMethodInput
    ) -> UpdatePaymentMethodResult:
        result: UpdatePaymentMethodResult = await self._submit(
            SubscriptionMessage.UPDATE_PAYMENT_METHOD, input
        )
        return result

    @update_payment_method.validator
    def _validate_update_payment_method(self, input: UpdatePaymentMethodInput) -> None:
        if not input.payment_method_id or not input.payment_method_id.strip():
            raise ApplicationError(
                "payment_method_id must not be empty", type="InvalidInput", non_retryable=True
            )
        self._refuse(self.state.check_payment_method_update)

    @workflow.signal(name=SubscriptionMessage.PAYMENT_METHOD_CHANGED)
    def payment_method_changed(self, input: PaymentMethodChangedInput) -> None:
        if self.state.status != SubscriptionStatus.CANCELED:
            self._inbox.append(_Request(SubscriptionMessage.PAYMENT_METHOD_CHANGED, input))

    @workflow.signal(name=SubscriptionMessage.PAYMENT_AUTHENTICATED)
    def payment_authenticated(self, input: PaymentAuthenticatedInput) -> None:
        self._inbox.append(_Request(SubscriptionMessage.PAYMENT_AUTHENTICATED, input))

    @workflow.query(name=SubscriptionMessage.GET_STATE)
    def get_state(self) -> SubscriptionView:
        s = self.state
        inv = s.open_invoice
        return SubscriptionView(
            subscription_id=s.subscription_id,
            customer_id=s.customer_id,
            status=s.status,
            plan_code=s.plan.code,
            amount_minor=s.plan.amount_minor,
            currency=s.plan.currency,
            interval=s.plan.interval.value,
            interval_count=s.plan.interval_count,
            timezone=s.timezone,
            anchor_at=s.anchor_at,
            trial_end_at=s.trial_end_at,
            current_period_start=s.current_period_start,
            current_period_end=s.current_period_end,
            next_billing_at=s.next_billing_at,
            cancel_at_period_end=s.cancel_at_period_end,
            canceled_at=s.canceled_at,
            ended_at=s.ended_at,
            paused_at=s.paused_at,
            open_invoice=None
            if inv is None
            else OpenInvoiceView(
                invoice_id=inv.invoice_id,
                number=inv.number,
                amount_minor=inv.amount_minor,
                currency=inv.currency,
                period_start=inv.period_start,
                period_end=inv.period_end,
                attempts=inv.attempts,
                first_failure_at=inv.first_failure_at,
                next_retry_at=inv.next_retry_at,
                blocked=inv.blocked.value if inv.blocked else None,
                last_decline_code=inv.last_decline_code,
            ),
            invoice_ids=list(s.invoice_ids),
            invoices_issued=s.invoices_issued,
            run_number=s.run_number,
            history_length=workflow.info().get_current_history_length(),
        )

    # ================================================================== helpers =============

    async def _sleep_until(self, when: datetime) -> bool:
        """Sleep until ``when`` (UTC). True if the time came; False if a change arrived first."""
        delay = when - workflow.now()
        if delay <= timedelta(0):
            return True
        if self._inbox:
            return False
        try:
            await workflow.wait_condition(lambda: bool(self._inbox), timeout=delay)
        except TimeoutError:
            return True
        return False

    def _should_continue_as_new(self) -> bool:
        if self._periods_billed_this_run >= self._periods_per_run:
            return True
        if workflow.info().is_continue_as_new_suggested():
            return True
        # A run also ends once it is a year old (an annual plan bills once a year), far from
        # any run timeout. Patched: runs recorded before this rule replay without it.
        return (
            self._periods_billed_this_run > 0
            and workflow.now() - workflow.info().start_time > MAX_RUN_AGE
            and workflow.patched(PATCH_RUN_AGE_LIMIT)
        )

    async def _continue_as_new(self) -> None:
        # Apply every accepted change first so nothing is lost, and let update handlers
        # return their results to callers before this run ends.
        while self._inbox or not workflow.all_handlers_finished():
            await self._drain_inbox()
            await workflow.wait_condition(
                lambda: bool(self._inbox) or workflow.all_handlers_finished()
            )
        self.state.run_number += 1
        workflow.continue_as_new(
            SubscriptionWorkflowInput(
                state=self.state,
                periods_per_run=self._periods_per_run,
                payments_task_queue=self._payments_task_queue,
            )
        )

    async def _sync(self) -> None:
        s = self.state
        await _db_activity(
            ActivityName.SYNC_SUBSCRIPTION,
            SyncSubscriptionInput(
                subscription_id=s.subscription_id,
                status=s.status,
                current_period_start=s.current_period_start,
                current_period_end=s.current_period_end,
                next_billing_at=s.next_billing_at,
                cancel_at_period_end=s.cancel_at_period_end,
                canceled_at=s.canceled_at,
                ended_at=s.ended_at,
                paused_at=s.paused_at,
                cancel_reason=s.cancel_reason,
                changed_at=workflow.now(),
            ),
            SyncSubscriptionResult,
        )

    async def _notify(
        self,
        kind: str,
        *,
        dedupe_key: str,
        invoice_id: str | None = None,
        payload: dict[str, Any] | None = None,
    ) -> None:
        s = self.state
        await _db_activity(
            ActivityName.ENQUEUE_NOTIFICATION,
            EnqueueNotificationInput(
                kind=kind,
                customer_id=s.customer_id,
                subscription_id=s.subscription_id,
                dedupe_key=dedupe_key,
                invoice_id=invoice_id,
                payload=payload or {},
                created_at=workflow.now(),
            ),
            EnqueueNotificationResult,
        )


__all__ = ["SubscriptionWorkflow"]
