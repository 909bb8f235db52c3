"""Billing activities: every side effect of a subscription workflow.

Each activity is idempotent, because Temporal runs it at least once:
- invoices are keyed by (subscription, period start) and their ids derive from that key;
- a charge attempt is recorded as ``pending`` *before* the provider is called, and the
  provider gets an idempotency key derived from (invoice, attempt number), so a worker killed
  mid-charge re-sends the same key on retry;
- our own records guard before the key does: a paid invoice, an attempt that already has an
  outcome, or an earlier successful attempt means no provider call at all; and the database
  allows one settled payment per invoice;
- the provider forgets a key after ~24 hours, so an attempt re-driven later than that is first
  looked up at the provider by the key its PaymentIntent carries in metadata, and re-sent only
  if no PaymentIntent was ever created for it.

Errors: a decline is a return value. A transient fault (provider 5xx, network, database down)
raises and Temporal retries. A validation or programming error raises a non-retryable
ApplicationError whose type names the domain error.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session, sessionmaker
from temporalio import activity

from activities import event_log
from activities.errors import domain_errors_are_final
from billing.clock import Clock
from billing.contracts import (
    ActivityName,
    AttachPaymentMethodInput,
    AttachPaymentMethodResult,
    CancelInvoicePaymentInput,
    CancelInvoicePaymentResult,
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
    RecordInvoicePaymentInput,
    RecordInvoicePaymentResult,
    SettleInvoiceInput,
    SettleInvoiceResult,
    SyncSubscriptionInput,
    SyncSubscriptionResult,
    idempotency_key_for,
)
from billing.errors import ChangeRefused, NotFound
from billing.ids import change_invoice_id_for, invoice_id_for, new_id
from billing.invoices import (
    InvoiceLine,
    InvoiceLineKind,
    InvoiceStatus,
    bills_the_same,
    credit_notes_carried_over,
)
from billing.payments import (
    ChargeOutcome,
    ChargeOutcomeKind,
    PaymentGateway,
    PaymentProviderError,
    SettlementDetails,
)
from billing.proration import ProrationLine
from billing.records import (
    AttemptStatus,
    CustomerRecord,
    InvoiceRecord,
    NotificationRecord,
    PaymentAttemptRecord,
    PaymentRecord,
)
from billing.subscription import SubscriptionStatus
from billing.text import (
    CARD_BRAND,
    CARD_LAST4,
    DECLINE_CODE,
    FAILURE_MESSAGE,
    clean_provider_text,
)
from db.engine import unit_of_work
from db.repositories import attempts as attempts_repo
from db.repositories import balances as balances_repo
from db.repositories import credit_notes as credit_notes_repo
from db.repositories import customers as customers_repo
from db.repositories import invoices as invoices_repo
from db.repositories import notifications as notifications_repo
from db.repositories import payments as payments_repo
from db.repositories import subscriptions as subscriptions_repo

log = logging.getLogger(__name__)


#: TEST ONLY: called with (idempotency key, re-driven?) after the provider answered a charge and
#: before that answer is written down, the one instant where a crash leaves money taken with
#: only a pending attempt to show for it. Fault-injection runs (scripts/chaos.py) kill the
#: worker here; the worker never installs it in production (see billing.worker).
AfterChargeHook = Callable[[str, bool], None]

#: How long after an attempt was recorded its idempotency key can still be trusted to make the
#: provider answer a re-send with the first result. Stripe removes keys once they are at least
#: 24 hours old; the key reached Stripe no earlier than the attempt's ``created_at`` (it is
#: recorded before the first send), so 23 hours leaves an hour for our clock against Stripe's.
#: Older pending attempts are reconciled with the provider before anything is re-sent.
IDEMPOTENCY_KEY_SAFE_WINDOW = timedelta(hours=23)

#: How far before the attempt's ``created_at`` the reconciliation looks for its PaymentIntent:
#: Stripe stamps ``created`` with its own clock, which may run behind ours.
RECONCILE_CLOCK_SKEW = timedelta(hours=1)

_ATTEMPT_STATUS: dict[ChargeOutcomeKind, AttemptStatus] = {
    ChargeOutcomeKind.PAID: AttemptStatus.SUCCEEDED,
    ChargeOutcomeKind.SOFT_DECLINE: AttemptStatus.FAILED,
    ChargeOutcomeKind.HARD_DECLINE: AttemptStatus.FAILED,
    ChargeOutcomeKind.AUTHENTICATION_REQUIRED: AttemptStatus.REQUIRES_ACTION,
}


class BillingActivities:
    """Activities with their dependencies injected (the worker builds them from Settings)."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        gateway: PaymentGateway,
        clock: Clock,
        *,
        after_charge_hook: AfterChargeHook | None = None,
    ) -> None:
        self.session_factory = session_factory
        self.gateway = gateway
        self.clock = clock
        self._after_charge_hook = after_charge_hook

    def all(self) -> list[Callable[..., Any]]:
        return [
            self.sync_subscription,
            self.create_invoice,
            self.create_change_invoice,
            self.charge_invoice,
            self.settle_invoice,
            self.close_invoice,
            self.enqueue_notification,
            self.attach_payment_method,
            self.confirm_authenticated_payment,
            self.cancel_invoice_payment,
            self.record_invoice_payment,
        ]

    # ---------------------------------------------------------------- subscription mirror --

    @activity.defn(name=ActivityName.SYNC_SUBSCRIPTION)
    @domain_errors_are_final
    def sync_subscription(self, input: SyncSubscriptionInput) -> SyncSubscriptionResult:
        with unit_of_work(self.session_factory) as session:
            before = subscriptions_repo.get_subscription(session, input.subscription_id)
            updated = subscriptions_repo.update_subscription_state(
                session,
                input.subscription_id,
                status=input.status,
                current_period_start=input.current_period_start,
                current_period_end=input.current_period_end,
                next_billing_at=input.next_billing_at,
                cancel_at_period_end=input.cancel_at_period_end,
                canceled_at=input.canceled_at,
                ended_at=input.ended_at,
                paused_at=input.paused_at,
                cancel_reason=input.cancel_reason,
                now=self.clock.now(),
                changed_at=input.changed_at,
                attention_reason=input.attention_reason,
                terms=input.terms.columns() if input.terms is not None else None,
            )
            if updated:
                event_log.subscription_synced(session, before, input.changed_at or self.clock.now())
            canceled = input.status == SubscriptionStatus.CANCELED
            if updated and before is not None and (input.sweep_orphans or canceled):
                self._void_orphans(
                    session,
                    before.customer_id,
                    input.subscription_id,
                    input.changed_at,
                    keep=input.open_invoice_id if input.sweep_orphans else None,
                    reason="subscription_canceled" if canceled else "superseded",
                )
        if not updated:
            raise NotFound(f"subscription {input.subscription_id} is not in the database")
        return SyncSubscriptionResult(updated=True, observed_at=self.clock.now())

    def _void_orphans(
        self,
        session: Session,
        customer_id: str,
        subscription_id: str,
        at: datetime | None,
        *,
        keep: str | None,
        reason: str,
    ) -> None:
        """Void the subscription's open invoices that were never charged, but ``keep`` (the
        one the workflow is collecting).

        The workflow knows one open invoice at a time and closes (or collects) it itself. One
        it does not know is an orphan: ``create_invoice`` runs as a local activity, inside the
        workflow task that decides the period's invoice, so when that task is discarded (the
        worker killed, the server restarted) and the task that replaces it applies a cancel, a
        pause or an interval change first, the row written by the lost task would stay open for
        good, a receivable nobody owes (the chaos run's ``cancel_while_charging``, seed
        77416468). No charge was ever made for it (charges are ordinary activities, scheduled
        only by completed tasks), so it is voided here, in the transaction of the sync, with
        its ``invoice.voided``.

        Checked again under the customer's lock, which ``charge_invoice`` holds while it
        records an attempt: an invoice being charged is never voided under it."""
        if not invoices_repo.list_open_never_charged(session, subscription_id, except_id=keep):
            return
        balances_repo.lock_customer(session, customer_id)
        when = at or self.clock.now()
        for orphan in invoices_repo.list_open_never_charged(
            session, subscription_id, except_id=keep
        ):
            closed = invoices_repo.transition_invoice(
                session, orphan.id, to=InvoiceStatus.VOID, at=when, reason=reason
            )
            event_log.invoice_closed(session, closed, when)

    # ---------------------------------------------------------------------------- invoices --

    @activity.defn(name=ActivityName.CREATE_INVOICE)
    @domain_errors_are_final
    def create_invoice(self, input: CreateInvoiceInput) -> CreateInvoiceResult:
        """Create the period's invoice, finalized; idempotent per (subscription, period)."""
        with unit_of_work(self.session_factory) as session:
            now = input.issued_at or self.clock.now()
            # Issued final in the one INSERT: nobody can see or edit a draft of an invoice the
            # engine generates, so it goes straight to open. One that owes nothing (a free
            # period, or one the customer's credit balance covers) is paid on finalization, as
            # Stripe does; issue_invoice decides that from its lines and the balance.
            issued = InvoiceRecord(
                id=invoice_id_for(input.subscription_id, input.period_start),
                number="",  # issue_invoice allocates the customer's next number
                subscription_id=input.subscription_id,
                customer_id=input.customer_id,
                period_index=input.period_index,
                period_start=input.period_start,
                period_end=input.period_end,
                amount_due_minor=input.amount_minor,
                amount_paid_minor=0,
                currency=input.currency,
                status=InvoiceStatus.OPEN,
                description=input.description,
                status_reason=None,
                created_at=now,
                finalized_at=now,
                paid_at=None,
                voided_at=None,
                marked_uncollectible_at=None,
            )
            line = InvoiceLine(
                kind=InvoiceLineKind.SUBSCRIPTION,
                description=input.description,
                amount_minor=input.amount_minor,
                period_start=input.period_start,
                period_end=input.period_end,
                plan_code=input.plan_code,
                quantity=input.quantity,
                unit_amount_minor=input.unit_amount_minor
                if input.unit_amount_minor is not None
                else input.amount_minor,
            )
            # Prorations carried from changes since the last renewal (create_prorations).
            lines = [line, *(_proration_line(p) for p in input.extra_lines)]
            # Idempotent per (subscription, period) and gap-free: a racing run of this activity
            # gets the existing invoice and gives its number back.
            invoice, created = invoices_repo.issue_invoice(session, issued, lines)
            if not created and self._superseded(session, invoice, input.currency, lines, now):
                # The period's renewal was written for other terms, by a workflow task that was
                # then discarded; it is void now, and this one is the period's invoice.
                revision = invoices_repo.count_renewals_for_period(
                    session, input.subscription_id, input.period_start
                )
                issued = dataclasses.replace(
                    issued,
                    id=invoice_id_for(input.subscription_id, input.period_start, revision),
                )
                invoice, created = invoices_repo.issue_invoice(session, issued, lines)
            if created:
                event_log.invoice_issued(session, invoice, now)
            return _invoice_result(invoice, created=created)

    def _superseded(
        self,
        session: Session,
        existing: InvoiceRecord,
        currency: str,
        lines: list[InvoiceLine],
        now: datetime,
    ) -> bool:
        """Void ``existing``, the period's renewal, if it bills other lines than ``lines`` and
        no charge was ever attempted for it; True if it is void now.

        It is then a write of a discarded workflow task (``create_invoice`` runs as a local
        activity inside the task that decides the period's invoice) whose replacement decided
        other terms: a plan or seat change applied first. Adopting it would bill the period at
        the amount first written. One a charge was attempted for was known to a completed task
        (charges are ordinary activities): it is the workflow's, and adopted as before."""
        if existing.currency == currency and bills_the_same(
            invoices_repo.list_invoice_lines(session, existing.id), lines
        ):
            return False
        # The sweep's rule (open, never charged), read under the customer's lock, which
        # charge_invoice holds while it records an attempt.
        balances_repo.lock_customer(session, existing.customer_id)
        never_charged = invoices_repo.list_open_never_charged(session, existing.subscription_id)
        if existing.id not in {i.id for i in never_charged}:
            log.warning(
                "create_invoice: invoice %s (%s) bills other terms than asked for its period "
                "but is no longer open or was charged; adopted as it is",
                existing.id,
                existing.number,
            )
            return False
        closed = invoices_repo.transition_invoice(
            session, existing.id, to=InvoiceStatus.VOID, at=now, reason="superseded"
        )
        event_log.invoice_closed(session, closed, now)
        return True

    @activity.defn(name=ActivityName.CREATE_CHANGE_INVOICE)
    @domain_errors_are_final
    def create_change_invoice(self, input: CreateChangeInvoiceInput) -> CreateInvoiceResult:
        """Issue the invoice of one plan change, finalized; idempotent per change (its own
        key, so it never collides with the period's renewal, even at the same instant)."""
        with unit_of_work(self.session_factory) as session:
            lines: list[InvoiceLine] = []
            if input.replaces_invoice_id is not None:
                # The voided renewal's lines are billed again, first: the customer pays the
                # period once, adjusted by the change, instead of a credit for money never paid.
                voided = invoices_repo.get_invoice(session, input.replaces_invoice_id)
                if voided is None or voided.status != InvoiceStatus.VOID:
                    raise ChangeRefused(
                        f"invoice {input.replaces_invoice_id} is not void; it cannot be replaced"
                    )
                lines.extend(
                    InvoiceLine(
                        kind=old.kind,
                        description=old.description,
                        amount_minor=old.amount_minor,
                        period_start=old.period_start,
                        period_end=old.period_end,
                        plan_code=old.plan_code,
                        quantity=old.quantity,
                        unit_amount_minor=old.unit_amount_minor,
                        change_id=old.change_id,
                    )
                    for old in invoices_repo.list_invoice_lines(session, voided.id)
                )
                # Credit notes lowered the voided invoice's amount due: they come along, or
                # the customer would pay again what was credited.
                notes = credit_notes_repo.list_credit_notes_for_invoice(session, voided.id)
                credited = sum(n.amount_due_reduction_minor for n in notes)
                carried = credit_notes_carried_over(
                    credited,
                    sum(li.amount_minor for li in lines) + sum(p.amount_minor for p in input.lines),
                )
                if carried:
                    numbers = [n.number for n in notes if n.amount_due_reduction_minor]
                    lines.append(
                        InvoiceLine(
                            kind=InvoiceLineKind.CREDIT_NOTE,
                            description=f"Credit note{'s' if len(numbers) > 1 else ''} "
                            f"{', '.join(numbers)} on voided invoice {voided.number}",
                            amount_minor=-carried,
                            period_start=voided.period_start,
                            period_end=voided.period_end,
                        )
                    )
            lines.extend(_proration_line(p) for p in input.lines)
            issued = InvoiceRecord(
                id=change_invoice_id_for(input.subscription_id, input.change_id),
                number="",
                subscription_id=input.subscription_id,
                customer_id=input.customer_id,
                period_index=input.period_index,
                period_start=input.period_start,
                period_end=input.period_end,
                amount_due_minor=0,
                amount_paid_minor=0,
                currency=input.currency,
                status=InvoiceStatus.OPEN,
                description=input.description,
                status_reason=None,
                created_at=input.issued_at,
                finalized_at=input.issued_at,
                paid_at=None,
                voided_at=None,
                marked_uncollectible_at=None,
                change_id=input.change_id,
            )
            invoice, created = invoices_repo.issue_invoice(session, issued, lines)
            if created:
                event_log.invoice_issued(session, invoice, input.issued_at)
            return _invoice_result(invoice, created=created)

    @activity.defn(name=ActivityName.CLOSE_INVOICE)
    @domain_errors_are_final
    def close_invoice(self, input: CloseInvoiceInput) -> CloseInvoiceResult:
        if input.status not in (InvoiceStatus.VOID, InvoiceStatus.UNCOLLECTIBLE):
            raise ChangeRefused(
                f"close_invoice takes void or uncollectible; got {input.status.value}"
            )
        with unit_of_work(self.session_factory) as session:
            invoice = _require_invoice(session, input.invoice_id)
            charged = any(
                a.status == AttemptStatus.SUCCEEDED
                for a in attempts_repo.list_attempts_for_invoice(session, invoice.id)
            )
            if invoice.status == InvoiceStatus.PAID or charged:
                # Money was taken (maybe not settled yet): never void or write it off.
                return CloseInvoiceResult(invoice.id, invoice.status, was_paid=True)
            if invoice.status == input.status:
                return CloseInvoiceResult(invoice.id, invoice.status)
            closed = invoices_repo.transition_invoice(
                session,
                invoice.id,
                to=input.status,
                at=input.at or self.clock.now(),
                reason=input.reason,
            )
            event_log.invoice_closed(session, closed, input.at or self.clock.now())
            return CloseInvoiceResult(closed.id, closed.status)

    # ----------------------------------------------------------------------------- charges --

    @activity.defn(name=ActivityName.CHARGE_INVOICE)
    @domain_errors_are_final
    def charge_invoice(self, input: ChargeInvoiceInput) -> ChargeInvoiceResult:
        """One charge attempt of an open invoice, off-session, on the customer's default
        payment method. Declines are returned; provider outages raise and are retried.

        The invoice and its attempts are read, and the pending attempt inserted, in one
        transaction under the customer's lock, which credit notes also take
        (``credit_notes.issue_credit_note``): a credit note lands either before the attempt,
        which then charges the lowered amount (or finds the invoice paid by the credit and
        charges nothing), or after it, and is refused while the attempt is in flight."""
        attempt_number = input.attempt_number
        with unit_of_work(self.session_factory) as session:
            # The lock first, with the customer's row in the same statement: everything read
            # after it is what the attempt is recorded from, and nothing it depends on can
            # change before that commits.
            customer = balances_repo.lock_customer_of_invoice(session, input.invoice_id)
            invoice = _require_invoice(session, input.invoice_id)
            if customer is None:
                raise NotFound(f"customer {invoice.customer_id} of invoice {invoice.id} not found")
            attempts = attempts_repo.list_attempts_for_invoice(session, invoice.id)
            succeeded = next((a for a in attempts if a.status == AttemptStatus.SUCCEEDED), None)
            if invoice.status == InvoiceStatus.PAID or succeeded is not None:
                # Our records say the money is already collected (or a credit note paid the
                # invoice): never charge again.
                return _already_paid(session, invoice, succeeded, attempt_number)
            if invoice.status != InvoiceStatus.OPEN:
                raise ChangeRefused(
                    f"invoice {invoice.number} is {invoice.status.value}; only open invoices "
                    "are charged"
                )
            # An earlier attempt with an unknown outcome (its worker died mid-call) is
            # re-driven under its own key rather than replaced by a new one.
            unknown = [a for a in attempts if a.status == AttemptStatus.PENDING]
            if unknown and unknown[0].attempt_number < attempt_number:
                attempt_number = unknown[0].attempt_number
            attempt = next((a for a in attempts if a.attempt_number == attempt_number), None)
            if attempt is not None and attempt.status != AttemptStatus.PENDING:
                return _attempt_result(attempt)  # this attempt already finished: replay it
            key = idempotency_key_for(invoice.id, attempt_number)
            # An attempt already recorded as pending is being re-driven: a send of it may have
            # reached the provider with its answer lost.
            redriven = attempt
            if attempt is not None and attempt.payment_method_id is not None:
                # Re-driving an attempt of unknown outcome: same key, so exactly the same
                # request (the provider refuses a reused key with other parameters).
                payment_method_id: str | None = attempt.payment_method_id
            else:
                # The card from our records, not a read of the provider's customer: the row is
                # written by every card change we make (signup, card update) and by the
                # provider's webhooks for changes made elsewhere (checked against the provider
                # before they are recorded), so a paid cycle costs the one charge request.
                payment_method_id = customer.default_payment_method_id
            if attempt is None:
                # One PaymentIntent per invoice: the attempt confirms the invoice's intent when
                # it has one (an invoice charged before that model: its latest attempt's
                # intent), else creates it. Recorded on the pending attempt, so a re-drive
                # sends the same request under the same key, whatever was learnt in between.
                intent_to_confirm = invoice.stripe_payment_intent_id or next(
                    (
                        a.stripe_payment_intent_id
                        for a in reversed(attempts)
                        if a.stripe_payment_intent_id is not None
                    ),
                    None,
                )
                attempt, _ = attempts_repo.insert_pending_attempt(
                    session,
                    PaymentAttemptRecord(
                        id=new_id("pa"),
                        invoice_id=invoice.id,
                        attempt_number=attempt_number,
                        idempotency_key=key,
                        amount_minor=invoice.amount_due_minor,
                        currency=invoice.currency,
                        status=AttemptStatus.PENDING,
                        outcome=None,
                        decline_code=None,
                        failure_message=None,
                        reason=input.reason,
                        stripe_payment_intent_id=intent_to_confirm,
                        stripe_charge_id=None,
                        payment_method_id=payment_method_id,
                        created_at=self.clock.now(),
                        completed_at=None,
                    ),
                )
                if intent_to_confirm is not None:
                    self._record_invoice_intent(session, invoice.id, intent_to_confirm)
                payment_method_id = attempt.payment_method_id
        # A pending attempt that names an intent confirms it; one that names none creates the
        # invoice's intent. (Pending attempts get an intent id only when they are inserted.)
        intent_to_confirm = attempt.stripe_payment_intent_id
        # The pending attempt, with the card it will use, is committed before the provider
        # sees anything.
        # The amount recorded on the attempt (the invoice's amount due when it was inserted,
        # under the lock): a re-drive sends exactly the request of its first send.
        amount_minor = attempt.amount_minor
        if customer.stripe_customer_id is None or payment_method_id is None:
            outcome = ChargeOutcome(
                kind=ChargeOutcomeKind.HARD_DECLINE,
                decline_code="no_payment_method",
                failure_message="the customer has no default payment method",
                amount_minor=amount_minor,
                currency=invoice.currency,
            )
        else:
            found = None
            if (
                redriven is not None
                and redriven.created_at < self.clock.now() - IDEMPOTENCY_KEY_SAFE_WINDOW
            ):
                # The provider may have forgotten this key: a re-send could then charge a
                # second time. Ask it what the first send did.
                found = self._find_lost_send(
                    customer.stripe_customer_id, redriven, key, intent_to_confirm
                )
            if found is None and intent_to_confirm is not None:
                # A credit note lowered the invoice since its intent was last charged: the
                # intent takes the new amount before it is confirmed (one request more, only
                # then), so it can never take the old one.
                found = self._set_intent_amount(
                    attempts, attempt, intent_to_confirm, key, redriven=redriven is not None
                )
            if found is not None:
                outcome = found
            elif intent_to_confirm is not None:
                # A later attempt: the same PaymentIntent again, on the customer's current
                # card. It can succeed only once, so an earlier attempt that needed
                # authentication can no longer be paid on top of this one.
                outcome = self.gateway.confirm_payment_intent(
                    payment_intent_id=intent_to_confirm,
                    payment_method_id=payment_method_id,
                    amount_minor=amount_minor,
                    currency=invoice.currency,
                    idempotency_key=key,
                )
                if self._after_charge_hook is not None:
                    self._after_charge_hook(key, redriven is not None)
            else:
                # The invoice's first attempt to reach the provider, a re-drive inside the
                # key's window (the provider answers it with the first result), or an old one
                # the provider never created anything for: the same request under the same
                # key, on the recorded card, creating the invoice's PaymentIntent.
                outcome = self.gateway.charge(
                    provider_customer_id=customer.stripe_customer_id,
                    payment_method_id=payment_method_id,
                    amount_minor=amount_minor,
                    currency=invoice.currency,
                    idempotency_key=key,
                    description=f"Invoice {invoice.number}",
                    # The gateway adds the key itself as metadata["idempotency_key"].
                    metadata={
                        "invoice_id": invoice.id,
                        "invoice_number": invoice.number,
                        "subscription_id": invoice.subscription_id,
                        "attempt_number": str(attempt_number),
                    },
                )
                if self._after_charge_hook is not None:
                    self._after_charge_hook(key, redriven is not None)
        # The provider's text is recorded, and carried into the workflow's state, whatever it
        # holds: made storable (no NUL, the column's length) rather than refused.
        decline_code = clean_provider_text(outcome.decline_code, DECLINE_CODE)
        failure_message = clean_provider_text(outcome.failure_message, FAILURE_MESSAGE)
        details = None
        if outcome.kind == ChargeOutcomeKind.PAID and outcome.payment_intent_id is not None:
            details = self._details_after_charge(invoice, outcome)
        payment_id = None
        with unit_of_work(self.session_factory) as session:
            attempts_repo.record_attempt_outcome(
                session,
                attempt.id,
                status=_ATTEMPT_STATUS[outcome.kind],
                outcome=outcome.kind,
                decline_code=decline_code,
                failure_message=failure_message,
                payment_intent_id=outcome.payment_intent_id,
                charge_id=outcome.charge_id,
                payment_method_id=payment_method_id,
                completed_at=self.clock.now(),
            )
            # The invoice as this transaction holds it (row-locked by the intent's write), so
            # the settlement need not read it again.
            current = None
            if outcome.payment_intent_id is not None:
                current = self._record_invoice_intent(
                    session, invoice.id, outcome.payment_intent_id
                )
            if outcome.kind != ChargeOutcomeKind.PAID:
                event_log.charge_failed(
                    session,
                    invoice.id,
                    attempt_number=attempt_number,
                    action_required=outcome.kind == ChargeOutcomeKind.AUTHENTICATION_REQUIRED,
                    at=self.clock.now(),
                )
            if details is not None:
                assert outcome.payment_intent_id is not None
                payment_id = self._settle_with_outcome(
                    session,
                    invoice,
                    attempt,
                    outcome.payment_intent_id,
                    outcome.charge_id,
                    details,
                    current=current,
                )
        return ChargeInvoiceResult(
            outcome=outcome.kind,
            attempt_number=attempt_number,
            idempotency_key=key,
            payment_intent_id=outcome.payment_intent_id,
            charge_id=outcome.charge_id,
            decline_code=decline_code,
            failure_message=failure_message,
            payment_id=payment_id,
            amount_due_minor=amount_minor,
            authentication_url=outcome.authentication_url,
        )

    def _set_intent_amount(
        self,
        attempts: list[PaymentAttemptRecord],
        attempt: PaymentAttemptRecord,
        payment_intent_id: str,
        key: str,
        *,
        redriven: bool,
    ) -> ChargeOutcome | None:
        """Before ``attempt`` confirms the invoice's intent again: if the intent's amount (the
        amount of the last earlier attempt on it) is not the attempt's, set it first, under a
        key derived from the attempt's, so a re-drive repeats the same update. Returns the
        intent's outcome when a re-drive finds it already paid (the first confirm took the
        money, its answer lost: nothing more is sent), else None."""
        earlier = [
            a
            for a in attempts
            if a.attempt_number < attempt.attempt_number
            and a.stripe_payment_intent_id == payment_intent_id
        ]
        if not earlier or earlier[-1].amount_minor == attempt.amount_minor:
            return None
        try:
            self.gateway.update_payment_intent_amount(
                payment_intent_id=payment_intent_id,
                amount_minor=attempt.amount_minor,
                currency=attempt.currency,
                idempotency_key=f"{key}-amount",
            )
        except PaymentProviderError:
            if not redriven:
                raise
            # A re-drive whose update is refused: Stripe forgot the key, or a double ignores
            # it, and the intent has moved on. Succeeded means the first send was paid.
            current = self.gateway.payment_intent_outcome(payment_intent_id=payment_intent_id)
            if current.kind != ChargeOutcomeKind.PAID:
                raise
            log.warning(
                "re-driven attempt %s: payment intent %s is already paid; not re-sent",
                key,
                payment_intent_id,
            )
            return current
        return None

    def _find_lost_send(
        self,
        provider_customer_id: str,
        attempt: PaymentAttemptRecord,
        key: str,
        intent_to_confirm: str | None,
    ) -> ChargeOutcome | None:
        """What an attempt re-driven past its key's safe window already did at the provider,
        or None when re-sending it is safe.

        A create is looked up by the key its PaymentIntent carries in metadata. A confirm of the
        invoice's known intent reads that intent: succeeded means paid (by this send or by the
        customer), and is never re-sent; in any other state a re-sent confirm can at worst be
        one more declined try, never a second payment, since an intent succeeds only once.
        """
        if intent_to_confirm is None:
            found = self.gateway.find_charge_attempt(
                provider_customer_id=provider_customer_id,
                idempotency_key=key,
                created_after=attempt.created_at - RECONCILE_CLOCK_SKEW,
            )
        else:
            current = self.gateway.payment_intent_outcome(payment_intent_id=intent_to_confirm)
            found = current if current.kind == ChargeOutcomeKind.PAID else None
        log.warning(
            "re-driving charge attempt %s (%s) recorded at %s, past the key's safe window: %s",
            attempt.id,
            key,
            attempt.created_at.isoformat(),
            "nothing was paid, re-sending"
            if found is None
            else f"found {found.payment_intent_id} ({found.kind.value}), not re-sending",
        )
        return found

    def _record_invoice_intent(
        self, session: Session, invoice_id: str, payment_intent_id: str
    ) -> InvoiceRecord | None:
        """Record the invoice's one PaymentIntent (set once), in a savepoint: a failure here
        must never keep a charge's outcome from being recorded. Returns the invoice as now
        stored (locked by this write until the transaction ends), or None if that failed."""
        try:
            with session.begin_nested():
                stored = invoices_repo.record_payment_intent(session, invoice_id, payment_intent_id)
        except Exception:
            log.exception(
                "could not record payment intent %s on invoice %s", payment_intent_id, invoice_id
            )
            return None
        if stored.stripe_payment_intent_id != payment_intent_id:
            # Only an invoice charged before one-intent-per-invoice, or a decline whose intent
            # the provider did not name, gets here: both intents are canceled when the invoice
            # is closed (cancel_invoice_payment cancels every intent its attempts name).
            log.error(
                "invoice %s has payment intent %s, and a charge used another one, %s",
                invoice_id,
                stored.stripe_payment_intent_id,
                payment_intent_id,
            )
        return stored

    def _details_after_charge(
        self, invoice: InvoiceRecord, outcome: ChargeOutcome
    ) -> SettlementDetails | None:
        """The settlement of a charge that just succeeded, to record with its outcome in one
        transaction (one commit less per paid period): the one the charge's answer carried
        (its charge and balance transaction expanded), else read from the provider. None if
        the provider cannot say now or the money does not match: the outcome is then recorded
        alone and ``settle_invoice`` (run by the workflow when no payment id comes back)
        settles it, with its own retries and errors."""
        assert outcome.payment_intent_id is not None
        if outcome.settlement is not None:
            try:
                return _matching(invoice, outcome.payment_intent_id, outcome.settlement)
            except ChangeRefused:
                log.warning(
                    "the charge of invoice %s does not match it; the workflow settles it",
                    invoice.id,
                    exc_info=True,
                )
                return None
        try:
            return self._settlement_details(invoice, outcome.payment_intent_id, outcome.charge_id)
        except Exception:
            log.warning(
                "reading the settlement of invoice %s's charge failed; the workflow settles it",
                invoice.id,
                exc_info=True,
            )
            return None

    def _settle_with_outcome(
        self,
        session: Session,
        invoice: InvoiceRecord,
        attempt: PaymentAttemptRecord,
        payment_intent_id: str,
        charge_id: str | None,
        details: SettlementDetails,
        *,
        current: InvoiceRecord | None = None,
    ) -> str | None:
        """Record the settlement in the transaction that records the charge's outcome, inside
        a savepoint: if it fails, only the settlement is rolled back and logged, and the
        outcome still commits. Nothing here may lose a charge. ``current``: see
        ``_record_settlement``."""
        try:
            with session.begin_nested():
                return self._record_settlement(
                    session,
                    invoice,
                    attempt,
                    payment_intent_id,
                    charge_id,
                    details,
                    current=current,
                ).id
        except Exception:
            log.warning(
                "settling invoice %s after its charge failed; the workflow settles it instead",
                invoice.id,
                exc_info=True,
            )
            return None

    @activity.defn(name=ActivityName.SETTLE_INVOICE)
    @domain_errors_are_final
    def settle_invoice(self, input: SettleInvoiceInput) -> SettleInvoiceResult:
        """Record the settled payment (amount, fee, net) and mark the invoice paid."""
        with unit_of_work(self.session_factory) as session:
            invoice = _require_invoice(session, input.invoice_id)
            payment = payments_repo.get_payment_for_invoice(session, invoice.id)
            if payment is not None:
                return _settle_result(payment)
            attempt = attempts_repo.get_attempt(session, invoice.id, input.attempt_number)
            if attempt is None:
                raise NotFound(f"attempt {input.attempt_number} of invoice {invoice.id} not found")
        return _settle_result(
            self._settle(invoice, attempt, input.payment_intent_id, input.charge_id)
        )

    def _settle(
        self,
        invoice: InvoiceRecord,
        attempt: PaymentAttemptRecord,
        payment_intent_id: str,
        charge_id: str | None,
    ) -> PaymentRecord:
        """Record the settled payment of ``attempt`` (amount, fee, net from the provider) and
        mark the invoice paid, in one transaction; idempotent (one payment per invoice)."""
        details = self._settlement_details(invoice, payment_intent_id, charge_id)
        with unit_of_work(self.session_factory) as session:
            return self._record_settlement(
                session, invoice, attempt, payment_intent_id, charge_id, details
            )

    def _settlement_details(
        self, invoice: InvoiceRecord, payment_intent_id: str, charge_id: str | None
    ) -> SettlementDetails:
        """What the provider settled for the charge; ChangeRefused if it is not the invoice's
        amount and currency."""
        details = self.gateway.settlement_details(
            payment_intent_id=payment_intent_id, charge_id=charge_id
        )
        return _matching(invoice, payment_intent_id, details)

    def _record_settlement(
        self,
        session: Session,
        invoice: InvoiceRecord,
        attempt: PaymentAttemptRecord,
        payment_intent_id: str,
        charge_id: str | None,
        details: SettlementDetails,
        *,
        current: InvoiceRecord | None = None,
    ) -> PaymentRecord:
        """Write the payment and mark the invoice paid, in the caller's transaction.
        ``current``: the invoice as this transaction holds it, row-locked by an earlier write
        in it (``_record_invoice_intent``'s answer); None reads it."""
        now = self.clock.now()
        payment, _ = payments_repo.insert_payment(
            session,
            PaymentRecord(
                id=new_id("py"),
                invoice_id=invoice.id,
                attempt_id=attempt.id,
                stripe_payment_intent_id=payment_intent_id,
                stripe_charge_id=details.charge_id or charge_id,
                balance_transaction_id=details.balance_transaction_id,
                amount_minor=details.amount_minor,
                currency=details.currency,
                fee_minor=details.fee_minor,
                net_minor=details.net_minor,
                settlement_amount_minor=details.settlement_amount_minor,
                settlement_currency=details.settlement_currency,
                settled_at=now,
            ),
        )
        if current is None or current.id != invoice.id:
            current = invoices_repo.get_invoice(session, invoice.id)
        reason = None
        if current is not None and current.status in (
            InvoiceStatus.VOID,
            InvoiceStatus.UNCOLLECTIBLE,
        ):
            # Closed unpaid, then the provider's payment came to light: money taken is
            # booked, never ignored, and the invoice says why it changed its mind.
            reason = (
                f"paid after it was {current.status.value}: the provider took payment "
                f"{payment.stripe_payment_intent_id} ({payment.amount_minor} "
                f"{payment.currency} minor units), recorded {now.isoformat()}"
                + (
                    f"; it was {current.status.value} for: {current.status_reason}"
                    if current.status_reason
                    else ""
                )
            )[:500]
        # A no-op when a previous run already marked it paid.
        paid = invoices_repo.transition_invoice(
            session,
            invoice.id,
            to=InvoiceStatus.PAID,
            at=now,
            reason=reason,
            amount_paid_minor=payment.amount_minor,
            current=current,
        )
        # The event and the receipt go with the payment, once (their keys are the invoice's).
        event_log.invoice_paid(session, paid, now, payment)
        return payment

    @activity.defn(name=ActivityName.CONFIRM_AUTHENTICATED_PAYMENT)
    @domain_errors_are_final
    def confirm_authenticated_payment(
        self, input: ConfirmAuthenticatedPaymentInput
    ) -> ConfirmAuthenticatedPaymentResult:
        """Check with the provider that a payment intent the customer authenticated belongs to
        this invoice and succeeded; record it on its attempt.

        All attempts of an invoice share its one intent: the success goes on the attempt that
        waits for authentication (the latest such), else on the latest attempt of the intent.
        A re-run finds that attempt succeeded and answers the same."""
        with unit_of_work(self.session_factory) as session:
            invoice = invoices_repo.get_invoice(session, input.invoice_id)
            attempts = (
                attempts_repo.list_attempts_for_invoice(session, invoice.id)
                if invoice is not None
                else []
            )
        sharing = [a for a in attempts if a.stripe_payment_intent_id == input.payment_intent_id]
        if not sharing:
            return ConfirmAuthenticatedPaymentResult(
                succeeded=False,
                reason=f"payment intent {input.payment_intent_id} is not an attempt of "
                f"invoice {input.invoice_id}",
            )
        done = next((a for a in sharing if a.status == AttemptStatus.SUCCEEDED), None)
        if done is not None:
            return ConfirmAuthenticatedPaymentResult(
                succeeded=True, attempt_number=done.attempt_number, charge_id=done.stripe_charge_id
            )
        attempt = _attempt_for_success(sharing)
        outcome = self.gateway.payment_intent_outcome(payment_intent_id=input.payment_intent_id)
        if outcome.kind != ChargeOutcomeKind.PAID:
            return ConfirmAuthenticatedPaymentResult(
                succeeded=False,
                attempt_number=attempt.attempt_number,
                reason=f"payment intent is {outcome.kind.value}",
            )
        with unit_of_work(self.session_factory) as session:
            self._record_attempt_success(session, attempt, input.payment_intent_id, outcome)
        return ConfirmAuthenticatedPaymentResult(
            succeeded=True, attempt_number=attempt.attempt_number, charge_id=outcome.charge_id
        )

    def _record_attempt_success(
        self,
        session: Session,
        attempt: PaymentAttemptRecord,
        payment_intent_id: str,
        outcome: ChargeOutcome,
    ) -> PaymentAttemptRecord:
        recorded = attempts_repo.record_attempt_outcome(
            session,
            attempt.id,
            status=AttemptStatus.SUCCEEDED,
            outcome=ChargeOutcomeKind.PAID,
            decline_code=None,
            failure_message=None,
            payment_intent_id=payment_intent_id,
            charge_id=outcome.charge_id,
            payment_method_id=attempt.payment_method_id,
            completed_at=self.clock.now(),
        )
        self._record_invoice_intent(session, attempt.invoice_id, payment_intent_id)
        return recorded

    def _record_provider_success(
        self,
        invoice: InvoiceRecord,
        attempts: list[PaymentAttemptRecord],
        payment_intent_id: str,
        outcome: ChargeOutcome,
    ) -> tuple[PaymentAttemptRecord, PaymentRecord]:
        """Book a success the provider reports for ``invoice`` and nobody recorded: the
        attempt it belongs to succeeds, then the payment (fee, net) is settled and the invoice
        paid, whatever its status (a void or uncollectible invoice becomes paid, with a
        reason). Two transactions, each idempotent: a re-run after a crash between them
        finds the succeeded attempt and settles it."""
        sharing = [a for a in attempts if a.stripe_payment_intent_id == payment_intent_id]
        # An attempt whose create was lost has no intent id yet; it is the one that paid.
        unnamed = [
            a
            for a in attempts
            if a.status == AttemptStatus.PENDING and a.stripe_payment_intent_id is None
        ]
        candidates = sharing or unnamed or attempts
        if not candidates:
            raise NotFound(
                f"invoice {invoice.number} has no charge attempt to record payment "
                f"{payment_intent_id} on"
            )
        attempt = _attempt_for_success(candidates)
        if attempt.status != AttemptStatus.SUCCEEDED:
            with unit_of_work(self.session_factory) as session:
                attempt = self._record_attempt_success(session, attempt, payment_intent_id, outcome)
        return attempt, self._settle(invoice, attempt, payment_intent_id, outcome.charge_id)

    def _recorded_payment(
        self, invoice: InvoiceRecord, attempts: list[PaymentAttemptRecord]
    ) -> tuple[PaymentAttemptRecord, PaymentRecord] | None:
        """The invoice's payment as our records hold it, settling a succeeded attempt that
        has none yet (a run killed between the two writes). None: no success is recorded."""
        with unit_of_work(self.session_factory) as session:
            payment = payments_repo.get_payment_for_invoice(session, invoice.id)
        if payment is not None:
            attempt = next(a for a in attempts if a.id == payment.attempt_id)
            return attempt, payment
        succeeded = next((a for a in attempts if a.status == AttemptStatus.SUCCEEDED), None)
        if succeeded is None:
            return None
        if succeeded.stripe_payment_intent_id is None:
            raise ChangeRefused(
                f"attempt {succeeded.attempt_number} of invoice {invoice.number} succeeded "
                "without a payment intent id; settle it by hand"
            )
        return succeeded, self._settle(
            invoice, succeeded, succeeded.stripe_payment_intent_id, succeeded.stripe_charge_id
        )

    @activity.defn(name=ActivityName.CANCEL_INVOICE_PAYMENT)
    @domain_errors_are_final
    def cancel_invoice_payment(
        self, input: CancelInvoicePaymentInput
    ) -> CancelInvoicePaymentResult:
        """Before an invoice is voided or written off: settle what the provider says about
        its payment, and cancel its PaymentIntent so nobody can pay it afterwards.

        A success the provider holds (a pending attempt whose answer was lost, an
        authentication completed just now) is recorded (attempt, payment with fee and net,
        invoice paid) and returned as ``paid``: the caller must not close the invoice.
        Otherwise every intent the invoice's attempts name is canceled (one, unless the
        invoice was charged before one-intent-per-invoice), and attempts still pending are
        completed as failed: their intent can no longer take money.

        Idempotent under at-least-once: each write is one transaction that a re-run finds
        done (a payment row, a succeeded attempt, an intent already canceled)."""
        with unit_of_work(self.session_factory) as session:
            invoice = _require_invoice(session, input.invoice_id)
            attempts = attempts_repo.list_attempts_for_invoice(session, invoice.id)
            customer = customers_repo.get_customer(session, invoice.customer_id)
        recorded = self._recorded_payment(invoice, attempts)
        if recorded is not None:
            attempt, payment = recorded
            return CancelInvoicePaymentResult(
                paid=True,
                payment_intent_id=payment.stripe_payment_intent_id,
                payment_id=payment.id,
                attempt_number=attempt.attempt_number,
            )
        if invoice.status == InvoiceStatus.PAID:
            # Paid without a charge of ours: a credit note brought its amount due to 0 (or a
            # free period). Its PaymentIntent is canceled so nobody can pay it any more.
            return self._cancel_intents_of_credited(invoice, attempts)
        if input.only_if_paid:
            # Still owed (a stale signal): left exactly as it is.
            return CancelInvoicePaymentResult(paid=False)
        intents = _intents_of(invoice, attempts)
        pending = [a for a in attempts if a.status == AttemptStatus.PENDING]
        lost_creates = [a for a in pending if a.stripe_payment_intent_id is None]
        if lost_creates and customer is not None and customer.stripe_customer_id is not None:
            # A create whose answer was lost: did it make an intent? Read only, by the key the
            # intent carries in metadata; re-sending it could charge.
            for attempt in lost_creates:
                found = self.gateway.find_charge_attempt(
                    provider_customer_id=customer.stripe_customer_id,
                    idempotency_key=attempt.idempotency_key,
                    created_after=attempt.created_at - RECONCILE_CLOCK_SKEW,
                )
                if (
                    found is not None
                    and found.payment_intent_id is not None
                    and found.payment_intent_id not in intents
                ):
                    intents.append(found.payment_intent_id)
        canceled = False
        for payment_intent_id in intents:
            result = self.gateway.cancel_payment_intent(payment_intent_id=payment_intent_id)
            if result.paid is not None:
                attempt, payment = self._record_provider_success(
                    invoice, attempts, payment_intent_id, result.paid
                )
                return CancelInvoicePaymentResult(
                    paid=True,
                    payment_intent_id=payment_intent_id,
                    payment_id=payment.id,
                    attempt_number=attempt.attempt_number,
                )
            canceled = canceled or result.canceled
        if pending:
            with unit_of_work(self.session_factory) as session:
                for attempt in pending:
                    attempts_repo.record_attempt_outcome(
                        session,
                        attempt.id,
                        status=AttemptStatus.FAILED,
                        outcome=ChargeOutcomeKind.SOFT_DECLINE,
                        decline_code="payment_canceled",
                        failure_message=(
                            "its outcome was unknown when the invoice was closed "
                            f"({input.reason or 'no reason given'}); the provider holds no "
                            "payment for it and its payment intent is canceled"
                        )[:500],
                        payment_intent_id=None,
                        charge_id=None,
                        payment_method_id=None,
                        completed_at=self.clock.now(),
                    )
        return CancelInvoicePaymentResult(
            paid=False,
            payment_intent_id=intents[0] if intents else None,
            canceled=canceled,
        )

    def _cancel_intents_of_credited(
        self, invoice: InvoiceRecord, attempts: list[PaymentAttemptRecord]
    ) -> CancelInvoicePaymentResult:
        """Cancel every intent of an invoice paid without a charge. One that succeeded took
        money for an invoice the credit had paid: ChangeRefused, so the subscription parks
        with the reason for an operator (refund it) instead of booking it silently."""
        canceled = False
        intents = _intents_of(invoice, attempts)
        for payment_intent_id in intents:
            result = self.gateway.cancel_payment_intent(payment_intent_id=payment_intent_id)
            if result.paid is not None:
                raise ChangeRefused(
                    f"payment intent {payment_intent_id} took {result.paid.amount_minor} "
                    f"{result.paid.currency} minor units for invoice {invoice.number}, which a "
                    "credit note had already paid; refund that payment, then resume billing"
                )
            canceled = canceled or result.canceled
        with unit_of_work(self.session_factory) as session:
            # ``invoice.paid`` and the receipt, once per invoice (their keys), as for a paid
            # charge; the credit note that paid it wrote the receipt already.
            event_log.invoice_paid(session, invoice, self.clock.now(), payment=None)
        return CancelInvoicePaymentResult(
            paid=True,
            paid_by_credit=True,
            payment_intent_id=intents[0] if intents else None,
            canceled=canceled,
        )

    @activity.defn(name=ActivityName.RECORD_INVOICE_PAYMENT)
    @domain_errors_are_final
    def record_invoice_payment(
        self, input: RecordInvoicePaymentInput
    ) -> RecordInvoicePaymentResult:
        """Record a success the provider reports for an invoice that no subscription workflow
        will settle (closed unpaid, or its workflow has ended): checked with the provider
        first (the intent is the invoice's and succeeded), then booked like any payment. A
        void or uncollectible invoice becomes paid, saying why. Idempotent."""
        with unit_of_work(self.session_factory) as session:
            invoice = _require_invoice(session, input.invoice_id)
            attempts = attempts_repo.list_attempts_for_invoice(session, invoice.id)
            customer = customers_repo.get_customer(session, invoice.customer_id)
        recorded = self._recorded_payment(invoice, attempts)
        if recorded is not None:
            attempt, payment = recorded
            if payment.stripe_payment_intent_id != input.payment_intent_id:
                log.error(
                    "invoice %s is paid by %s, and the provider reports another payment, %s, "
                    "for it: the customer was charged twice; refund %s",
                    invoice.id,
                    payment.stripe_payment_intent_id,
                    input.payment_intent_id,
                    input.payment_intent_id,
                )
                return RecordInvoicePaymentResult(
                    recorded=False,
                    payment_id=payment.id,
                    attempt_number=attempt.attempt_number,
                    reason=f"invoice {invoice.number} is already paid by "
                    f"{payment.stripe_payment_intent_id}; {input.payment_intent_id} is a second "
                    "payment and must be refunded",
                )
            return RecordInvoicePaymentResult(
                recorded=True, payment_id=payment.id, attempt_number=attempt.attempt_number
            )
        if not self._is_intent_of(invoice, attempts, customer, input.payment_intent_id):
            return RecordInvoicePaymentResult(
                recorded=False,
                reason=f"payment intent {input.payment_intent_id} is not one of invoice "
                f"{invoice.number}'s charges",
            )
        outcome = self.gateway.payment_intent_outcome(payment_intent_id=input.payment_intent_id)
        if outcome.kind != ChargeOutcomeKind.PAID:
            return RecordInvoicePaymentResult(
                recorded=False, reason=f"payment intent is {outcome.kind.value}"
            )
        attempt, payment = self._record_provider_success(
            invoice, attempts, input.payment_intent_id, outcome
        )
        return RecordInvoicePaymentResult(
            recorded=True, payment_id=payment.id, attempt_number=attempt.attempt_number
        )

    def _is_intent_of(
        self,
        invoice: InvoiceRecord,
        attempts: list[PaymentAttemptRecord],
        customer: CustomerRecord | None,
        payment_intent_id: str,
    ) -> bool:
        """Whether our records, or the provider's record of a lost create, tie the intent to
        the invoice. A webhook's metadata alone is not trusted."""
        if payment_intent_id in _intents_of(invoice, attempts):
            return True
        if customer is None or customer.stripe_customer_id is None:
            return False
        for attempt in attempts:
            if attempt.status != AttemptStatus.PENDING or attempt.stripe_payment_intent_id:
                continue
            found = self.gateway.find_charge_attempt(
                provider_customer_id=customer.stripe_customer_id,
                idempotency_key=attempt.idempotency_key,
                created_after=attempt.created_at - RECONCILE_CLOCK_SKEW,
            )
            if found is not None and found.payment_intent_id == payment_intent_id:
                return True
        return False

    # ----------------------------------------------------------------- customers & notices --

    @activity.defn(name=ActivityName.ATTACH_PAYMENT_METHOD)
    @domain_errors_are_final
    def attach_payment_method(self, input: AttachPaymentMethodInput) -> AttachPaymentMethodResult:
        with unit_of_work(self.session_factory) as session:
            customer = customers_repo.get_customer(session, input.customer_id)
        if customer is None:
            raise NotFound(f"customer {input.customer_id} not found")
        provider_customer_id = customer.stripe_customer_id
        if provider_customer_id is None:
            # One request: the provider customer with this card as its default.
            made = self.gateway.create_customer(
                customer_id=customer.id,
                email=customer.email,
                name=customer.name,
                payment_method_id=input.payment_method_id,
            )
            provider_customer_id = made.provider_customer_id
            assert made.payment_method is not None  # a card was given
            attached = made.payment_method
        else:
            attached = self.gateway.attach_payment_method(
                provider_customer_id=provider_customer_id,
                payment_method_id=input.payment_method_id,
            )
        with unit_of_work(self.session_factory) as session:
            if customer.stripe_customer_id is None:
                customers_repo.set_stripe_customer_id(session, customer.id, provider_customer_id)
            customers_repo.set_default_payment_method(
                session,
                customer.id,
                attached.payment_method_id,
                card_brand=clean_provider_text(attached.card_brand, CARD_BRAND),
                card_last4=clean_provider_text(attached.card_last4, CARD_LAST4),
            )
            others = [
                sub.id
                for sub in subscriptions_repo.list_subscriptions_for_customer(
                    session, customer.id, live_only=True
                )
                if sub.id != input.subscription_id
            ]
        return AttachPaymentMethodResult(
            payment_method_id=attached.payment_method_id,
            card_brand=clean_provider_text(attached.card_brand, CARD_BRAND),
            card_last4=clean_provider_text(attached.card_last4, CARD_LAST4),
            other_subscription_ids=others,
        )

    @activity.defn(name=ActivityName.ENQUEUE_NOTIFICATION)
    @domain_errors_are_final
    def enqueue_notification(self, input: EnqueueNotificationInput) -> EnqueueNotificationResult:
        """Write a customer notice to the outbox; a sender delivers it (at most once per key)."""
        with unit_of_work(self.session_factory) as session:
            record, created = notifications_repo.enqueue_notification(
                session,
                NotificationRecord(
                    id=new_id("ntf"),
                    kind=input.kind,
                    customer_id=input.customer_id,
                    subscription_id=input.subscription_id,
                    invoice_id=input.invoice_id,
                    dedupe_key=input.dedupe_key,
                    payload=input.payload,
                    created_at=input.created_at or self.clock.now(),
                    sent_at=None,
                ),
            )
        return EnqueueNotificationResult(notification_id=record.id, created=created)


