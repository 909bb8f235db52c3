"""Signup: the business's signup flow starts a subscription here.

Order matters, so that bad input never leaves anything half-written and concurrent signups
for one customer make one customer:
1. validate the request (plan, time zone, trial, anchor, payment method) with reads only;
2. claim the customer: find it or insert its row, and take its signup lease, so signups for
   one customer run one at a time (another waits its turn, or answers 409 after a while);
3. holding the lease, make the provider customer once (its creation key derives from our
   customer id, and its id is stored at once) and attach the card once;
4. write the default card and the ``pending`` subscription in one transaction, then let go;
5. start the subscription's workflow, whose id derives from the subscription id.

A repeat with the same idempotency key from the same API key returns the same subscription
and starts nothing new. A start that fails ambiguously (timeout, unavailable: it may have
started) keeps the pending row, and the sweeper (``sweep_pending``) starts it later; only a
definite refusal removes it. The sweeper also cleans up a pending signup that can never start,
including the card it attached.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import secrets
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

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
    InvalidTimezone,
    MissingPaymentMethod,
    NotFound,
    PlanArchived,
    SignupInProgress,
    UnknownPlan,
)
from billing.ids import new_id, subscription_id_for_signup
from billing.invoices import invoice_prefix_for
from billing.locales import check_locale
from billing.payments import PaymentGateway
from billing.plans import (
    MAX_TRIAL_DAYS,
    Plan,
    validate_plan,
    validate_quantity,
    validate_total,
)
from billing.records import CustomerRecord, SubscriptionRecord
from billing.subscription import SubscriptionState, SubscriptionStatus
from billing.text import (
    CARD_BRAND,
    CARD_LAST4,
    CUSTOMER_NAME,
    EMAIL,
    EXTERNAL_ID,
    IDEMPOTENCY_KEY,
    OUR_ID,
    PAYMENT_METHOD_ID,
    PLAN_CODE,
    TIMEZONE,
    clean_provider_text,
)
from db.engine import unit_of_work
from db.repositories import customers as customers_repo
from db.repositories import plans as plans_repo
from db.repositories import subscriptions as subscriptions_repo
from workflows.subscription import SubscriptionWorkflow

logger = logging.getLogger("billing.signup")

#: How long a signup holds its customer. A holder that died frees it when this lapses; a
#: holder still working (the provider being slow) keeps it correct by the provider's own
#: idempotency keys.
SIGNUP_LEASE = timedelta(minutes=2)
#: How long a signup waits for another signup of the same customer before answering 409.
SIGNUP_LEASE_WAIT = timedelta(seconds=15)
_LEASE_POLL_S = 0.05
#: A pending signup younger than this may still be starting its workflow; the sweeper leaves
#: it alone.
SIGNUP_SWEEP_GRACE = timedelta(minutes=2)

#: Answers of the workflow service that mean the start was refused, so nothing runs: the row
#: may go. Any other failure (timeout, unavailable, cancel, internal) may hide a start.
_START_REFUSED = frozenset(
    {
        RPCStatusCode.INVALID_ARGUMENT,
        RPCStatusCode.NOT_FOUND,
        RPCStatusCode.PERMISSION_DENIED,
        RPCStatusCode.UNAUTHENTICATED,
        RPCStatusCode.FAILED_PRECONDITION,
        RPCStatusCode.RESOURCE_EXHAUSTED,
        RPCStatusCode.UNIMPLEMENTED,
    }
)

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
    #: BCP 47 locale of the customer's mails and invoice documents (``billing.locales``);
    #: None: English mails, the seller's default for documents.
    locale: str | None = None


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
    #: Whose idempotency key it is: a digest of the sender's API key ("" in-process). The
    #: same key from two senders is two requests, as Stripe scopes keys to the account.
    idempotency_scope: str = ""
    #: Seats (the plan's amount is the price of one); 1 for a flat plan.
    quantity: int = 1


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
    #: False when the workflow's start could not be confirmed (the service timed out or was
    #: unreachable): the subscription is recorded ``pending`` and the sweeper starts it.
    workflow_started: bool = True


@dataclass
class SweepReport:
    """What one sweep of pending signups did (subscription ids)."""

    #: Workflows started (or found already started).
    started: list[str] = field(default_factory=list)
    #: Signups that can never start, removed with the card they attached.
    cleaned_up: list[str] = field(default_factory=list)
    #: Left for the next sweep, with the reason.
    failed: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class _Claim:
    """A customer held by one signup (its lease ``token``)."""

    customer_id: str
    token: str
    #: This signup inserted the customer's row.
    created: bool
    #: The customer's row as read under the lease (None: read it in ``_prepare``).
    customer: CustomerRecord | None = None
    #: The same request, finished by another signup while this one waited for the customer.
    replay: SignupResult | None = None
    #: The lease was let go in the transaction that recorded the subscription.
    released: bool = False


@dataclass(frozen=True)
class _Busy:
    """Another signup holds the customer: wait for it (``_claim_customer``)."""

    plan: Plan
    customer_id: str | None


class _CannotStart(Exception):
    """A pending signup whose workflow can never be started (the reason is the message)."""


def request_fingerprint(request: SignupRequest) -> str:
    body = asdict(request)
    body.pop("idempotency_key")
    body.pop("idempotency_scope")
    if body.get("quantity") == 1:
        # The default: requests recorded before seats existed keep their fingerprint.
        body.pop("quantity")
    if body["customer"].get("locale") is None:
        # Likewise for requests recorded before signups took a locale.
        body["customer"].pop("locale", None)
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
        request = _validate_shape(request)
        fingerprint = request_fingerprint(request)
        token = secrets.token_hex(16)
        # One thread, two transactions around the provider's one request when the customer is
        # free (the usual case): look up and claim, then record the subscription and let go.
        # The lease is let go inside the same thread, after its work: a request canceled
        # meanwhile (the caller hung up) must not free the customer while that work runs.
        opened = await asyncio.to_thread(self._open, request, fingerprint, token)
        if isinstance(opened, _Busy):
            claim = await self._claim_customer(request, opened.customer_id, token)
            opened = await asyncio.to_thread(
                self._prepare, request, fingerprint, opened.plan, claim
            )
        if isinstance(opened, SignupResult):
            return await self._replayed(opened)
        state, record, created = opened
        # A customer this signup created has no other subscription to tell of its card.
        return await self._start_new(state, record, tell_others=not created)

    async def sweep_pending(self, *, older_than: timedelta = SIGNUP_SWEEP_GRACE) -> SweepReport:
        """Bring every signup still ``pending`` after ``older_than`` to an end: start its
        workflow (a start is idempotent by workflow id: already started is success), or, if it
        can never start, remove it and detach the card it attached (unless another live
        subscription of the customer uses that card). Safe to run twice, or concurrently."""
        report = SweepReport()
        cutoff = self.clock.now() - older_than
        pending = await asyncio.to_thread(self._pending_before, cutoff)
        for record in pending:
            try:
                try:
                    state = await asyncio.to_thread(self._state_from_db, record.id)
                except _CannotStart as reason:
                    if await self._workflow_exists(record.id):
                        # Something runs under its id (it has not reported in yet): not ours.
                        report.failed.append((record.id, f"{reason}; but its workflow exists"))
                    elif await self._clean_up(record):
                        logger.warning("pending signup %s removed: %s", record.id, reason)
                        report.cleaned_up.append(record.id)
                    else:
                        report.failed.append((record.id, f"{reason}; cleanup must wait"))
                    continue
                if state is None:
                    continue  # its workflow reported in meanwhile
                if not await self._start_workflow(state) and not await self._workflow_running(
                    record.id
                ):
                    # Its one execution ended before it ever reported in (terminated by hand?):
                    # the id cannot run again, and what it did is for a person to look at.
                    report.failed.append(
                        (record.id, "its workflow closed without reporting in; see its history")
                    )
                    continue
                logger.info("pending signup %s: workflow started by the sweeper", record.id)
                report.started.append(record.id)
            except Exception as error:  # one bad row must not stop the sweep
                logger.warning("pending signup %s left for the next sweep: %s", record.id, error)
                report.failed.append((record.id, f"{type(error).__name__}: {error}"))
        return report

    async def start_pending(self, subscription_id: str) -> bool:
        """Start the workflow of a subscription recorded ``pending`` (what the sweeper does for
        one row, without the grace period); False if it is not pending any more. Raises if it
        can never start."""
        try:
            state = await asyncio.to_thread(self._state_from_db, subscription_id)
        except _CannotStart as reason:
            raise NotFound(f"subscription {subscription_id} cannot start: {reason}") from None
        if state is None:
            return False
        await self._start_workflow(state)
        return True

    # ---------------------------------------------------------------------------------------

    def _open(
        self, request: SignupRequest, fingerprint: str, token: str
    ) -> SignupResult | _Busy | tuple[SubscriptionState, SubscriptionRecord, bool]:
        """In one transaction, look up (the replay, the plan, the customer), refuse what can
        be refused, and claim the customer (insert its row with this signup's lease, or take
        the lease of the existing row); then, holding it, prepare the subscription
        (``_prepare``). ``_Busy`` when another signup holds the customer."""
        with unit_of_work(self.session_factory) as session:
            looked_up = self._look_up(session, request, fingerprint)
            if isinstance(looked_up, SignupResult):
                return looked_up
            plan, customer = looked_up
            claim = self._claim_in(session, request, fingerprint, token, customer)
        if claim is None:
            return _Busy(plan, customer.id if customer else None)
        return self._prepare(request, fingerprint, plan, claim)

    def _look_up(
        self, session: Session, request: SignupRequest, fingerprint: str
    ) -> SignupResult | tuple[Plan, CustomerRecord | None]:
        """Reads only: the replay of an earlier request with the key, else the plan and the
        existing customer. Refuses what can be refused before anything is written."""
        replay = _replay_of(session, request, fingerprint)
        if replay is not None:
            return replay
        catalog_plan = plans_repo.get_catalog_plan(session, request.plan_code)
        if catalog_plan is None:
            known = ", ".join(sorted(p.code for p in plans_repo.list_plans(session)))
            raise UnknownPlan(
                f"unknown plan {request.plan_code!r}; known plans: {known or '(none)'}",
                field="plan",
            )
        if not catalog_plan.active:
            raise PlanArchived(
                f"plan {catalog_plan.plan.code!r} is archived and takes no new signups; choose "
                "one of: "
                + (
                    ", ".join(p.code for p in plans_repo.list_plans(session, active_only=True))
                    or "(none)"
                ),
                field="plan",
            )
        plan = _sellable(catalog_plan.plan)
        validate_total(plan, request.quantity)
        customer = _find_customer(session, request)
        _check_payment_method(request, customer)
        timezone = customer.timezone if customer else request.customer.timezone
        _dates(request, plan, timezone, self.clock.now())  # refuses a bad trial or anchor
        return plan, customer

    def _claim_in(
        self,
        session: Session,
        request: SignupRequest,
        fingerprint: str,
        token: str,
        found: CustomerRecord | None,
    ) -> _Claim | None:
        """In the look-up's transaction: insert the customer ``found`` nothing of, with this
        signup's lease, or take the lease of its row. None if another signup holds it (or
        removed it meanwhile): ``_claim_customer`` then waits."""
        now = datetime.now(UTC)
        expires_at = now + SIGNUP_LEASE
        customer_id = request.customer_id or (found.id if found else None)
        if customer_id is None and request.idempotency_key:
            # A retry of a keyed signup whose customer has no external id finds it here.
            existing = customers_repo.get_customer(session, _new_customer_id(request))
            customer_id = existing.id if existing else None
        if customer_id is None:
            stored, inserted = customers_repo.insert_customer(
                session, self._new_customer(request, token, expires_at)
            )
            if inserted:
                return _Claim(stored.id, token, created=True, customer=stored)
            customer_id = stored.id  # a concurrent signup inserted it first
        if not customers_repo.take_signup_lease(
            session, customer_id, token, now=now, expires_at=expires_at
        ):
            return None
        return self._held(session, request, fingerprint, customer_id, token)

    def _held(
        self,
        session: Session,
        request: SignupRequest,
        fingerprint: str,
        customer_id: str,
        token: str,
    ) -> _Claim:
        """The claim of a customer whose lease this transaction just took: its row as it is
        now, and the same request if another signup finished it before the lease was ours."""
        return _Claim(
            customer_id,
            token,
            created=False,
            customer=customers_repo.get_customer(session, customer_id),
            replay=_replay_of(session, request, fingerprint),
        )

    async def _claim_customer(
        self, request: SignupRequest, customer_id: str | None, token: str
    ) -> _Claim:
        """Find or insert the customer's row and take its signup lease, waiting up to
        ``SIGNUP_LEASE_WAIT`` for another signup of the same customer to finish."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SIGNUP_LEASE_WAIT.total_seconds()
        while True:
            claim = await asyncio.to_thread(self._try_claim, request, customer_id, token)
            if claim is not None:
                return claim
            if loop.time() >= deadline:
                who = customer_id or request.customer.external_id or "this customer"
                raise SignupInProgress(
                    f"another signup for customer {who!r} is in progress; retry in a few "
                    "seconds (with the same Idempotency-Key, to get its answer if it was yours)"
                )
            # Jitter: waiters do not all hit the row at the same instant.
            await asyncio.sleep(_LEASE_POLL_S * (1 + random.random()))

    def _try_claim(
        self, request: SignupRequest, customer_id: str | None, token: str
    ) -> _Claim | None:
        """One try: the claim, or None while another signup holds the customer."""
        # Real time, not the injected billing clock (a simulation moves that one in jumps):
        # a lease is about how long a request may run.
        now = datetime.now(UTC)
        expires_at = now + SIGNUP_LEASE
        fingerprint = request_fingerprint(request)
        with unit_of_work(self.session_factory) as session:
            if request.customer_id is not None:
                taken = customers_repo.take_signup_lease(
                    session, request.customer_id, token, now=now, expires_at=expires_at
                )
                if taken is None:
                    raise NotFound(
                        f"customer {request.customer_id!r} not found", field="customer_id"
                    )
                if not taken:
                    return None
                return self._held(session, request, fingerprint, request.customer_id, token)
            existing = _find_customer(session, request)
            if existing is None and request.idempotency_key:
                # A retry of a keyed signup whose customer has no external id finds it here.
                existing = customers_repo.get_customer(session, _new_customer_id(request))
            if existing is None:
                record = self._new_customer(request, token, expires_at)
                stored, inserted = customers_repo.insert_customer(session, record)
                if inserted:
                    return _Claim(stored.id, token, created=True, customer=stored)
                existing = stored  # a concurrent signup inserted it first
            taken = customers_repo.take_signup_lease(
                session, existing.id, token, now=now, expires_at=expires_at
            )
            if taken:
                return self._held(session, request, fingerprint, existing.id, token)
        if taken is None:
            # Removed by the signup that held it (it failed before the provider had anything):
            # start over, which inserts it again.
            return self._try_claim(request, customer_id, token)
        return None

    def _new_customer(
        self, request: SignupRequest, token: str, expires_at: datetime
    ) -> CustomerRecord:
        now = self.clock.now()
        customer_id = _new_customer_id(request)
        return CustomerRecord(
            id=customer_id,
            external_id=request.customer.external_id,
            email=request.customer.email,
            name=request.customer.name,
            timezone=request.customer.timezone,
            locale=request.customer.locale,
            invoice_prefix=invoice_prefix_for(customer_id),
            next_invoice_sequence=1,
            created_at=now,
            updated_at=now,
            signup_lease_token=token,
            signup_lease_expires_at=expires_at,
        )

    def _prepare(
        self, request: SignupRequest, fingerprint: str, plan: Plan, claim: _Claim
    ) -> SignupResult | tuple[SubscriptionState, SubscriptionRecord, bool]:
        """Holding the customer: provider customer and card, then the pending subscription
        (and whether this signup created the customer). Lets the customer go at the end,
        whatever happened: in the transaction that records the subscription, else after."""
        try:
            if claim.replay is not None:
                # While this signup waited for the customer, the same request finished.
                return claim.replay
            prepared = self._prepare_holding(request, fingerprint, plan, claim)
            if isinstance(prepared, SignupResult):
                return prepared
            return (*prepared, claim.created)
        except BaseException:
            if claim.created:
                # A row this signup inserted and that the provider knows nothing of goes
                # again; one with a provider customer stays, so that customer is never lost
                # (a retry reuses both).
                with unit_of_work(self.session_factory) as session:
                    customers_repo.delete_customer_without_subscriptions(session, claim.customer_id)
            raise
        finally:
            if not claim.released:
                with unit_of_work(self.session_factory) as session:
                    customers_repo.release_signup_lease(session, claim.customer_id, claim.token)

    def _prepare_holding(
        self, request: SignupRequest, fingerprint: str, plan: Plan, claim: _Claim
    ) -> SignupResult | tuple[SubscriptionState, SubscriptionRecord]:
        customer = claim.customer
        if customer is None:
            raise NotFound(f"customer {claim.customer_id!r} not found", field="customer_id")
        _check_payment_method(request, customer)
        now = self.clock.now()
        timezone = customer.timezone
        trial_end_at, anchor_at = _dates(request, plan, timezone, now)
        subscription_id = (
            subscription_id_for_signup(request.idempotency_key, request.idempotency_scope)
            if request.idempotency_key
            else new_id("sub")
        )

        # One provider customer per customer: created under the lease, with a creation key
        # derived from our customer id, and recorded at once, so the next signup (or a retry
        # after a crash) finds it instead of making another.
        provider_customer_id = customer.stripe_customer_id
        payment_method_id = customer.default_payment_method_id
        attached_id: str | None = None
        made_customer_id: str | None = None
        card: tuple[str | None, str | None] = (None, None)
        if provider_customer_id is None:
            # One request: the customer with the card attached and made its default. Its key
            # derives from our customer id and the card (a retry with the same card finds the
            # same customer). Its id is recorded with the subscription below, in the same
            # transaction (or on its own if that transaction fails), still under the lease.
            made = self.gateway.create_customer(
                customer_id=customer.id,
                email=customer.email,
                name=customer.name,
                payment_method_id=request.payment_method_id,
            )
            made_customer_id = made.provider_customer_id
            if made.payment_method is not None:
                payment_method_id = attached_id = made.payment_method.payment_method_id
                card = (
                    clean_provider_text(made.payment_method.card_brand, CARD_BRAND),
                    clean_provider_text(made.payment_method.card_last4, CARD_LAST4),
                )
        elif request.payment_method_id is not None:
            # Store what the provider attached: a token such as `pm_card_visa` becomes a real
            # payment method id there. Under the lease, so a card is attached once. Two
            # requests: the attach and the default.
            attached = self.gateway.attach_payment_method(
                provider_customer_id=provider_customer_id,
                payment_method_id=request.payment_method_id,
            )
            payment_method_id = attached_id = attached.payment_method_id
            card = (
                clean_provider_text(attached.card_brand, CARD_BRAND),
                clean_provider_text(attached.card_last4, CARD_LAST4),
            )
        assert payment_method_id is not None  # _check_payment_method

        record = SubscriptionRecord(
            id=subscription_id,
            customer_id=customer.id,
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
            signup_key_scope=request.idempotency_scope if request.idempotency_key else None,
            signup_payment_method_id=attached_id,
            created_at=now,
            updated_at=now,
            quantity=request.quantity,
        )
        try:
            # One transaction: the provider customer's id, the card, the pending subscription,
            # and the lease let go (a commit later than this one could only delay the next
            # signup of the customer).
            with unit_of_work(self.session_factory) as session:
                if made_customer_id is not None:
                    customers_repo.set_stripe_customer_id(
                        session, customer.id, made_customer_id, now=now
                    )
                if attached_id is not None:
                    customers_repo.set_default_payment_method(
                        session, customer.id, attached_id, card_brand=card[0], card_last4=card[1]
                    )
                if (
                    request.customer.locale is not None
                    and request.customer.locale != customer.locale
                ):
                    # An existing customer takes the locale the signup states (its time zone,
                    # by contrast, stays: its billing dates already follow it). In the
                    # transaction that writes the subscription, so a refused signup changes
                    # nothing.
                    customers_repo.set_mail_preferences(
                        session,
                        customer.id,
                        locale=request.customer.locale,
                        mail_opt_out=None,
                        now=now,
                    )
                stored, inserted = subscriptions_repo.insert_subscription(session, record)
                if not inserted:
                    # The same key from the same sender got here first (before the lease: a
                    # subscription that moved to another customer cannot, ids derive from
                    # keys).
                    if stored.signup_request_hash != fingerprint:
                        raise _conflict(request)
                    replayed: SignupResult | None = _result_from_record(stored)
                else:
                    replayed = None
                customers_repo.release_signup_lease(session, customer.id, claim.token)
        except BaseException:
            if made_customer_id is not None:
                # The provider customer exists: its id is kept whatever else failed, so the
                # customer is never lost (a retry reuses it) and the row is not removed.
                with unit_of_work(self.session_factory) as session:
                    customers_repo.set_stripe_customer_id(
                        session, customer.id, made_customer_id, now=now
                    )
            raise
        claim.released = True
        if replayed is not None:
            return replayed

        state = SubscriptionState(
            subscription_id=subscription_id,
            customer_id=customer.id,
            plan=plan,
            timezone=timezone,
            started_at=now,
            anchor_at=anchor_at,
            trial_end_at=trial_end_at,
            payment_method_id=payment_method_id,
            quantity=request.quantity,
        )
        return state, record

    async def _start_new(
        self, state: SubscriptionState, record: SubscriptionRecord, *, tell_others: bool = True
    ) -> SignupResult:
        started = True
        try:
            await self._start_workflow(state)
        except Exception as error:
            if not _start_refused(error):
                # It may have started: keep the row. The sweeper starts it (or finds it
                # started); deleting it could leave a running workflow without its rows.
                logger.warning(
                    "subscription %s: workflow start not confirmed (%s); left pending for the "
                    "sweeper",
                    state.subscription_id,
                    error,
                )
                started = False
            else:
                # Refused outright: nothing runs, so nothing may stay. The caller is told.
                await self._clean_up(record)
                raise
        if started and tell_others and record.signup_payment_method_id is not None:
            # The card it attached is now the customer's default at the provider: the
            # customer's other subscriptions use it too.
            await self._tell_other_subscriptions(state)
        return SignupResult(
            subscription_id=state.subscription_id,
            workflow_id=workflow_id_for(state.subscription_id),
            customer_id=state.customer_id,
            status=(
                SubscriptionStatus.PENDING
                if not started
                else SubscriptionStatus.TRIALING
                if state.trial_end_at
                else SubscriptionStatus.ACTIVE
            ),
            trial_end_at=state.trial_end_at,
            next_billing_at=state.anchor_at,
            created=True,
            workflow_started=started,
        )

    async def _replayed(self, result: SignupResult) -> SignupResult:
        """Same key, same body: make sure its workflow runs, then answer as before."""
        if result.status != SubscriptionStatus.PENDING:
            return result
        try:
            state = await asyncio.to_thread(self._state_from_db, result.subscription_id)
            if state is not None:
                await self._start_workflow(state)
        except _CannotStart as reason:
            raise NotFound(
                f"subscription {result.subscription_id} cannot start: {reason}; sign up again "
                "with a new Idempotency-Key"
            ) from None
        except Exception as error:
            if _start_refused(error):
                raise
            return replace(result, workflow_started=False)
        return result

    async def _start_workflow(self, state: SubscriptionState) -> bool:
        """Start the subscription's workflow: True if this call started it, False if it was
        started before (by the signup, a replay or a sweep), which is success too."""
        try:
            await self.temporal.start_workflow(
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
            return False
        return True

    async def _workflow_running(self, subscription_id: str) -> bool:
        handle = self.temporal.get_workflow_handle(workflow_id_for(subscription_id))
        return (await handle.describe()).status == WorkflowExecutionStatus.RUNNING

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

    async def _workflow_exists(self, subscription_id: str) -> bool:
        try:
            await self.temporal.get_workflow_handle(workflow_id_for(subscription_id)).describe()
        except RPCError as error:
            if error.status == RPCStatusCode.NOT_FOUND:
                return False
            raise
        return True

    def _pending_before(self, cutoff: datetime) -> list[SubscriptionRecord]:
        with unit_of_work(self.session_factory) as session:
            return subscriptions_repo.list_pending_signups(session, created_before=cutoff)

    def _state_from_db(self, subscription_id: str) -> SubscriptionState | None:
        """The starting state of a subscription recorded by an earlier signup (its start may
        have failed after the database commit); None if it is no longer pending. Raises
        _CannotStart if it never can start."""
        with unit_of_work(self.session_factory) as session:
            record = subscriptions_repo.get_subscription(session, subscription_id)
            if record is None or record.status != SubscriptionStatus.PENDING:
                return None
            plan = plans_repo.get_plan(session, record.plan_code)
            customer = customers_repo.get_customer(session, record.customer_id)
        if plan is None:
            raise _CannotStart(f"its plan {record.plan_code!r} no longer exists")
        if customer is None:
            raise _CannotStart(f"its customer {record.customer_id!r} no longer exists")
        payment_method_id = record.signup_payment_method_id or customer.default_payment_method_id
        if payment_method_id is None:
            raise _CannotStart(f"customer {customer.id} has no payment method")
        return SubscriptionState(
            subscription_id=record.id,
            customer_id=record.customer_id,
            plan=_snapshot(plan, record),
            timezone=record.timezone,
            started_at=record.created_at,
            anchor_at=record.anchor_at,
            trial_end_at=record.trial_end_at,
            payment_method_id=payment_method_id,
            quantity=record.quantity,
        )

    async def _clean_up(self, record: SubscriptionRecord) -> bool:
        """Remove a pending subscription that will never start and detach the card its signup
        attached, unless another live subscription of the customer may charge it. Under the
        customer's lease, so no signup attaches the same card meanwhile. False if the
        customer is busy or the subscription is no longer pending."""
        token = secrets.token_hex(16)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SIGNUP_LEASE_WAIT.total_seconds()
        while True:
            taken = await asyncio.to_thread(self._lease, record.customer_id, token)
            if taken is not False:
                break
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(_LEASE_POLL_S * (1 + random.random()))
        return await asyncio.to_thread(self._clean_up_holding, record, token)

    def _lease(self, customer_id: str, token: str) -> bool | None:
        now = datetime.now(UTC)
        with unit_of_work(self.session_factory) as session:
            return customers_repo.take_signup_lease(
                session, customer_id, token, now=now, expires_at=now + SIGNUP_LEASE
            )

    def _clean_up_holding(self, record: SubscriptionRecord, token: str) -> bool:
        try:
            card = record.signup_payment_method_id
            with unit_of_work(self.session_factory) as session:
                # The conditional delete decides: a subscription whose workflow reported in
                # is not pending any more, and keeps everything.
                if not subscriptions_repo.delete_pending_subscription(session, record.id):
                    return False
                in_use = card is not None and subscriptions_repo.payment_method_in_use(
                    session, record.customer_id, card, besides=record.id
                )
            if card is not None and not in_use:
                try:
                    self.gateway.detach_payment_method(payment_method_id=card)
                except Exception as error:
                    # The row is gone already; the card stays attached to a customer with
                    # no subscription charging it. Said loudly, for an operator.
                    logger.error(
                        "signup %s removed but its card %s could not be detached: %s",
                        record.id,
                        card,
                        error,
                    )
                    return True
                with unit_of_work(self.session_factory) as session:
                    customer = customers_repo.get_customer(session, record.customer_id)
                    if customer is not None and customer.default_payment_method_id == card:
                        customers_repo.set_default_payment_method(session, customer.id, None)
            return True
        finally:
            with unit_of_work(self.session_factory) as session:
                customers_repo.release_signup_lease(session, record.customer_id, token)


def _start_refused(error: BaseException) -> bool:
    """Whether a failed start definitely started nothing."""
    if isinstance(error, RPCError):
        return error.status in _START_REFUSED
    # A lazily connecting client that never reached the service.
    return isinstance(error, RuntimeError) and str(error).startswith("Failed client connect")


def _conflict(request: SignupRequest) -> IdempotencyConflict:
    return IdempotencyConflict(
        f"idempotency key {request.idempotency_key!r} was already used "
        "with a different request; use a new key for a new signup"
    )


def _replay_of(session: Session, request: SignupRequest, fingerprint: str) -> SignupResult | None:
    if request.idempotency_key is None:
        return None
    existing = subscriptions_repo.get_subscription_by_signup_key(
        session, request.idempotency_key, request.idempotency_scope
    )
    if existing is None:
        return None
    if existing.signup_request_hash != fingerprint:
        raise _conflict(request)
    return _result_from_record(existing)


def _check_payment_method(request: SignupRequest, customer: CustomerRecord | None) -> None:
    if request.payment_method_id is None and (
        customer is None or customer.default_payment_method_id is None
    ):
        who = customer.id if customer else (request.customer.external_id or "new customer")
        raise MissingPaymentMethod(
            f"customer {who!r} has no payment method; pass payment_method_id "
            "(a provider payment method such as 'pm_...')",
            field="payment_method_id",
        )


def _dates(
    request: SignupRequest, plan: Plan, timezone: str, now: datetime
) -> tuple[datetime | None, datetime]:
    """The trial's end and the first billing date (UTC)."""
    trial_days = plan.trial_days if request.trial_days is None else request.trial_days
    trial_end_at = add_local_days(now, timezone, trial_days) if trial_days > 0 else None
    return trial_end_at, _anchor(request, now, trial_end_at)


def _validate_shape(request: SignupRequest) -> SignupRequest:
    """``request`` checked (the text rule, the zone, the trial), with its locale as the BCP 47
    tag it stands for (``de_ch`` -> ``de-CH``); InvalidInput naming the field otherwise."""
    # The text rule first (the API checked it already; other callers, such as the CLI's demo
    # and the simulator, did not): nothing the database would refuse goes further.
    customer = request.customer
    PLAN_CODE.check(request.plan_code, field="plan")
    EXTERNAL_ID.check_optional(customer.external_id, field="customer.external_id")
    EMAIL.check_optional(customer.email, field="customer.email")
    CUSTOMER_NAME.check_optional(customer.name, field="customer.name")
    TIMEZONE.check(customer.timezone, field="customer.timezone")
    OUR_ID.check_optional(request.customer_id, field="customer_id")
    validate_quantity(request.quantity)
    PAYMENT_METHOD_ID.check_optional(request.payment_method_id, field="payment_method_id")
    IDEMPOTENCY_KEY.check_optional(request.idempotency_key, field="idempotency_key")
    try:
        resolve_timezone(customer.timezone)
    except InvalidTimezone as unknown:
        # Named where the request has it.
        raise InvalidTimezone(unknown.message, field="customer.timezone") from None
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
    if customer.locale is not None:
        locale = check_locale(customer.locale, field="customer.locale")
        if locale != customer.locale:
            request = replace(request, customer=replace(customer, locale=locale))
    return request


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
    # Derived from the sender's idempotency key when there is one, so concurrent and retried
    # signups with that key claim the same row (and ensure_customer, keyed by our id, the same
    # provider customer). The sender's scope is part of it: another API key's same key is
    # another customer.
    if request.idempotency_key:
        parts = ["customer", request.idempotency_key]
        if request.idempotency_scope:
            parts.insert(1, request.idempotency_scope)
        digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()
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
