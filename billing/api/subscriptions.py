"""Subscriptions: signup (scope ``signup``), changes through the workflow's Updates (scope
``admin``), and the merged live view (scope ``finance`` or ``admin``)."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Annotated, Protocol, TypeVar

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from sqlalchemy.orm import Session
from temporalio.client import (
    Client,
    WorkflowQueryFailedError,
    WorkflowQueryRejectedError,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
    WorkflowUpdateStage,
)
from temporalio.service import RPCError, RPCStatusCode

from billing.api.auth import Caller, require_scope
from billing.api.dependencies import (
    get_clock,
    get_deps,
    get_signups,
    get_temporal,
    require_json_body,
)
from billing.api.errors import ApiError, from_update_failure, temporal_unreachable
from billing.api.schemas import (
    ID_PATTERN,
    AttentionOut,
    CancelIn,
    CancelOut,
    ChangePlanIn,
    ChangePlanOut,
    ChangePreviewOut,
    LineOut,
    OpenInvoiceOut,
    PauseIn,
    PauseOut,
    PaymentMethodIn,
    PaymentMethodOut,
    PendingChangeCancelOut,
    PendingChangeOut,
    PlanChangeOut,
    PriceOut,
    ResumeBillingIn,
    ResumeBillingOut,
    ResumeIn,
    ResumeOut,
    SignupIn,
    SignupOut,
    StatusChangeOut,
    SubscriptionListOut,
    SubscriptionOut,
    SubscriptionSummaryOut,
    error_responses,
    parked_since,
)
from billing.card_data import contains_card_number
from billing.contracts import (
    CancelInput,
    CancelPendingChangeInput,
    CancelPendingChangeResult,
    CancelResult,
    ChangePlanInput,
    ChangePlanResult,
    ChangePreview,
    PauseInput,
    PauseResult,
    PreviewChangeInput,
    ResumeBillingInput,
    ResumeBillingResult,
    ResumeInput,
    ResumeResult,
    SubscriptionMessage,
    SubscriptionView,
    UpdatePaymentMethodInput,
    UpdatePaymentMethodResult,
    workflow_id_for,
)
from billing.errors import ChangeRefused, InvalidInput, NotFound, PlanArchived, UnknownPlan
from billing.finance import SubscriptionInvoicing, amount_display
from billing.plan_change import change_request_digest
from billing.plans import Plan
from billing.records import (
    PlanChangeRequestRecord,
    StatusChangeRecord,
    SubscriptionRecord,
    TermsChangeRecord,
)
from billing.signup import CustomerDetails, SignupRequest, SignupService
from billing.subscription import SubscriptionStatus
from billing.text import IDEMPOTENCY_KEY
from billing.worker import Dependencies
from db.engine import unit_of_work
from db.repositories import finance as finance_repo
from db.repositories import plan_changes as plan_changes_repo
from db.repositories import plans as plans_repo
from db.repositories import subscriptions as subscriptions_repo

logger = logging.getLogger("billing.api")

router = APIRouter(prefix="/v1/subscriptions", tags=["subscriptions"])

#: How long a read waits for the workflow's answer before falling back to the database.
LIVE_QUERY_TIMEOUT = timedelta(seconds=5)
#: How long a change waits for the workflow to apply an accepted Update before answering 504
#: ("accepted, still being applied").
CHANGE_RESULT_TIMEOUT = timedelta(seconds=30)
#: Retry-After of a change refused because its workflow already holds Temporal's most
#: Updates in flight (10): the changes ahead of it are applied one at a time.
CHANGES_BUSY_RETRY_AFTER_S = 5

SubscriptionId = Annotated[
    str,
    Path(
        min_length=1, max_length=40, pattern=ID_PATTERN, description="Subscription id, 'sub_...'."
    ),
]

_R = TypeVar("_R")


class _CheckedInput(Protocol):
    def check(self) -> None: ...


# ---- signup ------------------------------------------------------------------------------------


@router.post(
    "",
    status_code=201,
    dependencies=[require_scope("signup"), Depends(require_json_body)],
    responses={
        200: {"model": SignupOut, "description": "Replayed: same Idempotency-Key and body."},
        202: {
            "model": SignupOut,
            "description": "Recorded (status 'pending'), but the workflow service did not "
            "confirm its start; it is started within minutes. Do not sign up again: a retry "
            "with the same Idempotency-Key shows it.",
        },
        **error_responses(400, 401, 402, 403, 409, 413, 415, 422, 503),
    },
    summary="Start a subscription",
)
async def create_subscription(
    body: SignupIn,
    request: Request,
    response: Response,
    signups: Annotated[SignupService, Depends(get_signups)],
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=200,
            description="Retry-safe signup: the same key and body answer the same subscription.",
        ),
    ] = None,
) -> SignupOut:
    """Validate, attach the card, record the customer and subscription, start its workflow.

    A repeat with the same ``Idempotency-Key`` (from the same API key) and the same body
    answers 200 with header ``Idempotent-Replayed: true`` and the subscription as it is now;
    the same key with a different body is 409. Another signup for the same customer in
    progress for too long is 409 ``signup_in_progress``. A start the workflow service did not
    confirm answers 202 with status ``pending``: the sweeper starts it within minutes.
    """
    if idempotency_key is not None and contains_card_number(idempotency_key):
        # The key is stored with the subscription: no card number may ride in on it.
        raise InvalidInput(
            "header 'Idempotency-Key' looks like a card number; use a key of your own, "
            "such as a UUID",
            field="Idempotency-Key",
        )
    # Stored with the subscription too: the same text rule as every body field.
    IDEMPOTENCY_KEY.check_optional(idempotency_key, field="Idempotency-Key")
    caller: Caller | None = getattr(request.state, "caller", None)
    customer = body.customer
    result = await signups.start_subscription(
        SignupRequest(
            plan_code=body.plan,
            customer=CustomerDetails(
                external_id=customer.external_id,
                email=customer.email,
                name=customer.name,
                timezone=customer.timezone,
                locale=customer.locale,
            ),
            payment_method_id=body.payment_method_id,
            customer_id=body.customer_id,
            # In UTC, so the same instant written with another offset is the same request.
            billing_anchor_at=body.billing_anchor_at.astimezone(UTC)
            if body.billing_anchor_at
            else None,
            trial_days=body.trial_days,
            quantity=body.quantity,
            idempotency_key=idempotency_key,
            # Keys are the sending API key's own, as Stripe's are the account's.
            idempotency_scope=caller.key_id if caller else "",
        )
    )
    if result.created and not result.workflow_started:
        response.status_code = 202
        logger.warning(
            "subscription %s recorded; workflow start unconfirmed", result.subscription_id
        )
    elif not result.created:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    else:
        logger.info("subscription %s started (plan %s)", result.subscription_id, body.plan)
    return SignupOut(
        id=result.subscription_id,
        status=result.status,
        customer_id=result.customer_id,
        # Same key and same body (else IdempotencyConflict), hence the same plan.
        plan=body.plan,
        next_billing_at=result.next_billing_at,
        trial_end_at=result.trial_end_at,
        workflow_id=result.workflow_id,
    )


# ---- changes -----------------------------------------------------------------------------------


def _require(session: Session, subscription_id: str) -> SubscriptionRecord:
    record = subscriptions_repo.get_subscription(session, subscription_id)
    if record is None:
        raise NotFound(f"subscription {subscription_id!r} not found", field="id")
    return record


def _load(deps: Dependencies, subscription_id: str) -> SubscriptionRecord:
    with unit_of_work(deps.session_factory) as session:
        return _require(session, subscription_id)


async def _update(
    request: Request,
    subscription_id: str,
    name: str,
    arg: _CheckedInput,
    result_type: type[_R],
    *,
    update_id: str | None = None,
) -> _R:
    """Run the workflow Update ``name`` and return its result; refusals become domain errors
    carrying the workflow's reason."""
    # The request schemas check each field already; this is the same check the workflow's
    # validator makes, so nothing the workflow would refuse is sent to it.
    arg.check()
    deps, temporal = get_deps(request), get_temporal(request)
    await asyncio.to_thread(_load, deps, subscription_id)  # 404 before asking Temporal
    caller: Caller | None = getattr(request.state, "caller", None)
    # An audit line per change: who asked what of which subscription.
    logger.info(
        "%s requested by API key %r on subscription %s: %s",
        name,
        caller.key_name if caller else None,
        subscription_id,
        arg,
    )
    handle = temporal.get_workflow_handle(workflow_id_for(subscription_id))
    try:
        # Accepted first: the workflow's validator answers at once, and a refusal never
        # enters history. Then the result, which waits for the workflow to apply the change.
        try:
            update = await handle.start_update(
                name,
                arg,
                id=update_id,
                wait_for_stage=WorkflowUpdateStage.ACCEPTED,
                result_type=result_type,
            )
        except WorkflowUpdateRPCTimeoutOrCancelledError:
            raise ApiError(
                504,
                "change_unconfirmed",
                f"the workflow service did not say in time whether subscription "
                f"{subscription_id} accepted the change; check GET "
                f"/v1/subscriptions/{subscription_id} before retrying",
                headers={"Retry-After": "30"},
            ) from None
        try:
            result: _R = await asyncio.wait_for(
                update.result(), timeout=CHANGE_RESULT_TIMEOUT.total_seconds()
            )
        except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError):
            # E.g. the provider is slow to attach a card: its activity keeps retrying and the
            # accepted change will still be applied, so say that rather than hold the request.
            # (wait_for surfaces the poll's own error when it cancels the poll.)
            raise ApiError(
                504,
                "change_pending",
                f"the change was accepted by subscription {subscription_id} but has not "
                f"finished within {CHANGE_RESULT_TIMEOUT.total_seconds():g} s; it will still "
                f"be applied: check GET /v1/subscriptions/{subscription_id} before retrying",
                headers={"Retry-After": "30"},
            ) from None
    except WorkflowUpdateFailedError as failed:
        raise from_update_failure(failed) from None
    except RPCError as error:
        if error.status == RPCStatusCode.RESOURCE_EXHAUSTED:
            # Temporal holds at most 10 Updates in flight per workflow (its client retried
            # for a while before giving up): nothing was accepted, so a retry is safe.
            raise ApiError(
                429,
                "too_many_changes",
                f"subscription {subscription_id} already has as many changes in progress as "
                f"the workflow service holds at once ({error.message}); this one was not "
                "accepted and nothing changed: retry in a few seconds",
                headers={"Retry-After": str(CHANGES_BUSY_RETRY_AFTER_S)},
            ) from None
        if error.status != RPCStatusCode.NOT_FOUND:
            raise  # an unreachable Temporal is answered 503 by the app's handler
        # The workflow is gone (a canceled subscription's workflow has completed) or never
        # started; the database says which.
        record = await asyncio.to_thread(_load, deps, subscription_id)
        if record.status == SubscriptionStatus.CANCELED:
            ended = f" (ended {record.ended_at.isoformat()})" if record.ended_at else ""
            raise ChangeRefused(
                f"subscription {subscription_id} is canceled{ended}; it cannot be changed"
            ) from None
        raise ChangeRefused(
            f"subscription {subscription_id} ({record.status.value}) has no running "
            "workflow; retry the signup with its Idempotency-Key to start it"
        ) from None
    return result