# ---------------------------------------------------------------------------- helpers ------


def _require_invoice(session: Session, invoice_id: str) -> InvoiceRecord:
    invoice = invoices_repo.get_invoice(session, invoice_id)
    if invoice is None:
        raise NotFound(f"invoice {invoice_id} not found")
    return invoice


def _matching(
    invoice: InvoiceRecord, payment_intent_id: str, details: SettlementDetails
) -> SettlementDetails:
    """``details`` if they are the invoice's amount and currency; ChangeRefused otherwise."""
    if (details.amount_minor, details.currency) != (invoice.amount_due_minor, invoice.currency):
        # Never mark an invoice paid with money that does not match it. This compares the
        # charge (what the customer paid); the settlement currency may legitimately differ.
        raise ChangeRefused(
            f"payment {payment_intent_id} is {details.amount_minor} {details.currency} "
            f"but invoice {invoice.number} is {invoice.amount_due_minor} {invoice.currency}"
        )
    return details


def _proration_line(line: ProrationLine) -> InvoiceLine:
    return InvoiceLine(
        kind=InvoiceLineKind.PRORATION,
        description=line.description,
        amount_minor=line.amount_minor,
        period_start=line.period_start,
        period_end=line.period_end,
        plan_code=line.plan_code,
        quantity=line.quantity,
        unit_amount_minor=line.unit_amount_minor,
        change_id=line.change_id,
    )


