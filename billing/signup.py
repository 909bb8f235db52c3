"""Signup: the business's signup flow starts a subscription here.

Order matters, so that bad input never leaves anything half-written:
1. validate the request (plan, time zone, trial, anchor, payment method) with reads only;
2. make the provider-side customer and card ready (idempotent calls keyed by our ids);
3. write the customer and the subscription in one database transaction;
4. start the subscription's workflow, whose id derives from the subscription id;
5. a new card for an existing customer is now their default at the provider: their other
   live subscriptions are told (``payment_method_changed``, no provider write), so one blocked
   by a hard decline retries with it at once.
A repeat with the same idempotency key returns the same subscription and starts nothing new.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import Client, WorkflowHandle
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from billing.calendar import add_local_days, ensure_utc, parse_interval_unit, resolve_timezone
from billing.clock import Clock
from billing.contracts import (
    PaymentMethodChangedInput,
    SubscriptionMessage,
    SubscriptionWorkflowInput,
    workflow_id_for,
)
from billing.errors import (
    IdempotencyConflict,
    InvalidInput,
    MissingPaymentMethod,
    NotFound,
    UnknownPlan,
)
from billing.ids import new_id, subscription_id_for_signup
from billing.invoices import invoice_prefix_for
from billing.payments import PaymentGateway
from billing.plans import MAX_TRIAL_DAYS, Plan, validate_plan
from billing.records import CustomerRecord, SubscriptionRecord
from billing.subscription import SubscriptionState, SubscriptionStatus
from db.engine import unit_of_work
from db.repositories import customers as customers_repo
from db.repositories import plans as plans_repo
from db.repositories import subscriptions as subscriptions_repo
from workflows.subscription import SubscriptionWorkflow

logger = logging.getLogger(__name__)

#: A billing anchor may be this far in the past (clock skew between caller and us).
ANCHOR_PAST_TOLERANCE = timedelta(minutes=5)
MAX_ANCHOR_AHEAD = timedelta(days=3 * 366)


@dataclass(frozen=True)
class CustomerDetails:
    external_id: str | None = None
    email: str | None = None
    name: str | None = None
    #: IANA zone in which billing dates are computed.
    timezone: str = "UTC"


@dataclass(frozen=True)
class SignupRequest:
    plan_code: str
    customer: CustomerDetails
    #: A provider payment method (``pm_...``) to attach and make the default.
    payment_method_id: str | None = None
    #: One of our existing customers; otherwise ``customer.external_id`` links or creates one.
    customer_id: str | None = None
    #: First billing date (UTC). Defaults to the trial's end, or now when there is no trial.
    billing_anchor_at: datetime | None = None
    #: Overrides the plan's trial length.
    trial_days: int | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True)
class SignupResult:
    subscription_id: str
    workflow_id: str
    customer_id: str
    status: SubscriptionStatus
    trial_end_at: datetime | None
    next_billing_at: datetime
    #: False when an earlier request with the same idempotency key created it.
    created: bool


def request_fingerprint(request: SignupRequest) -> str:
    body = asdict(request)
    body.pop("idempotency_key")
    canonical = json.dumps(body, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class SignupService:
    def __init__(
        self,
        session_factory: sessionmaker[Session],
        gateway: PaymentGateway,
        temporal: Client,
        *,
        task_queue: str,
        clock: Clock,
        payments_task_queue: str | None = None,
    ) -> None:
        """``payments_task_queue``: where the workflow runs its provider activities (the
        rate-capped payments queue); None runs them on ``task_queue``."""
        self.session_factory = session_factory
        self.gateway = gateway
        self.temporal = temporal
        self.task_queue = task_queue
        self.payments_task_queue = payments_task_queue
        self.clock = clock

    async def start_subscription(self, request: SignupRequest) -> SignupResult:
        prepared = await asyncio.to_thread(self._prepare, request)
        if isinstance(prepared, SignupResult):
            # Same key, same body: make sure its workflow runs, then answer as before.
            await self._start_workflow_from_db(prepared.subscription_id)
            return prepared
        state, record = prepared
        try:
            await self._start_workflow(state)
        except Exception:
            if request.idempotency_key is None:
                # No key to retry with: remove the pending row rather than orphan it.
                await asyncio.to_thread(self._delete_pending, record.id)
            raise
        if request.payment_method_id is not None:
            await self._tell_other_subscriptions(state)
        next_billing = state.anchor_at
        return SignupResult(
            subscription_id=state.subscription_id,
            workflow_id=workflow_id_for(state.subscription_id),
            customer_id=state.customer_id,
            status=SubscriptionStatus.TRIALING if state.trial_end_at else SubscriptionStatus.ACTIVE,
            trial_end_at=state.trial_end_at,
            next_billing_at=next_billing,
            created=True,
        )

    # ---------------------------------------------------------------------------------------

    def _prepare(
        self, request: SignupRequest
    ) -> SignupResult | tuple[SubscriptionState, SubscriptionRecord]:
        now = self.clock.now()
        fingerprint = request_fingerprint(request)
        _validate_shape(request)
        with unit_of_work(self.session_factory) as session:
            if request.idempotency_key is not None:
                existing = subscriptions_repo.get_subscription_by_signup_key(
                    session, request.idempotency_key
                )
                if existing is not None:
                    if existing.signup_request_hash != fingerprint:
                        raise IdempotencyConflict(
                            f"idempotency key {request.idempotency_key!r} was already used "
                            "with a different request; use a new key for a new signup"
                        )
                    return _result_from_record(existing)
            plan = plans_repo.get_plan(session, request.plan_code)
            if plan is None:
                known = ", ".join(sorted(p.code for p in plans_repo.list_plans(session)))
                raise UnknownPlan(
                    f"unknown plan {request.plan_code!r}; known plans: {known or '(none)'}",
                    field="plan",
                )
            plan = _sellable(plan)
            customer = _find_customer(session, request)
        payment_method_id = request.payment_method_id or (
            customer.default_payment_method_id if customer else None
        )
        if payment_method_id is None:
            who = customer.id if customer else (request.customer.external_id or "new customer")
            raise MissingPaymentMethod(
                f"customer {who!r} has no payment method; pass payment_method_id "
                "(a provider payment method such as 'pm_...')",
                field="payment_method_id",
            )

        trial_days = plan.trial_days if request.trial_days is None else request.trial_days
        timezone = customer.timezone if customer else request.customer.timezone
        trial_end_at = add_local_days(now, timezone, trial_days) if trial_days > 0 else None
        anchor_at = _anchor(request, now, trial_end_at)

        customer_id = customer.id if customer else _new_customer_id(request)
        subscription_id = (
            subscription_id_for_signup(request.idempotency_key)
            if request.idempotency_key
            else new_id("sub")
        )

        # Provider side first: these calls are idempotent, so a failure here (e.g. the card is
        # refused) leaves nothing in our database, and a retry reuses what was made.
        provider_customer_id = (customer.stripe_customer_id if customer else None) or (
            self.gateway.ensure_customer(
                customer_id=customer_id,
                email=request.customer.email,
                name=request.customer.name,
            )
        )
        if request.payment_method_id is not None:
            # Store what the provider attached: a token such as `pm_card_visa` becomes a real
            # payment method id there.
            attached = self.gateway.attach_payment_method(
                provider_customer_id=provider_customer_id,
                payment_method_id=request.payment_method_id,
            )
            payment_method_id = attached.payment_method_id

        record = SubscriptionRecord(
            id=subscription_id,
            customer_id=customer_id,
            plan_code=plan.code,
            status=SubscriptionStatus.PENDING,
            amount_minor=plan.amount_minor,
            currency=plan.currency,
            interval=plan.interval,
            interval_count=plan.interval_count,
            timezone=timezone,
            anchor_at=anchor_at,
            trial_end_at=trial_end_at,
            current_period_start=None,
            current_period_end=None,
            next_billing_at=anchor_at,
            cancel_at_period_end=False,
            cancel_reason=None,
            canceled_at=None,
            ended_at=None,
            paused_at=None,
            workflow_id=workflow_id_for(subscription_id),
            signup_idempotency_key=request.idempotency_key,
            signup_request_hash=fingerprint,
            created_at=now,
            updated_at=now,
        )
        with unit_of_work(self.session_factory) as session:
            if customer is None:
                customers_repo.insert_customer(
                    session,
                    CustomerRecord(
                        id=customer_id,
                        external_id=request.customer.external_id,
                        email=request.customer.email,
                        name=request.customer.name,
                        timezone=timezone,
                        stripe_customer_id=provider_customer_id,
                        default_payment_method_id=payment_method_id,
                        invoice_prefix=invoice_prefix_for(customer_id),
                        next_invoice_sequence=1,
                        created_at=now,
                        updated_at=now,
                    ),
                )
            else:
                if customer.stripe_customer_id is None:
                    customers_repo.set_stripe_customer_id(
                        session, customer.id, provider_customer_id
                    )
                customers_repo.set_default_payment_method(session, customer.id, payment_method_id)
            stored, inserted = subscriptions_repo.insert_subscription(session, record)
            if not inserted:
                # A concurrent request with the same idempotency key got here first.
                if stored.signup_request_hash != fingerprint:
                    raise IdempotencyConflict(
                        f"idempotency key {request.idempotency_key!r} was already used "
                        "with a different request; use a new key for a new signup"
                    )
                return _result_from_record(stored)

        state = SubscriptionState(
            subscription_id=subscription_id,
            customer_id=customer_id,
            plan=plan,
            timezone=timezone,
            started_at=now,
            anchor_at=anchor_at,
            trial_end_at=trial_end_at,
            payment_method_id=payment_method_id,
        )
        return state, record

    async def _start_workflow(
        self, state: SubscriptionState
    ) -> WorkflowHandle[SubscriptionWorkflow, object]:
        try:
            return await self.temporal.start_workflow(
                SubscriptionWorkflow.run,
                SubscriptionWorkflowInput(
                    state=state, payments_task_queue=self.payments_task_queue
                ),
                id=workflow_id_for(state.subscription_id),
                task_queue=self.task_queue,
                # One workflow per subscription, ever: a second start is refused.
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            )
        except WorkflowAlreadyStartedError:
            return self.temporal.get_workflow_handle(workflow_id_for(state.subscription_id))

    async def _tell_other_subscriptions(self, state: SubscriptionState) -> None:
        """The signup made its card the customer's default at the provider: a card change for
        every subscription of the customer. Stripe's news of that write (customer.updated) is
        known news to the webhook (the card is on record), so the signup tells them. Best
        effort: the subscription exists; a sibling not told keeps its own schedule."""

        def others() -> list[str]:
            with unit_of_work(self.session_factory) as session:
                return [
                    sub.id
                    for sub in subscriptions_repo.list_subscriptions_for_customer(
                        session, state.customer_id, live_only=True
                    )
                    if sub.id != state.subscription_id and sub.status != SubscriptionStatus.PENDING
                ]

        news = PaymentMethodChangedInput(payment_method_id=state.payment_method_id or "")
        if not news.payment_method_id:
            return
        for subscription_id in await asyncio.to_thread(others):
            handle = self.temporal.get_workflow_handle(workflow_id_for(subscription_id))
            try:
                await handle.signal(SubscriptionMessage.PAYMENT_METHOD_CHANGED, news)
            except (RPCError, RuntimeError) as error:
                # Ended meanwhile (NOT_FOUND), or Temporal unreachable: the signup stands.
                logger.warning(
                    "subscription %s was not told of the new card %s: %s",
                    subscription_id,
                    news.payment_method_id,
                    error,
                )

    async def _start_workflow_from_db(self, subscription_id: str) -> None:
        """Start the workflow of a subscription recorded by an earlier attempt (its start may
        have failed after the database commit)."""

        def load() -> SubscriptionState | None:
            with unit_of_work(self.session_factory) as session:
                record = subscriptions_repo.get_subscription(session, subscription_id)
                if record is None or record.status != SubscriptionStatus.PENDING:
                    return None
                plan = plans_repo.get_plan(session, record.plan_code)
                customer = customers_repo.get_customer(session, record.customer_id)
            if plan is None or customer is None:
                raise NotFound(f"subscription {subscription_id} refers to missing rows")
            return SubscriptionState(
                subscription_id=record.id,
                customer_id=record.customer_id,
                plan=_snapshot(plan, record),
                timezone=record.timezone,
                started_at=record.created_at,
                anchor_at=record.anchor_at,
                trial_end_at=record.trial_end_at,
                payment_method_id=customer.default_payment_method_id,
            )

        state = await asyncio.to_thread(load)
        if state is not None:
            await self._start_workflow(state)

    def _delete_pending(self, subscription_id: str) -> None:
        with unit_of_work(self.session_factory) as session:
            subscriptions_repo.delete_pending_subscription(session, subscription_id)


def _validate_shape(request: SignupRequest) -> None:
    resolve_timezone(request.customer.timezone)
    if request.trial_days is not None and (
        isinstance(request.trial_days, bool)
        or not isinstance(request.trial_days, int)
        or not 0 <= request.trial_days <= MAX_TRIAL_DAYS
    ):
        raise InvalidInput(
            f"trial_days must be between 0 and {MAX_TRIAL_DAYS}; got {request.trial_days!r}",
            field="trial_days",
        )
    if request.payment_method_id is not None and not request.payment_method_id.strip():
        raise InvalidInput("payment_method_id must not be empty", field="payment_method_id")
    if request.idempotency_key is not None and not 1 <= len(request.idempotency_key) <= 200:
        raise InvalidInput("idempotency key must be 1 to 200 characters", field="idempotency_key")


def _anchor(request: SignupRequest, now: datetime, trial_end_at: datetime | None) -> datetime:
    if request.billing_anchor_at is None:
        return trial_end_at or now
    anchor = ensure_utc(request.billing_anchor_at)
    earliest = trial_end_at or now - ANCHOR_PAST_TOLERANCE
    if anchor < earliest:
        raise InvalidInput(
            f"billing_anchor_at {anchor.isoformat()} is before "
            + ("the trial's end" if trial_end_at else "now")
            + f" ({earliest.isoformat()}); the first billing date cannot be in the past",
            field="billing_anchor_at",
        )
    if anchor > now + MAX_ANCHOR_AHEAD:
        raise InvalidInput(
            f"billing_anchor_at {anchor.isoformat()} is more than three years ahead",
            field="billing_anchor_at",
        )
    return anchor


def _find_customer(session: Session, request: SignupRequest) -> CustomerRecord | None:
    if request.customer_id is not None:
        customer = customers_repo.get_customer(session, request.customer_id)
        if customer is None:
            raise NotFound(f"customer {request.customer_id!r} not found", field="customer_id")
        return customer
    if request.customer.external_id:
        return customers_repo.get_customer_by_external_id(session, request.customer.external_id)
    return None


def _new_customer_id(request: SignupRequest) -> str:
    # Derived from the idempotency key when there is one, so a retried signup reuses the
    # provider customer made by the first try (ensure_customer is keyed by our id).
    if request.idempotency_key:
        digest = hashlib.sha256(f"customer\x1f{request.idempotency_key}".encode()).hexdigest()
        return f"cus_{digest[:24]}"
    return new_id("cus")


def _result_from_record(record: SubscriptionRecord) -> SignupResult:
    return SignupResult(
        subscription_id=record.id,
        workflow_id=record.workflow_id,
        customer_id=record.customer_id,
        status=record.status,
        trial_end_at=record.trial_end_at,
        next_billing_at=record.next_billing_at or record.anchor_at,
        created=False,
    )


def _sellable(plan: Plan) -> Plan:
    """The catalog plan, validated by today's rules before a subscription snapshots it: the
    catalog row was checked when written, but a later library (babel's CLDR currencies) may
    refuse what an older one accepted, and a workflow must start only with a plan that every
    edge of today's code accepts. Running subscriptions are not affected: their snapshot is
    decoded without validation."""
    try:
        return validate_plan(plan)
    except InvalidInput as error:
        raise InvalidInput(
            f"plan {plan.code!r} cannot be sold: {error.message}; fix the plan in the catalog "
            "(create a new plan code) or choose another plan",
            field="plan",
        ) from None


def _snapshot(plan: Plan, record: SubscriptionRecord) -> Plan:
    """The plan as recorded on the subscription (price and interval are snapshotted)."""
    return replace(
        plan,
        amount_minor=record.amount_minor,
        currency=record.currency,
        interval=parse_interval_unit(record.interval),
        interval_count=record.interval_count,
    )
