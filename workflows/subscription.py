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

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Generic, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, FailureError

with workflow.unsafe.imports_passed_through():
    # Every module whose dataclasses travel in payloads is imported here by name: the payload
    # converter resolves their annotations through the sandbox's sys.modules, which only holds
    # modules imported explicitly inside this block (not their transitive imports).
    import billing.calendar
    import billing.collection
    import billing.dunning
    import billing.invoices
    import billing.payments
    import billing.plan_change
    import billing.plans
    import billing.proration
    import billing.subscription  # noqa: F401
    from billing.collection import (
        AttemptReason,
        BillPeriod,
        Charge,
        ConfirmAuthenticated,
        ContinueAsNew,
        EndAtPeriodEnd,
        Finish,
        RetryRules,
        RunFacts,
        Settle,
        SettleByCredit,
        SleepUntil,
        Step,
        TakeFinalAction,
        WaitForChange,
        decide,
        next_retry,
        timer_delay,
    )
    from billing.contracts import (
        MAX_INVOICE_IDS_IN_STATE,
        MAX_RECENT_CHANGES,
        PROVIDER_ACTIVITY_TIMEOUT,
        PROVIDER_HEARTBEAT_TIMEOUT,
        ActivityName,
        AttachPaymentMethodInput,
        AttachPaymentMethodResult,
        CancelInput,
        CancelInvoicePaymentInput,
        CancelInvoicePaymentResult,
        CancelPendingChangeInput,
        CancelPendingChangeResult,
        CancelResult,
        ChangePlanInput,
        ChangePlanResult,
        ChangePreview,
        ChargeInvoiceInput,
        ChargeInvoiceResult,
        CloseInvoiceInput,
        CloseInvoiceResult,
        ConfirmAuthenticatedPaymentInput,
        ConfirmAuthenticatedPaymentResult,
        CreateChangeInvoiceInput,
        CreateInvoiceInput,
        CreateInvoiceResult,
        EnqueueNotificationInput,
        EnqueueNotificationResult,
        InvoiceCreditedInput,
        NoticeKind,
        OpenInvoiceView,
        PauseInput,
        PauseResult,
        PaymentAuthenticatedInput,
        PaymentMethodChangedInput,
        PendingChangeView,
        PreviewChangeInput,
        ResumeBillingInput,
        ResumeBillingResult,
        ResumeInput,
        ResumeResult,
        SettleInvoiceInput,
        SettleInvoiceResult,
        SubscriptionMessage,
        SubscriptionTerms,
        SubscriptionView,
        SubscriptionWorkflowInput,
        SubscriptionWorkflowResult,
        SyncSubscriptionInput,
        SyncSubscriptionResult,
        UpdatePaymentMethodInput,
        UpdatePaymentMethodResult,
        WorkflowName,
        workflow_id_for,
    )
    from billing.dunning import FinalAction
    from billing.errors import BillingError, ChangeRefused, InvalidInput
    from billing.invoices import InvoiceStatus
    from billing.payments import ChargeOutcomeKind
    from billing.plan_change import (
        ChangeDecision,
        ChangeRequest,
        check_change,
        decide_change,
        interval_changes,
    )
    from billing.subscription import (
        Attention,
        BlockedReason,
        OpenInvoice,
        PendingChange,
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
_PROVIDER_TIMEOUT = PROVIDER_ACTIVITY_TIMEOUT
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


async def _db_activity(name: str, arg: object, result_type: type[_R], *, local: bool = True) -> _R:
    """A database-only step: retried until the database is back; idempotent like every
    activity (a local activity re-runs if the worker dies before the task completes).

    ``local=False``: an ordinary activity even in runs with local steps. A local activity runs
    inside the workflow task that decides it, so a task that is then discarded (and decided
    again, perhaps differently: another of several racing updates wins) has already written.
    An ordinary activity is scheduled only by a workflow task that completed, so what it
    writes is the decision history kept."""
    result: _R
    if local and workflow.patched(PATCH_LOCAL_DB_STEPS):
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
    name: str,
    arg: object,
    result_type: type[_R],
    *,
    task_queue: str | None,
    give_up: timedelta = _PROVIDER_GIVE_UP,
) -> _R:
    """``task_queue``: the rate-capped payments queue from the workflow input (None: the
    workflow's own queue, for runs started before it existed). ``give_up``: how long retries
    of a transient fault go on."""
    result: _R = await workflow.execute_activity(
        name,
        arg,
        result_type=result_type,
        task_queue=task_queue,
        start_to_close_timeout=_PROVIDER_TIMEOUT,
        heartbeat_timeout=PROVIDER_HEARTBEAT_TIMEOUT,
        schedule_to_close_timeout=give_up,
        retry_policy=_PROVIDER_RETRY,
    )
    return result


#: An immediate cancel waits this long for the provider to settle or cancel the open invoice's
#: payment; then it is refused (nothing changed) and the caller can try again, instead of
#: waiting out a provider outage.
CANCEL_PAYMENT_GIVE_UP = timedelta(minutes=2)


def _refused_by_provider(error: ActivityError) -> ApplicationError | None:
    """The provider's (or our records') refusal a retry cannot fix, if that is what failed the
    activity (None for a timeout or retries running out on a transient fault)."""
    cause = error.cause
    if isinstance(cause, ApplicationError) and cause.non_retryable:
        return cause
    return None


#: A change a handler accepted: one of the update or signal inputs, typed.
Change = (
    CancelInput
    | PauseInput
    | ResumeInput
    | ResumeBillingInput
    | UpdatePaymentMethodInput
    | PaymentMethodChangedInput
    | PaymentAuthenticatedInput
    | ChangePlanInput
    | CancelPendingChangeInput
    | InvoiceCreditedInput
)
#: What applying a change answers (signals answer None).
ChangeResult = (
    CancelResult
    | PauseResult
    | ResumeResult
    | ResumeBillingResult
    | UpdatePaymentMethodResult
    | ChangePlanResult
    | CancelPendingChangeResult
)
_C = TypeVar("_C", bound=ChangeResult)


@dataclass
class _Request(Generic[_C]):
    """A change accepted by a handler, waiting for the main loop to apply it."""

    change: Change
    #: The update's id (a plan change's key: its invoice and lines are named by it).
    update_id: str = ""
    done: bool = False
    result: ChangeResult | None = None
    error: str | None = None
    error_type: str = "ChangeRefused"