_CHANGE_DEPENDENCIES = [require_scope("admin"), Depends(require_json_body)]
_CHANGE_RESPONSES = error_responses(400, 401, 402, 403, 404, 409, 413, 415, 422, 429, 502, 503, 504)


@router.post(
    "/{id}/cancel",
    summary="Cancel at period end, or now",
    dependencies=_CHANGE_DEPENDENCIES,
    responses=_CHANGE_RESPONSES,
)
async def cancel_subscription(
    id: SubscriptionId,
    request: Request,
    body: CancelIn | None = None,
) -> CancelOut:
    """At period end (default): nothing more is billed and the subscription ends when the paid
    period does. ``at_period_end: false``: it ends now and an open invoice is voided. A
    second cancel is refused (409) with the reason."""
    body = body or CancelIn()
    result = await _update(
        request,
        id,
        SubscriptionMessage.CANCEL,
        CancelInput(at_period_end=body.at_period_end, reason=body.reason or ""),
        CancelResult,
    )
    return CancelOut.of(id, result)


@router.post(
    "/{id}/pause",
    summary="Pause billing",
    dependencies=_CHANGE_DEPENDENCIES,
    responses=_CHANGE_RESPONSES,
)
async def pause_subscription(
    id: SubscriptionId,
    request: Request,
    body: PauseIn | None = None,
) -> PauseOut:
    """No invoices while paused. Refused while an invoice is unpaid or a cancel is pending."""
    reason = body.reason if body else None
    result = await _update(
        request, id, SubscriptionMessage.PAUSE, PauseInput(reason or ""), PauseResult
    )
    return PauseOut.of(id, result)