def _invoice_result(invoice: InvoiceRecord, *, created: bool) -> CreateInvoiceResult:
    return CreateInvoiceResult(
        invoice_id=invoice.id,
        number=invoice.number,
        status=invoice.status,
        amount_due_minor=invoice.amount_due_minor,
        currency=invoice.currency,
        created=created,
        period_start=invoice.period_start,
        period_end=invoice.period_end,
    )


def _attempt_result(attempt: PaymentAttemptRecord) -> ChargeInvoiceResult:
    assert attempt.outcome is not None
    return ChargeInvoiceResult(
        outcome=ChargeOutcomeKind(attempt.outcome),
        attempt_number=attempt.attempt_number,
        idempotency_key=attempt.idempotency_key,
        payment_intent_id=attempt.stripe_payment_intent_id,
        charge_id=attempt.stripe_charge_id,
        decline_code=attempt.decline_code,
        failure_message=attempt.failure_message,
        amount_due_minor=attempt.amount_minor,
    )


def _already_paid(
    session: Session,
    invoice: InvoiceRecord,
    succeeded: PaymentAttemptRecord | None,
    attempt_number: int,
) -> ChargeInvoiceResult:
    payment = payments_repo.get_payment_for_invoice(session, invoice.id)
    if succeeded is None and payment is not None:
        succeeded = next(
            a
            for a in attempts_repo.list_attempts_for_invoice(session, invoice.id)
            if a.id == payment.attempt_id
        )
    if succeeded is None:
        # Paid with no charge of ours: a credit note (or the customer's balance) brought the
        # amount due to 0. Nothing is sent; the workflow ends the collection (SettleByCredit).
        return ChargeInvoiceResult(
            outcome=ChargeOutcomeKind.PAID,
            attempt_number=attempt_number,
            idempotency_key=idempotency_key_for(invoice.id, attempt_number),
            already_paid=True,
            paid_by_credit=True,
            amount_due_minor=invoice.amount_due_minor,
        )
    result = _attempt_result(succeeded)
    result.already_paid = True
    result.payment_id = payment.id if payment is not None else None
    return result