#: How long to wait before re-driving a charge whose activity gave up (provider unreachable or
#: misconfigured for 12 hours). The same attempt number, hence the same idempotency key, is
#: re-sent: an attempt whose outcome is unknown must never be replaced by a new key.
PROVIDER_OUTAGE_BACKOFF = timedelta(hours=1)


#: A run continues as new at the first period boundary after it is this old.
MAX_RUN_AGE = timedelta(days=366)
PATCH_RUN_AGE_LIMIT = "continue-as-new-by-run-age"

# The money-safety changes alter the commands a run issues. Each is patched: a run that had
# already passed the point where it applies, on the code before, replays that way (the choice
# is memoized per run); every run that reaches it on this code takes it.
#: Missed retry slots are skipped and automatic attempts spaced (billing.collection).
PATCH_SPACED_RETRIES = "spaced-retries"
#: An invoice's PaymentIntent is settled or canceled at the provider before the invoice is
#: voided or written off.
PATCH_CANCEL_PAYMENT_BEFORE_CLOSE = "cancel-payment-before-close"
#: Card news from the provider (the default already changed there) causes no provider write.
PATCH_CARD_NEWS_WITHOUT_PROVIDER_WRITE = "card-news-without-provider-write"
#: A card given for one subscription reaches the customer's other subscriptions.
PATCH_CARD_TO_SIBLINGS = "card-change-to-siblings"
#: The database steps of an accepted change are ordinary activities (see ``_db_activity``).
PATCH_CHANGE_STEPS_NOT_LOCAL = "change-steps-not-local"
#: A charge the provider refuses for good (bad key, invalid request) parks the subscription
#: for an operator instead of being re-sent every hour unseen.
PATCH_PARK_ON_PROVIDER_REFUSAL = "park-on-provider-refusal"
#: An authentication still waiting when the invoice is paid another way is dropped with it
#: (it would otherwise be "confirmed" against the next invoice's first failure).
PATCH_CLEAR_AUTHENTICATION_WHEN_PAID = "clear-authentication-when-paid"
#: Plan and quantity changes (issue 12). The marker is written where a change is applied, so a
#: later revision of that path can tell runs that applied changes on this code.
PATCH_PLAN_CHANGES = "plan-changes"
#: Credit notes on open invoices (issue 13): the ``invoice_credited`` signal is acted on. A run
#: recorded before its handler existed (a signal an older worker left unhandled) replays
#: without it; every run that receives one on this code takes it.
PATCH_OPEN_INVOICE_CREDIT = "open-invoice-credit"
#: A timer that fired before its instant by ``workflow.now()`` (counted from a worker clock
#: ahead of Temporal's, see ``billing.collection.timer_delay``) is followed by a timer for the
#: rest. Asked only in that case, so a normal cycle records no marker; a run recorded before,
#: where a timer fired a moment early (cluster hosts' clocks a few ms apart), replays as it
#: ran: the time came.
PATCH_SLEEP_THE_REST = "sleep-the-rest"