@router.post(
    "/{id}/resume",
    summary="Resume billing",
    dependencies=_CHANGE_DEPENDENCIES,
    responses=_CHANGE_RESPONSES,
)
async def resume_subscription(
    id: SubscriptionId,
    request: Request,
    body: ResumeIn | None = None,
) -> ResumeOut:
    """Billing restarts on the anchor's next date (the anchor is kept)."""
    reason = body.reason if body else None
    result = await _update(
        request, id, SubscriptionMessage.RESUME, ResumeInput(reason or ""), ResumeResult
    )
    return ResumeOut.of(id, result)


@router.post(
    "/{id}/resume-billing",
    summary="Resume billing after an operator fixed what parked it",
    dependencies=_CHANGE_DEPENDENCIES,
    responses=_CHANGE_RESPONSES,
)
async def resume_billing(
    id: SubscriptionId,
    request: Request,
    body: ResumeBillingIn | None = None,
) -> ResumeBillingOut:
    """For a subscription in ``needs_attention`` (a step failed in a way retrying cannot fix:
    see ``attention`` in GET /v1/subscriptions/{id}). Call it once the cause is fixed: the
    subscription returns to the status it had and the failed step runs again (a payment is
    recorded once, whatever ran before). Any other status is refused (409) with the reason."""
    reason = body.reason if body else None
    result = await _update(
        request,
        id,
        SubscriptionMessage.RESUME_BILLING,
        ResumeBillingInput(reason or ""),
        ResumeBillingResult,
    )
    return ResumeBillingOut.of(id, result)