def _intents_of(invoice: InvoiceRecord, attempts: list[PaymentAttemptRecord]) -> list[str]:
    """Every PaymentIntent our records tie to the invoice: its own first, then any other its
    attempts name (invoices charged before one-intent-per-invoice), newest first."""
    intents: list[str] = []
    named = [invoice.stripe_payment_intent_id] + [
        a.stripe_payment_intent_id for a in reversed(attempts)
    ]
    for payment_intent_id in named:
        if payment_intent_id is not None and payment_intent_id not in intents:
            intents.append(payment_intent_id)
    return intents


def _attempt_for_success(candidates: list[PaymentAttemptRecord]) -> PaymentAttemptRecord:
    """Which of an intent's attempts (by attempt number) a success belongs to: the latest
    one waiting for the customer or of unknown outcome, else the latest."""
    waiting = [
        a for a in candidates if a.status in (AttemptStatus.REQUIRES_ACTION, AttemptStatus.PENDING)
    ]
    return (waiting or candidates)[-1]


def _settle_result(payment: PaymentRecord) -> SettleInvoiceResult:
    return SettleInvoiceResult(
        payment_id=payment.id,
        paid_at=payment.settled_at,
        amount_minor=payment.amount_minor,
        currency=payment.currency,
        fee_minor=payment.fee_minor,
        net_minor=payment.net_minor,
    )