@dataclass
class _Parked(Exception):
    """Raised by a step that failed in a way retrying cannot fix."""

    step: str
    reason: str


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
        self._inbox: list[_Request[ChangeResult]] = []
        #: (the task's ``workflow.now()``, the clock its last sync read as it finished): used
        #: by ``_sleep_until`` in that task only.
        self._observed: tuple[datetime, datetime] | None = None
        # True while an accepted change is applied (its database steps are not local).
        self._applying_change = False
        # The accepted change being applied, if any (the inbox holds those after it).
        self._applying: _Request[ChangeResult] | None = None
        # The last plan changes' answers, by Update id, carried across continue-as-new.
        self._recent_changes: list[ChangePlanResult] = list(input.recent_changes)

    # ================================================================== main loop ==========

    @workflow.run
    async def run(self, input: SubscriptionWorkflowInput) -> SubscriptionWorkflowResult:
        """Ask ``billing.collection.decide`` what is next and do it, until the subscription
        ends. Never fails: a step that cannot succeed parks the subscription (needs_attention)
        until an operator resumes billing."""
        s = self.state
        if s.status == SubscriptionStatus.PENDING:
            await self._guarded("start the subscription", self._start())
        while True:
            await self._drain_inbox()
            step = decide(s, workflow.now(), self._run_facts())
            if isinstance(step, Finish):
                break
            await self._do(step)
        # Requests accepted while the loop was finishing get their refusal, not silence.
        await self._drain_inbox()
        await workflow.wait_condition(workflow.all_handlers_finished)
        return SubscriptionWorkflowResult(
            subscription_id=s.subscription_id,
            status=s.status,
            ended_at=s.ended_at,
            invoices_issued=s.invoices_issued,
        )

    async def _do(self, step: Step) -> None:
        s = self.state
        match step:
            case WaitForChange():
                # Paused, unpaid (no invoices until a resume or a new card) or parked.
                await workflow.wait_condition(lambda: bool(self._inbox))
            case SleepUntil(at=at, then=then):
                if s.open_invoice is not None and s.open_invoice.first_failure_at is not None:
                    s.open_invoice.next_retry_at = self._next_retry_at(s.open_invoice)
                if await self._sleep_until(at) and then is not None:
                    await self._do(then)
            case ContinueAsNew():
                await self._continue_as_new()
            case BillPeriod():
                await self._guarded("issue the next invoice", self._bill_next_period())
            case EndAtPeriodEnd(ended_at=ended_at):
                reason = s.cancel_reason or "canceled"
                await self._guarded(
                    "end the subscription", self._end(ended_at=ended_at, reason=reason)
                )
            case Charge():
                assert s.open_invoice is not None
                inv = s.open_invoice
                await self._guarded(f"charge invoice {inv.number}", self._charge(inv, step))
            case ConfirmAuthenticated(payment_intent_id=pi_id):
                assert s.open_invoice is not None
                inv = s.open_invoice
                await self._guarded(
                    f"confirm the authenticated payment of invoice {inv.number}",
                    self._confirm_authenticated(inv, pi_id),
                )
            case Settle():
                assert s.open_invoice is not None
                inv = s.open_invoice
                await self._guarded(f"settle invoice {inv.number}", self._settle(inv))
            case SettleByCredit():
                assert s.open_invoice is not None
                inv = s.open_invoice
                await self._guarded(
                    f"close invoice {inv.number}, paid by a credit note",
                    self._settle_by_credit(inv),
                )
            case TakeFinalAction():
                assert s.open_invoice is not None
                inv = s.open_invoice
                await self._guarded(
                    f"take the final action on invoice {inv.number}", self._final_action(inv)
                )
            case Finish():
                pass

    def _run_facts(self) -> RunFacts:
        """The facts ``decide`` needs beyond the state. Evaluated in the same order as the code
        before the decision function (the run-age patch and the retry-rules patch are asked
        only where that code asked them), so recorded runs replay."""
        s = self.state
        inv = s.open_invoice
        parked_or_ended = s.status in (
            SubscriptionStatus.CANCELED,
            SubscriptionStatus.NEEDS_ATTENTION,
        )
        due = not parked_or_ended and inv is None and self._should_continue_as_new()
        rules = RetryRules.LEGACY
        if not parked_or_ended and inv is not None and inv.attempts > 0:
            rules = self._retry_rules()
        return RunFacts(
            continue_as_new_due=due,
            continue_as_new_suggested=workflow.info().is_continue_as_new_suggested(),
            rules=rules,
        )

    def _retry_rules(self) -> RetryRules:
        return RetryRules.SPACED if workflow.patched(PATCH_SPACED_RETRIES) else RetryRules.LEGACY

    def _next_retry_at(self, inv: OpenInvoice) -> datetime | None:
        nxt = next_retry(self.state.plan.dunning, inv, workflow.now(), self._retry_rules())
        return None if nxt is None else nxt.at

    async def _guarded(self, step: str, action: Awaitable[None]) -> None:
        """Run one step; if it fails in a way its retry policy cannot fix, park the
        subscription with the reason instead of failing the workflow (which would stop billing
        this customer for good)."""
        try:
            await action
        except _Parked as parked:
            await self._park(parked.step, parked.reason)
        except FailureError as error:
            await self._park(step, _describe_failure(error))

    async def _park(self, step: str, reason: str) -> None:
        s = self.state
        workflow.logger.error(
            "subscription %s needs attention: %s failed: %s", s.subscription_id, step, reason
        )
        previous = s.status
        if previous == SubscriptionStatus.NEEDS_ATTENTION and s.attention is not None:
            previous = s.attention.previous_status
        s.attention = Attention(
            step=step, reason=reason[:2000], since=workflow.now(), previous_status=previous
        )
        s.status = SubscriptionStatus.NEEDS_ATTENTION
        workflow.metric_meter().create_counter(
            "billing_subscriptions_parked",
            "subscriptions parked in needs_attention, waiting for an operator",
        ).add(1, {"step": step.split(" ", 1)[0]})
        try:
            await self._sync()
        except FailureError as error:
            # The database cannot take it either; the workflow still shows it (query), and
            # the next sync (on resume) writes it.
            workflow.logger.error("could not record needs_attention: %s", error)

    async def _start(self) -> None:
        s = self.state
        trialing = s.trial_end_at is not None and s.trial_end_at > workflow.now()
        s.status = SubscriptionStatus.TRIALING if trialing else SubscriptionStatus.ACTIVE
        await self._sync()

    async def _bill_next_period(self) -> None:
        """Issue the invoice for the next period. Charging happens in ``_charge``."""
        s = self.state
        self._apply_pending_change()
        p = s.period(s.next_period_index)
        invoice: CreateInvoiceResult = await _db_activity(
            ActivityName.CREATE_INVOICE,
            CreateInvoiceInput(
                subscription_id=s.subscription_id,
                customer_id=s.customer_id,
                plan_code=s.plan.code,
                period_index=p.index,
                period_start=p.start,
                period_end=p.end,
                amount_minor=s.plan.amount_minor * s.quantity,
                currency=s.plan.currency,
                description=f"{s.plan.name}",
                issued_at=workflow.now(),
                quantity=s.quantity,
                unit_amount_minor=s.plan.amount_minor,
                extra_lines=list(s.pending_lines),
            ),
            CreateInvoiceResult,
        )
        # Billed under the current terms for this period (a later change's credit cap); the
        # carried prorations are on this invoice now.
        s.terms_billed_minor = s.plan.amount_minor * s.quantity
        s.pending_lines = []
        # State changes only once the invoice exists: a failure above parks the run with the
        # period still to bill, and resuming issues it (idempotent per period).
        if s.status == SubscriptionStatus.TRIALING:
            s.status = SubscriptionStatus.ACTIVE
        s.record_invoiced_period(p, invoice.period_start, invoice.period_end)
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

    def _apply_pending_change(self) -> None:
        """A change scheduled for the period end takes effect as the next period is billed:
        the renewal bills the new terms. An interval change re-anchors at the renewal."""
        s = self.state
        pending = s.pending_change
        if pending is None:
            return
        if interval_changes(s.plan, pending.plan):
            renewal = s.period(s.next_period_index)
            s.anchor_at = renewal.start
            s.next_period_index = 0
            # Periods now follow the new anchor (period 0 starts at the renewal).
            s.current_period_index = None
        s.plan = pending.plan
        s.quantity = pending.quantity
        s.pending_change = None
        s.changes_applied += 1

    async def _change_plan(self, request: ChangeRequest) -> ChangePlanResult:
        """Apply an accepted plan or quantity change (``billing.plan_change`` decides)."""
        s = self.state
        now = workflow.now()
        workflow.patched(PATCH_PLAN_CHANGES)
        decision = decide_change(s, request, now)
        if decision.scheduled:
            s.pending_change = PendingChange(
                change_id=request.change_id,
                plan=request.plan,
                quantity=request.quantity,
                requested_at=now,
            )
            return ChangePlanResult(
                change_id=request.change_id,
                effective=request.effective.value,
                effective_at=decision.effective_at,
                plan_code=request.plan.code,
                quantity=request.quantity,
                proration="none",
                pending=True,
            )
        voided_id: str | None = None
        if decision.adjust_open_invoice:
            inv = s.open_invoice
            assert inv is not None
            closed = await self._close_invoice(inv, InvoiceStatus.VOID, "plan_changed")
            if closed is not None:
                s.open_invoice = None
                if not closed.was_paid:
                    voided_id = inv.invoice_id
            if voided_id is None:
                # Paid after all (the provider held a payment): a paid period is credited.
                if s.status == SubscriptionStatus.PAST_DUE:
                    s.status = SubscriptionStatus.ACTIVE
                decision = decide_change(s, request, now)
        invoice: CreateInvoiceResult | None = None
        if decision.invoice_now:
            assert s.current_period_start is not None and s.current_period_end is not None
            first = decision.lines[0].period_start if decision.lines else now
            try:
                invoice = await self._issue_change_invoice(request, decision, voided_id, first)
            except ActivityError as error:
                if voided_id is not None:
                    # The period's renewal is void and its replacement could not be issued:
                    # the period is unbilled, so an operator must look, never silence.
                    await self._park(
                        f"issue the invoice of change {request.change_id}",
                        f"renewal {voided_id} was voided for the change, then: "
                        f"{_describe_failure(error)}",
                    )
                raise
        # The state moves only once the invoice exists.
        s.plan = request.plan
        s.quantity = request.quantity
        s.changes_applied += 1
        s.terms_billed_minor = decision.terms_billed_minor
        if decision.carry_lines:
            s.pending_lines.extend(decision.lines)
        if decision.new_anchor_at is not None and decision.new_period_end is not None:
            s.anchor_at = decision.new_anchor_at
            s.current_period_index = 0
            s.current_period_start = decision.new_anchor_at
            s.current_period_end = decision.new_period_end
            s.next_period_index = 1
        if invoice is not None:
            s.invoices_issued += 1
            s.invoice_ids.append(invoice.invoice_id)
            del s.invoice_ids[:-MAX_INVOICE_IDS_IN_STATE]
            if invoice.status == InvoiceStatus.OPEN:
                s.open_invoice = OpenInvoice(
                    invoice_id=invoice.invoice_id,
                    number=invoice.number,
                    period_index=s.current_period_index or 0,
                    period_start=invoice.period_start or now,
                    period_end=invoice.period_end or decision.effective_at,
                    amount_minor=invoice.amount_due_minor,
                    currency=invoice.currency,
                    payment_method_version_seen=s.payment_method_version,
                    change_id=request.change_id,
                )
        await self._sync()
        return ChangePlanResult(
            change_id=request.change_id,
            effective=request.effective.value,
            effective_at=now,
            plan_code=request.plan.code,
            quantity=request.quantity,
            lines=list(decision.lines),
            proration=(
                "always_invoice"
                if decision.invoice_now
                else "create_prorations"
                if decision.carry_lines
                else "none"
            ),
            invoice_id=invoice.invoice_id if invoice else None,
            invoice_status=invoice.status.value if invoice else None,
            amount_due_minor=invoice.amount_due_minor if invoice else None,
            voided_invoice_id=voided_id,
        )

    async def _issue_change_invoice(
        self,
        request: ChangeRequest,
        decision: ChangeDecision,
        voided_id: str | None,
        first: datetime,
    ) -> CreateInvoiceResult:
        s = self.state
        assert s.current_period_start is not None and s.current_period_end is not None
        invoice: CreateInvoiceResult = await _db_activity(
            ActivityName.CREATE_CHANGE_INVOICE,
            CreateChangeInvoiceInput(
                subscription_id=s.subscription_id,
                customer_id=s.customer_id,
                change_id=request.change_id,
                period_index=s.current_period_index or 0,
                period_start=s.current_period_start if voided_id else first,
                period_end=decision.new_period_end or s.current_period_end,
                currency=s.plan.currency,
                description=f"Change to {request.plan.name}"
                + (f" x {request.quantity}" if request.quantity != 1 else ""),
                issued_at=decision.effective_at,
                lines=list(decision.lines),
                replaces_invoice_id=voided_id,
            ),
            CreateInvoiceResult,
            local=False,
        )
        return invoice

    # ================================================================== collection & dunning

    async def _charge(self, inv: OpenInvoice, step: Charge) -> None:
        """One charge attempt of the open invoice (``step`` says why), then its outcome."""
        s = self.state
        if step.unblock:
            inv.blocked = None
        if step.reason == AttemptReason.RETRY:
            inv.scheduled_retries_done = step.retry_slots_done
            inv.next_retry_at = None
        inv.payment_method_version_seen = s.payment_method_version
        while True:
            try:
                result: ChargeInvoiceResult = await _provider_activity(
                    ActivityName.CHARGE_INVOICE,
                    ChargeInvoiceInput(
                        invoice_id=inv.invoice_id,
                        attempt_number=inv.attempts + 1,
                        reason=step.reason.value,
                    ),
                    ChargeInvoiceResult,
                    task_queue=self._payments_task_queue,
                )
                break
            except ActivityError as error:
                refused = _refused_by_provider(error)
                if refused is not None and workflow.patched(PATCH_PARK_ON_PROVIDER_REFUSAL):
                    # Retrying cannot fix it: an operator must (the attempt stays as it is;
                    # resuming re-drives it under its own key).
                    raise _Parked(
                        f"charge invoice {inv.number}",
                        f"{refused.type or 'ApplicationError'}: {refused.message}",
                    ) from error
                # The provider was unreachable for the activity's whole window. The same
                # attempt (same key) is re-driven after a pause, applying changes meanwhile:
                # its outcome is unknown, so it is never replaced.
                workflow.logger.error(
                    "charge of invoice %s attempt %d failed: %s; retrying the same attempt in %s",
                    inv.invoice_id,
                    inv.attempts + 1,
                    error.cause or error,
                    PROVIDER_OUTAGE_BACKOFF,
                )
                await self._sleep_until(workflow.now() + PROVIDER_OUTAGE_BACKOFF)
                await self._drain_inbox()
                if s.status == SubscriptionStatus.CANCELED or s.open_invoice is not inv:
                    return
        if result.paid_by_credit:
            # A credit note paid the invoice (its signal lost or not yet applied): nothing was
            # sent to the provider. ``decide`` ends the collection next (SettleByCredit).
            inv.paid_by_credit = True
            return
        if result.amount_due_minor is not None:
            # A credit note may have lowered it since the invoice was issued.
            inv.amount_minor = result.amount_due_minor
        inv.attempts = result.attempt_number
        inv.last_outcome = result.outcome.value
        inv.last_attempt_at = workflow.now()
        if result.outcome == ChargeOutcomeKind.PAID:
            if result.payment_intent_id is None:
                raise _Parked(
                    f"charge invoice {inv.number}",
                    f"invoice {inv.invoice_id} was reported paid without a payment intent",
                )
            inv.paid_attempt_number = result.attempt_number
            inv.paid_payment_intent_id = result.payment_intent_id
            inv.paid_charge_id = result.charge_id
            await self._settle(inv, settled=result.payment_id is not None)
            return
        await self._record_failure(inv, result)

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
        next_retry_at = inv.next_retry_at = self._next_retry_at(inv)
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
                # The provider's authentication page (action required); None: none given.
                "authentication_url": result.authentication_url,
                "next_retry_at": next_retry_at.isoformat() if next_retry_at else None,
            },
        )

    async def _confirm_authenticated(self, inv: OpenInvoice, pi_id: str) -> None:
        s = self.state
        s.authenticated_payment_intent_id = None
        confirmed: ConfirmAuthenticatedPaymentResult = await _provider_activity(
            ActivityName.CONFIRM_AUTHENTICATED_PAYMENT,
            ConfirmAuthenticatedPaymentInput(invoice_id=inv.invoice_id, payment_intent_id=pi_id),
            ConfirmAuthenticatedPaymentResult,
            task_queue=self._payments_task_queue,
        )
        if not confirmed.succeeded:
            workflow.logger.info("authenticated payment not confirmed: %s", confirmed.reason)
            return
        inv.paid_attempt_number = confirmed.attempt_number
        inv.paid_payment_intent_id = pi_id
        inv.paid_charge_id = confirmed.charge_id
        await self._settle(inv)

    async def _settle(self, inv: OpenInvoice, *, settled: bool = False) -> None:
        """The open invoice was charged (``inv.paid_*``): record the payment unless the charge
        activity already did (``settled``: its result is in history, so this replays), then
        close the collection."""
        assert inv.paid_attempt_number is not None and inv.paid_payment_intent_id is not None
        if not settled:
            await _provider_activity(
                ActivityName.SETTLE_INVOICE,
                SettleInvoiceInput(
                    invoice_id=inv.invoice_id,
                    attempt_number=inv.paid_attempt_number,
                    payment_intent_id=inv.paid_payment_intent_id,
                    charge_id=inv.paid_charge_id,
                ),
                SettleInvoiceResult,
                task_queue=self._payments_task_queue,
            )
        await self._paid(inv, inv.paid_attempt_number)

    async def _settle_by_credit(self, inv: OpenInvoice) -> None:
        """A credit note paid the open invoice: its PaymentIntent is canceled at the provider
        (nobody can pay it afterwards), then collection ends, without a charge and without the
        "payment succeeded" notice. An invoice the database still shows open (a stale signal)
        goes on being collected."""
        result: CancelInvoicePaymentResult = await _provider_activity(
            ActivityName.CANCEL_INVOICE_PAYMENT,
            CancelInvoicePaymentInput(
                invoice_id=inv.invoice_id, reason="paid_by_credit_note", only_if_paid=True
            ),
            CancelInvoicePaymentResult,
            task_queue=self._payments_task_queue,
        )
        if not result.paid:
            inv.paid_by_credit = False
            return
        await self._paid(inv, result.attempt_number, notify=not result.paid_by_credit)

    async def _paid(self, inv: OpenInvoice, attempt_number: int, *, notify: bool = True) -> None:
        """The open invoice's payment is recorded: collection is over. ``notify``: False when
        no payment was taken (a credit note paid it)."""
        s = self.state
        recovered = notify and inv.first_failure_at is not None
        s.open_invoice = None
        if s.authenticated_payment_intent_id is not None and workflow.patched(
            PATCH_CLEAR_AUTHENTICATION_WHEN_PAID
        ):
            s.authenticated_payment_intent_id = None
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
        if closed is None:
            return  # the provider held a payment: recorded, collection over
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
        self,
        inv: OpenInvoice,
        status: InvoiceStatus,
        reason: str,
        *,
        give_up: timedelta = _PROVIDER_GIVE_UP,
    ) -> CloseInvoiceResult | None:
        """Void or write off the open invoice. First its payment is settled or canceled at the
        provider: an attempt whose outcome is unknown is resolved, a success is recorded (None
        is returned: the invoice was paid, and collection is over), and the PaymentIntent is
        canceled so nobody can pay it afterwards."""
        if workflow.patched(PATCH_CANCEL_PAYMENT_BEFORE_CLOSE):
            payment: CancelInvoicePaymentResult = await _provider_activity(
                ActivityName.CANCEL_INVOICE_PAYMENT,
                CancelInvoicePaymentInput(invoice_id=inv.invoice_id, reason=reason),
                CancelInvoicePaymentResult,
                task_queue=self._payments_task_queue,
                give_up=give_up,
            )
            if payment.paid:
                await self._paid(inv, payment.attempt_number, notify=not payment.paid_by_credit)
                return None
        result: CloseInvoiceResult = await _db_activity(
            ActivityName.CLOSE_INVOICE,
            CloseInvoiceInput(
                invoice_id=inv.invoice_id, status=status, reason=reason, at=workflow.now()
            ),
            CloseInvoiceResult,
            local=not self._change_steps_not_local(),
        )
        return result

    async def _end(self, *, ended_at: datetime, reason: str) -> None:
        s = self.state
        s.status = SubscriptionStatus.CANCELED
        s.canceled_at = s.canceled_at or workflow.now()
        s.ended_at = ended_at
        s.cancel_reason = reason
        s.attention = None
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
            self._applying_change = True
            self._applying = request
            try:
                request.result = await self._apply(request.change, request.update_id)
            except ChangeRefused as refused:
                request.error = refused.message
            except BillingError as invalid:
                # e.g. InvalidInput from a plan change the state no longer allows.
                request.error = invalid.message
                request.error_type = type(invalid).__name__
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
            finally:
                self._applying_change = False
                self._applying = None
            request.done = True

    def _change_steps_not_local(self) -> bool:
        return self._applying_change and workflow.patched(PATCH_CHANGE_STEPS_NOT_LOCAL)

    async def _apply(self, change: Change, update_id: str = "") -> ChangeResult | None:
        s = self.state
        now = workflow.now()
        match change:
            case CancelInput():
                s.check_cancel(change.at_period_end)  # state may have moved since validation
                if change.at_period_end:
                    s.cancel_at_period_end = True
                    s.cancel_reason = change.reason or "canceled_at_period_end"
                    await self._sync()
                    return CancelResult(s.status, True, max(s.end_of_paid_through(), now))
                voided = None
                if s.open_invoice is not None:
                    inv = s.open_invoice
                    try:
                        closed = await self._close_invoice(
                            inv,
                            InvoiceStatus.VOID,
                            "subscription_canceled",
                            give_up=CANCEL_PAYMENT_GIVE_UP,
                        )
                    except ActivityError as error:
                        # Never void an invoice whose payment the provider could not account
                        # for: it may have taken the money. Nothing has changed; say so.
                        advice = "try again later"
                        if s.attention is not None:
                            advice = (
                                f"the subscription is parked ({s.attention.step}: "
                                f"{s.attention.reason}); fix that cause and resume billing, "
                                "then cancel, or cancel at period end now"
                            )
                        raise ChangeRefused(
                            f"subscription {s.subscription_id} was not canceled: the payment "
                            f"of invoice {inv.number} could not be settled or canceled at the "
                            f"payment provider ({_describe_failure(error)}); nothing was "
                            f"changed; {advice}"
                        ) from error
                    voided = None if closed is None or closed.was_paid else inv.invoice_id
                    s.open_invoice = None
                await self._end(ended_at=now, reason=change.reason or "canceled")
                return CancelResult(s.status, s.cancel_at_period_end, now, voided)
            case PauseInput():
                s.check_pause()
                s.status = SubscriptionStatus.PAUSED
                s.paused_at = now
                await self._sync()
                return PauseResult(s.status, now)
            case ResumeInput():
                s.check_resume()
                s.next_period_index = s.next_index_after_resume(now)
                trialing = s.trial_end_at is not None and s.trial_end_at > now
                s.status = SubscriptionStatus.TRIALING if trialing else SubscriptionStatus.ACTIVE
                s.paused_at = None
                await self._sync()
                return ResumeResult(s.status, s.next_billing_at)
            case ResumeBillingInput():
                s.check_resume_billing()
                assert s.attention is not None
                step = s.attention.step
                s.status = s.attention.previous_status
                s.attention = None
                await self._sync()
                return ResumeBillingResult(s.status, step)
            case UpdatePaymentMethodInput():
                s.check_payment_method_update()
                attached = await self._attach(change.payment_method_id)
                if workflow.patched(PATCH_CARD_TO_SIBLINGS):
                    await self._tell_siblings(attached)
                return UpdatePaymentMethodResult(
                    payment_method_id=attached.payment_method_id,
                    retry_scheduled=s.open_invoice is not None,
                    status=s.status,
                    card_brand=attached.card_brand,
                    card_last4=attached.card_last4,
                )
            case PaymentMethodChangedInput():
                s.check_payment_method_update()
                if not workflow.patched(PATCH_CARD_NEWS_WITHOUT_PROVIDER_WRITE):
                    await self._attach(change.payment_method_id)
                    return None
                # The card is already the customer's default at the provider (that is the
                # news). Writing to the provider again would make it send the news again.
                if change.payment_method_id != s.payment_method_id:
                    await self._card_changed(change.payment_method_id)
                return None
            case ChangePlanInput():
                # The state may have moved since the validator accepted it.
                request = check_change(
                    s,
                    plan=change.plan,
                    quantity=change.quantity,
                    effective=change.effective,
                    proration=change.proration,
                    change_id=update_id,
                )
                result = await self._change_plan(request)
                self._recent_changes.append(result)
                del self._recent_changes[:-MAX_RECENT_CHANGES]
                return result
            case CancelPendingChangeInput():
                pending = s.pending_change
                if pending is None:
                    raise ChangeRefused(f"subscription {s.subscription_id} has no change pending")
                s.pending_change = None
                return CancelPendingChangeResult(
                    change_id=pending.change_id,
                    plan_code=pending.plan.code,
                    quantity=pending.quantity,
                )
            case InvoiceCreditedInput():
                credited = s.open_invoice
                if credited is not None and credited.invoice_id == change.invoice_id:
                    # Amounts due only go down: a late or repeated signal never raises it.
                    credited.amount_minor = min(credited.amount_minor, change.amount_due_minor)
                    if change.amount_due_minor == 0:
                        credited.paid_by_credit = True
                return None
            case PaymentAuthenticatedInput():
                if s.open_invoice is not None and (
                    change.invoice_id is None or change.invoice_id == s.open_invoice.invoice_id
                ):
                    s.authenticated_payment_intent_id = change.payment_intent_id
                return None
        raise ApplicationError(f"unknown change {change!r}", non_retryable=True)

    async def _attach(self, payment_method_id: str) -> AttachPaymentMethodResult:
        s = self.state
        attached: AttachPaymentMethodResult = await _provider_activity(
            ActivityName.ATTACH_PAYMENT_METHOD,
            AttachPaymentMethodInput(
                subscription_id=s.subscription_id,
                customer_id=s.customer_id,
                payment_method_id=payment_method_id,
            ),
            AttachPaymentMethodResult,
            task_queue=self._payments_task_queue,
        )
        await self._card_changed(attached.payment_method_id)
        return attached

    async def _card_changed(self, payment_method_id: str) -> None:
        s = self.state
        s.payment_method_id = payment_method_id
        s.payment_method_version += 1
        if s.status == SubscriptionStatus.UNPAID:
            # A working card reactivates billing from the next anchor date.
            s.next_period_index = s.next_index_after_resume(workflow.now())
            s.status = SubscriptionStatus.ACTIVE
            await self._sync()

    async def _tell_siblings(self, attached: AttachPaymentMethodResult) -> None:
        """The card is the customer's: their other subscriptions use it too (one blocked by a
        hard decline retries now). Signals are durable commands of this workflow, so a crash
        cannot lose them; a sibling that has ended is skipped."""
        news = PaymentMethodChangedInput(payment_method_id=attached.payment_method_id)
        for subscription_id in attached.other_subscription_ids:
            if subscription_id == self.state.subscription_id:
                continue
            handle = workflow.get_external_workflow_handle(workflow_id_for(subscription_id))
            try:
                await handle.signal(SubscriptionMessage.PAYMENT_METHOD_CHANGED, news)
            except FailureError as error:
                workflow.logger.info(
                    "subscription %s did not take the new card: %s", subscription_id, error
                )

    async def _submit(self, change: Change, result_type: type[_C], update_id: str = "") -> _C:
        """Queue a change for the main loop and wait for its result (updates only)."""
        request: _Request[ChangeResult] = _Request(change, update_id)
        self._inbox.append(request)
        await workflow.wait_condition(lambda: request.done)
        if request.error is not None:
            raise ApplicationError(request.error, type=request.error_type, non_retryable=True)
        assert isinstance(request.result, result_type)
        return request.result

    def _queued_cancels(self) -> list[bool]:
        """``at_period_end`` of each cancel accepted and not applied yet. A validator and the
        start of its handler run in one step of the same task (the SDK's ``run_update``), so a
        cancel accepted in this very activation is already in the inbox when the next one's
        validator runs."""
        waiting = [self._applying] if self._applying is not None else []
        return [
            r.change.at_period_end
            for r in waiting + self._inbox
            if isinstance(r.change, CancelInput) and not r.done
        ]

    @staticmethod
    def _refuse_invalid(change: Change) -> None:
        """Refuse, in a validator, input the database could not store (NUL, a card number,
        too long...): such a value never enters the workflow's history or state."""
        try:
            change.check()
        except InvalidInput as invalid:
            raise ApplicationError(
                invalid.message, invalid.field, type="InvalidInput", non_retryable=True
            ) from None

    def _enqueue_news(
        self, change: PaymentMethodChangedInput | PaymentAuthenticatedInput | InvoiceCreditedInput
    ) -> None:
        """A signal's news, unless it carries text the database could not store (a signal
        cannot be refused; it is dropped with a warning instead)."""
        try:
            change.check()
        except InvalidInput as invalid:
            workflow.logger.warning("dropped %s: %s", type(change).__name__, invalid.message)
            return
        self._inbox.append(_Request(change))

    @staticmethod
    def _refuse(check: Callable[..., None], *args: object) -> None:
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
        return await self._submit(input, CancelResult)

    @cancel.validator
    def _validate_cancel(self, input: CancelInput) -> None:
        self._refuse_invalid(input)
        self._refuse(self.state.check_cancel, input.at_period_end, self._queued_cancels())

    @workflow.update(name=SubscriptionMessage.PAUSE)
    async def pause(self, input: PauseInput) -> PauseResult:
        return await self._submit(input, PauseResult)

    @pause.validator
    def _validate_pause(self, input: PauseInput) -> None:
        self._refuse_invalid(input)
        self._refuse(self.state.check_pause)

    @workflow.update(name=SubscriptionMessage.RESUME)
    async def resume(self, input: ResumeInput) -> ResumeResult:
        return await self._submit(input, ResumeResult)

    @resume.validator
    def _validate_resume(self, input: ResumeInput) -> None:
        self._refuse_invalid(input)
        self._refuse(self.state.check_resume)

    @workflow.update(name=SubscriptionMessage.RESUME_BILLING)
    async def resume_billing(self, input: ResumeBillingInput) -> ResumeBillingResult:
        return await self._submit(input, ResumeBillingResult)

    @resume_billing.validator
    def _validate_resume_billing(self, input: ResumeBillingInput) -> None:
        self._refuse_invalid(input)
        self._refuse(self.state.check_resume_billing)

    @workflow.update(name=SubscriptionMessage.UPDATE_PAYMENT_METHOD)
    async def update_payment_method(
        self, input: UpdatePaymentMethodInput
    ) -> UpdatePaymentMethodResult:
        return await self._submit(input, UpdatePaymentMethodResult)

    @update_payment_method.validator
    def _validate_update_payment_method(self, input: UpdatePaymentMethodInput) -> None:
        if not input.payment_method_id or not input.payment_method_id.strip():
            raise ApplicationError(
                "payment_method_id must not be empty", type="InvalidInput", non_retryable=True
            )
        self._refuse_invalid(input)
        self._refuse(self.state.check_payment_method_update)

    def _applied_change(self) -> ChangePlanResult | None:
        """The answer of the change this Update repeats (same id), if it was applied in this
        run or, before a continue-as-new, in an earlier one."""
        info = workflow.current_update_info()
        if info is None:
            return None
        return next((r for r in self._recent_changes if r.change_id == info.id), None)

    @workflow.update(name=SubscriptionMessage.CHANGE_PLAN)
    async def change_plan(self, input: ChangePlanInput) -> ChangePlanResult:
        info = workflow.current_update_info()
        assert info is not None
        applied = self._applied_change()
        if applied is not None:
            # A repeat of a change applied earlier (its Idempotency-Key's retry, perhaps after
            # a continue-as-new): the first answer, nothing changed again.
            return applied
        return await self._submit(input, ChangePlanResult, info.id)

    @change_plan.validator
    def _validate_change_plan(self, input: ChangePlanInput) -> None:
        self._refuse_invalid(input)
        if self._applied_change() is not None:
            return  # answered with the first result, whatever the state says now
        try:
            check_change(
                self.state,
                plan=input.plan,
                quantity=input.quantity,
                effective=input.effective,
                proration=input.proration,
                change_id="",
            )
        except BillingError as refused:
            raise ApplicationError(
                refused.message,
                refused.field,
                type="ChangeRefused" if isinstance(refused, ChangeRefused) else "InvalidInput",
                non_retryable=True,
            ) from None

    @workflow.update(name=SubscriptionMessage.CANCEL_PENDING_CHANGE)
    async def cancel_pending_change(
        self, input: CancelPendingChangeInput
    ) -> CancelPendingChangeResult:
        return await self._submit(input, CancelPendingChangeResult)

    @cancel_pending_change.validator
    def _validate_cancel_pending_change(self, input: CancelPendingChangeInput) -> None:
        self._refuse_invalid(input)
        if self.state.pending_change is None:
            raise ApplicationError(
                f"subscription {self.state.subscription_id} has no change pending",
                type="ChangeRefused",
                non_retryable=True,
            )

    @workflow.query(name=SubscriptionMessage.PREVIEW_CHANGE)
    def preview_change(self, input: PreviewChangeInput) -> ChangePreview:
        """What the change would do at ``input.at``: the same pure decision ``change_plan``
        takes, without any effect."""
        return self._preview(input.change, input.at)

    @workflow.update(name=SubscriptionMessage.PREVIEW_CHANGE_NOW)
    async def preview_change_now(self, input: ChangePlanInput) -> ChangePreview:
        """The preview at the workflow's own time (a query cannot know it: its ``now`` is the
        last workflow task's), once the changes accepted before it are applied. No effect: it
        only reads the state (the Update is recorded in history, nothing else)."""
        await workflow.wait_condition(lambda: not self._inbox and not self._applying_change)
        return self._preview(input, workflow.now())

    @preview_change_now.validator
    def _validate_preview_change_now(self, input: ChangePlanInput) -> None:
        # Bad text and refused changes never enter history: the caller gets the reason.
        self._validate_change_plan(input)

    def _preview(self, change: ChangePlanInput, at: datetime) -> ChangePreview:
        s = self.state
        try:
            change.check()
            request = check_change(
                s,
                plan=change.plan,
                quantity=change.quantity,
                effective=change.effective,
                proration=change.proration,
                change_id="preview",
            )
            decision = decide_change(s, request, at)
        except BillingError as refused:
            return ChangePreview(refused=refused.message, error_type=refused.code)
        return ChangePreview(
            effective=request.effective.value,
            effective_at=decision.effective_at,
            plan_code=request.plan.code,
            quantity=request.quantity,
            proration=request.proration.value,
            lines=list(decision.lines),
            subtotal_minor=sum(line.amount_minor for line in decision.lines),
            currency=s.plan.currency,
            invoice_now=decision.invoice_now,
            carried_to_renewal=decision.carry_lines,
            adjusts_invoice_id=s.open_invoice.invoice_id
            if decision.adjust_open_invoice and s.open_invoice is not None
            else None,
        )

    @workflow.signal(name=SubscriptionMessage.PAYMENT_METHOD_CHANGED)
    def payment_method_changed(self, input: PaymentMethodChangedInput) -> None:
        if self.state.status != SubscriptionStatus.CANCELED:
            self._enqueue_news(input)

    @workflow.signal(name=SubscriptionMessage.PAYMENT_AUTHENTICATED)
    def payment_authenticated(self, input: PaymentAuthenticatedInput) -> None:
        self._enqueue_news(input)

    @workflow.signal(name=SubscriptionMessage.INVOICE_CREDITED)
    def invoice_credited(self, input: InvoiceCreditedInput) -> None:
        """A credit note lowered the open invoice's amount due (to 0: it is paid). Queued
        like any news: applied between steps, never during a charge."""
        if self.state.status == SubscriptionStatus.CANCELED:
            return
        if not workflow.patched(PATCH_OPEN_INVOICE_CREDIT):
            # Replaying a run whose worker did not know this signal: it was not acted on.
            return
        self._enqueue_news(input)

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
            attention_step=s.attention.step if s.attention else None,
            attention_reason=s.attention.reason if s.attention else None,
            attention_since=s.attention.since if s.attention else None,
            quantity=s.quantity,
            pending_change=None
            if s.pending_change is None
            else PendingChangeView(
                change_id=s.pending_change.change_id,
                plan_code=s.pending_change.plan.code,
                quantity=s.pending_change.quantity,
                effective_at=s.next_billing_at,
                requested_at=s.pending_change.requested_at,
            ),
            pending_lines=list(s.pending_lines),
        )

    # ================================================================== helpers =============

    async def _sleep_until(self, when: datetime) -> bool:
        """Sleep until ``when`` (UTC). True if the time came; False if a change arrived first.

        The timer counts from the latest instant this task observed (``timer_delay``), so a
        task slowed by its local activities does not make it fire late; if it fires before
        ``when`` by Temporal's clock (a worker clock ahead), it sleeps the rest."""
        while True:
            now = workflow.now()
            observed = self._observed[1] if self._observed and self._observed[0] == now else None
            delay = timer_delay(when, now, observed)
            if delay <= timedelta(0):
                return True
            if self._inbox:
                return False
            try:
                await workflow.wait_condition(lambda: bool(self._inbox), timeout=delay)
            except TimeoutError:
                if workflow.now() < when and workflow.patched(PATCH_SLEEP_THE_REST):
                    continue
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
                recent_changes=list(self._recent_changes),
            )
        )

    async def _sync(self) -> None:
        s = self.state
        synced = await _db_activity(
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
                attention_reason=(
                    f"{s.attention.step}: {s.attention.reason}" if s.attention else None
                ),
                # Only once a change was applied: earlier runs' syncs stay as they were.
                terms=None
                if s.changes_applied == 0
                else SubscriptionTerms(
                    plan_code=s.plan.code,
                    amount_minor=s.plan.amount_minor,
                    currency=s.plan.currency,
                    interval=s.plan.interval.value,
                    interval_count=s.plan.interval_count,
                    quantity=s.quantity,
                    anchor_at=s.anchor_at,
                ),
                # Any other open invoice never charged is a discarded task's write: voided.
                open_invoice_id=s.open_invoice.invoice_id if s.open_invoice else None,
                sweep_orphans=True,
            ),
            SyncSubscriptionResult,
            local=not self._change_steps_not_local(),
        )
        if synced.observed_at is not None:
            self._observed = (workflow.now(), synced.observed_at)

    async def _notify(
        self,
        kind: str,
        *,
        dedupe_key: str,
        invoice_id: str | None = None,
        payload: dict[str, object] | None = None,
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
                payload=dict(payload or {}),
                created_at=workflow.now(),
            ),
            EnqueueNotificationResult,
            local=not self._change_steps_not_local(),
        )


def _describe_failure(error: FailureError) -> str:
    """What failed, for an operator: the innermost cause's type and message."""
    cause: BaseException | None = error
    parts: list[str] = []
    while cause is not None:
        part = None
        if isinstance(cause, ApplicationError):
            part = f"{cause.type or 'ApplicationError'}: {cause.message}"
        elif not isinstance(cause, ActivityError):
            part = str(cause)
        if part is not None and part not in parts:
            parts.append(part)
        cause = cause.__cause__ if cause.__cause__ is not None else getattr(cause, "cause", None)
        if len(parts) > 3:
            break
    return "; ".join(parts) or str(error)


__all__ = ["SubscriptionWorkflow"]