@router.post(
    "/{id}/payment-method",
    summary="Change the card",
    dependencies=_CHANGE_DEPENDENCIES,
    responses=_CHANGE_RESPONSES,
)
async def update_payment_method(
    id: SubscriptionId,
    body: PaymentMethodIn,
    request: Request,
) -> PaymentMethodOut:
    """Attach the new card and make it the default; an open invoice is retried at once. A card
    the provider refuses is 402 and the subscription keeps its card."""
    result = await _update(
        request,
        id,
        SubscriptionMessage.UPDATE_PAYMENT_METHOD,
        UpdatePaymentMethodInput(payment_method_id=body.payment_method_id),
        UpdatePaymentMethodResult,
    )
    return PaymentMethodOut.of(id, result)


def _catalog_plan(deps: Dependencies, code: str) -> Plan:
    """The plan a change moves to: unknown (422 unknown_plan) and archived (422
    plan_archived) codes are refused here, before the workflow is asked."""
    with unit_of_work(deps.session_factory) as session:
        entry = plans_repo.get_catalog_plan(session, code)
        if entry is None or not entry.active:
            known = ", ".join(p.plan.code for p in plans_repo.list_catalog(session, active=True))
            if entry is None:
                raise UnknownPlan(
                    f"unknown plan {code!r}; known plans: {known or '(none)'}", field="plan"
                )
            raise PlanArchived(
                f"plan {code!r} is archived; choose one of: {known or '(none)'}", field="plan"
            )
    return entry.plan


async def _change_input(request: Request, body: ChangePlanIn) -> ChangePlanInput:
    plan = None
    if body.plan is not None:
        plan = await asyncio.to_thread(_catalog_plan, get_deps(request), body.plan)
    change = ChangePlanInput(
        plan=plan,
        quantity=body.quantity,
        effective=body.effective.value if body.effective else None,
        proration=body.proration.value if body.proration else None,
    )
    change.check()
    return change


@router.post(
    "/{id}/change-plan",
    summary="Change the plan and/or the seats",
    dependencies=_CHANGE_DEPENDENCIES,
    responses=_CHANGE_RESPONSES,
)
async def change_plan(
    id: SubscriptionId,
    body: ChangePlanIn,
    request: Request,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=100,
            description="The same key (from the same API key) answers the first change's "
            "result instead of making another, also 20 at once; another body is 409.",
        ),
    ] = None,
) -> ChangePlanOut:
    """``effective: now`` prorates the rest of the period (``proration``): one credit line for
    the old terms' unused time, one charge line for the new; ``always_invoice`` bills them at
    once (collected like any invoice; an unpaid renewal of the period is voided and billed
    again with them instead of being credited), ``create_prorations`` carries them to the
    next renewal, ``none`` bills nothing until then. ``effective: period_end`` schedules the
    change for the renewal (shown as ``pending_change``; cancel it with POST
    .../pending-change/cancel). An interval change now starts a new period. Defaults: an
    upgrade now with always_invoice, a downgrade at the period end. Refused (409/422) with the
    reason, writing nothing: an unknown or archived plan, another currency, a canceled
    subscription, a change already pending."""
    _check_stored_key(idempotency_key)
    change = await _change_input(request, body)
    if idempotency_key is None:
        result = await _update(
            request, id, SubscriptionMessage.CHANGE_PLAN, change, ChangePlanResult
        )
        return ChangePlanOut.of(id, result)
    deps = get_deps(request)
    caller: Caller | None = getattr(request.state, "caller", None)
    # Claimed in the database before the workflow is asked: the key is the sending API key's
    # own, one request's (another body is 409), and names one Update id, so a repeat (twenty
    # at once, or after the workflow continued as new) asks for the same change.
    claimed, first = await asyncio.to_thread(
        _claim_change,
        deps,
        id,
        caller.key_id if caller else "",
        idempotency_key,
        change_request_digest(
            id,
            plan_code=body.plan,
            quantity=body.quantity,
            effective=body.effective.value if body.effective else None,
            proration=body.proration.value if body.proration else None,
        ),
        get_clock(request).now(),
    )
    if not first:
        response.headers["Idempotent-Replayed"] = "true"
    if claimed.result is not None:
        return ChangePlanOut.model_validate(claimed.result)
    # A repeat whose first request has not answered yet asks for the same Update: Temporal
    # attaches it to the first (same run), or the workflow answers its recorded result.
    result = await _update(
        request,
        id,
        SubscriptionMessage.CHANGE_PLAN,
        change,
        ChangePlanResult,
        update_id=claimed.change_id,
    )
    answer = ChangePlanOut.of(id, result)
    kept = await asyncio.to_thread(
        _keep_change_answer, deps, claimed.change_id, answer, get_clock(request).now()
    )
    return answer if kept is None else kept


def _check_stored_key(idempotency_key: str | None) -> None:
    """An Idempotency-Key that is stored: the text rule of every field, and no card number."""
    if idempotency_key is not None and contains_card_number(idempotency_key):
        raise InvalidInput(
            "header 'Idempotency-Key' looks like a card number; use a key of your own, "
            "such as a UUID",
            field="Idempotency-Key",
        )
    IDEMPOTENCY_KEY.check_optional(idempotency_key, field="Idempotency-Key")


def _claim_change(
    deps: Dependencies,
    subscription_id: str,
    key_scope: str,
    idempotency_key: str,
    request_hash: str,
    at: datetime,
) -> tuple[PlanChangeRequestRecord, bool]:
    with unit_of_work(deps.session_factory) as session:
        _require(session, subscription_id)  # 404 before anything is written
        return plan_changes_repo.claim(
            session,
            subscription_id=subscription_id,
            key_scope=key_scope,
            idempotency_key=idempotency_key,
            request_hash=request_hash,
            at=at,
        )


def _keep_change_answer(
    deps: Dependencies, change_id: str, answer: ChangePlanOut, at: datetime
) -> ChangePlanOut | None:
    """Store the first answer; return the one stored (a racing repeat may have stored it)."""
    with unit_of_work(deps.session_factory) as session:
        kept = plan_changes_repo.record_result(
            session, change_id, answer.model_dump(mode="json"), at
        )
    if kept is None or kept.result is None:
        return None
    return ChangePlanOut.model_validate(kept.result)


@router.post(
    "/{id}/change-plan/preview",
    summary="What a plan change would bill now",
    dependencies=_CHANGE_DEPENDENCIES,
    responses=_CHANGE_RESPONSES,
)
async def preview_change_plan(
    id: SubscriptionId,
    body: ChangePlanIn,
    request: Request,
    temporal: Annotated[Client, Depends(get_temporal)],
) -> ChangePreviewOut:
    """Exactly the lines ``change-plan`` would produce now, from the same decision the
    workflow takes; nothing is written. A change that would be refused is refused the same
    way (409/422)."""
    change = await _change_input(request, body)
    deps = get_deps(request)
    await asyncio.to_thread(_load, deps, id)
    handle = temporal.get_workflow_handle(workflow_id_for(id))
    try:
        preview: ChangePreview = await handle.query(
            SubscriptionMessage.PREVIEW_CHANGE,
            PreviewChangeInput(change=change, at=get_clock(request).now()),
            result_type=ChangePreview,
            rpc_timeout=LIVE_QUERY_TIMEOUT,
        )
    except RPCError as error:
        if error.status != RPCStatusCode.NOT_FOUND:
            raise
        raise ChangeRefused(
            f"subscription {id} has no running workflow; it cannot change"
        ) from None
    if preview.refused is not None:
        if preview.error_type == ChangeRefused.code:
            raise ChangeRefused(preview.refused)
        raise InvalidInput(preview.refused)
    return ChangePreviewOut.of(id, preview)


@router.post(
    "/{id}/pending-change/cancel",
    summary="Cancel a change scheduled for the period end",
    dependencies=[require_scope("admin")],
    responses=_CHANGE_RESPONSES,
)
async def cancel_pending_change(id: SubscriptionId, request: Request) -> PendingChangeCancelOut:
    """409 when no change is pending."""
    result = await _update(
        request,
        id,
        SubscriptionMessage.CANCEL_PENDING_CHANGE,
        CancelPendingChangeInput(),
        CancelPendingChangeResult,
    )
    return PendingChangeCancelOut(
        id=id, change_id=result.change_id, plan=result.plan_code, quantity=result.quantity
    )


# ---- read --------------------------------------------------------------------------------------

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200


def _refuse_unknown_params(request: Request, allowed: frozenset[str]) -> None:
    """A misspelt filter (``state=needs_attention``) would otherwise list everything, and a
    repeated one keep whichever value a proxy keeps."""
    for name in sorted(set(request.query_params)):
        if name not in allowed:
            raise ApiError(
                422,
                "invalid_input",
                f"unknown query parameter {name!r}; known: {', '.join(sorted(allowed))}",
                field=name,
            )
        given = len(request.query_params.getlist(name))
        if given > 1:
            raise ApiError(
                422,
                "invalid_input",
                f"query parameter {name!r} was given {given} times; give it once",
                field=name,
            )


@router.get(
    "",
    dependencies=[require_scope("finance", "admin")],
    responses=error_responses(401, 403, 422, 503),
    summary="List subscriptions (e.g. those that need attention)",
)
async def list_subscriptions(
    request: Request,
    deps: Annotated[Dependencies, Depends(get_deps)],
    status: Annotated[
        SubscriptionStatus | None,
        Query(description="Only this status, e.g. needs_attention (what an operator resumes)."),
    ] = None,
    customer_id: Annotated[
        str | None,
        Query(min_length=1, max_length=40, pattern=ID_PATTERN, description="Only this customer's."),
    ] = None,
    plan: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=63,
            pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$",
            description="Only those on this plan code.",
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = DEFAULT_PAGE_SIZE,
    cursor: Annotated[
        str | None,
        Query(max_length=40, pattern=ID_PATTERN, description="next_cursor of the previous page."),
    ] = None,
) -> SubscriptionListOut:
    """Subscriptions from the database, by id, with the attention (step, reason, since) of
    each one parked in needs_attention. Filters combine (all must hold)."""
    _refuse_unknown_params(request, frozenset({"status", "customer_id", "plan", "limit", "cursor"}))

    def read() -> SubscriptionListOut:
        with unit_of_work(deps.session_factory) as session:
            # One more than asked: whether a next page exists, without a count.
            records = subscriptions_repo.list_subscriptions(
                session,
                status=status,
                limit=limit + 1,
                after_id=cursor,
                customer_id=customer_id,
                plan_code=plan,
            )
            page = records[:limit]
            parked = subscriptions_repo.parked_at(
                session,
                [r.id for r in page if r.status == SubscriptionStatus.NEEDS_ATTENTION],
            )
        return SubscriptionListOut(
            items=[SubscriptionSummaryOut.of(r, parked.get(r.id)) for r in page],
            next_cursor=page[-1].id if len(records) > limit else None,
        )

    return await asyncio.to_thread(read)


@router.get(
    "/{id}",
    dependencies=[require_scope("finance", "admin")],
    responses=error_responses(401, 403, 404, 422, 503),
    summary="A subscription, live",
)
async def get_subscription(
    id: SubscriptionId,
    request: Request,
    deps: Annotated[Dependencies, Depends(get_deps)],
    temporal: Annotated[Client, Depends(get_temporal)],
) -> SubscriptionOut:
    """The database record merged with the workflow's live state (``live: true``). If the
    workflow cannot be asked, the database's copy (``live: false``)."""
    record, history, plans = await asyncio.to_thread(_load_with_history, deps, id)
    view = await _live_view(temporal, id)
    if view is not None:
        answer = _merged(record, view)
    else:
        invoicing = await asyncio.to_thread(_invoicing, deps, id)
        answer = _from_database(record, invoicing)
        answer.attention = AttentionOut.of_record(record, parked_since(history))
    answer.status_history = [StatusChangeOut.of(change) for change in history]
    answer.plan_history = [PlanChangeOut.of(change) for change in plans]
    return answer


def _load_with_history(
    deps: Dependencies, subscription_id: str
) -> tuple[SubscriptionRecord, list[StatusChangeRecord], list[TermsChangeRecord]]:
    """The record, its status log and its plan log, in one transaction."""
    with unit_of_work(deps.session_factory) as session:
        record = _require(session, subscription_id)
        return (
            record,
            subscriptions_repo.list_status_changes(session, subscription_id),
            subscriptions_repo.list_terms_changes(session, subscription_id),
        )


async def _live_view(temporal: Client, subscription_id: str) -> SubscriptionView | None:
    handle = temporal.get_workflow_handle(workflow_id_for(subscription_id))
    try:
        view: SubscriptionView = await handle.query(
            SubscriptionMessage.GET_STATE,
            result_type=SubscriptionView,
            rpc_timeout=LIVE_QUERY_TIMEOUT,
        )
    except (
        RPCError,
        WorkflowQueryFailedError,
        WorkflowQueryRejectedError,
        TimeoutError,
        RuntimeError,
    ) as error:
        if isinstance(error, RuntimeError) and not temporal_unreachable(error):
            raise
        logger.warning(
            "live state of subscription %s unavailable, answering from the database: %s",
            subscription_id,
            error,
        )
        return None
    return view


def _invoicing(deps: Dependencies, subscription_id: str) -> SubscriptionInvoicing:
    with unit_of_work(deps.session_factory) as session:
        return finance_repo.subscription_invoicing(session, subscription_id)


def _price(amount_minor: int, currency: str, interval: str, interval_count: int) -> PriceOut:
    return PriceOut(
        amount_minor=amount_minor,
        currency=currency,
        amount_display=amount_display(amount_minor, currency),
        interval=interval,
        interval_count=interval_count,
    )


def _merged(record: SubscriptionRecord, view: SubscriptionView) -> SubscriptionOut:
    return SubscriptionOut(
        id=record.id,
        customer_id=record.customer_id,
        status=view.status,
        plan=view.plan_code,
        price=_price(view.amount_minor, view.currency, view.interval, view.interval_count),
        timezone=view.timezone,
        anchor_at=view.anchor_at,
        trial_end_at=view.trial_end_at,
        current_period_start=view.current_period_start,
        current_period_end=view.current_period_end,
        next_billing_at=view.next_billing_at,
        cancel_at_period_end=view.cancel_at_period_end,
        cancel_reason=record.cancel_reason,
        canceled_at=view.canceled_at,
        ended_at=view.ended_at,
        paused_at=view.paused_at,
        open_invoice=OpenInvoiceOut.of_view(view.open_invoice) if view.open_invoice else None,
        attention=AttentionOut.of_view(view),
        invoices_issued=view.invoices_issued,
        workflow_id=record.workflow_id,
        created_at=record.created_at,
        live=True,
        quantity=view.quantity,
        pending_change=None
        if view.pending_change is None
        else PendingChangeOut(
            change_id=view.pending_change.change_id,
            plan=view.pending_change.plan_code,
            quantity=view.pending_change.quantity,
            effective_at=view.pending_change.effective_at,
            requested_at=view.pending_change.requested_at,
        ),
        pending_lines=[LineOut.of(line) for line in view.pending_lines],
    )


def _from_database(record: SubscriptionRecord, invoicing: SubscriptionInvoicing) -> SubscriptionOut:
    open_invoice = invoicing.open_invoice
    return SubscriptionOut(
        id=record.id,
        customer_id=record.customer_id,
        status=record.status,
        plan=record.plan_code,
        price=_price(
            record.amount_minor, record.currency, record.interval.value, record.interval_count
        ),
        timezone=record.timezone,
        anchor_at=record.anchor_at,
        trial_end_at=record.trial_end_at,
        current_period_start=record.current_period_start,
        current_period_end=record.current_period_end,
        next_billing_at=record.next_billing_at,
        cancel_at_period_end=record.cancel_at_period_end,
        cancel_reason=record.cancel_reason,
        canceled_at=record.canceled_at,
        ended_at=record.ended_at,
        paused_at=record.paused_at,
        open_invoice=OpenInvoiceOut.of_record(open_invoice, invoicing.open_invoice_attempts)
        if open_invoice
        else None,
        invoices_issued=invoicing.invoices_issued,
        workflow_id=record.workflow_id,
        created_at=record.created_at,
        live=False,
        quantity=record.quantity,
    )
