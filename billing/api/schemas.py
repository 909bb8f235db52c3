"""Request and response bodies. Requests forbid unknown fields; amounts are integer minor units
next to their ISO 4217 currency (never in a signup body: prices come from the plan); instants
are ISO 8601 with a zone on the way in and UTC (``Z``) on the way out."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StrictBool,
    StrictInt,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from billing.calendar import IntervalUnit
from billing.card_data import contains_card_number
from billing.contracts import (
    CancelResult,
    ChangePlanResult,
    ChangePreview,
    OpenInvoiceView,
    PauseResult,
    ResumeBillingResult,
    ResumeResult,
    SubscriptionView,
    UpdatePaymentMethodResult,
)
from billing.credit_notes import CreditNoteReason, RefundReason, RefundSource, RefundStatus
from billing.disputes import DisputeStatus
from billing.dunning import FinalAction
from billing.errors import InvalidInput
from billing.finance import (
    InvoiceDetail,
    InvoiceListItem,
    InvoicePage,
    amount_display,
    format_instant,
)
from billing.invoices import InvoiceStatus
from billing.ledger import Finding, PayoutReconciliation
from billing.locales import check_locale
from billing.money import MAX_AMOUNT_MINOR
from billing.plans import MAX_QUANTITY, MAX_TRIAL_DAYS
from billing.proration import ProrationLine
from billing.records import (
    AttemptStatus,
    CatalogPlan,
    CreditNoteLineRecord,
    CreditNoteRecord,
    CustomerRecord,
    DisputeRecord,
    InvoiceLineRecord,
    InvoiceRecord,
    PaymentAttemptRecord,
    PaymentRecord,
    PayoutRecord,
    RefundRecord,
    StatusChangeRecord,
    SubscriptionRecord,
    TermsChangeRecord,
)
from billing.subscription import ChangeEffective, ProrationBehavior, SubscriptionStatus
from billing.text import (
    CUSTOMER_NAME,
    EMAIL,
    EXTERNAL_ID,
    LOCALE,
    OUR_ID,
    PAYMENT_METHOD_ID,
    PLAN_CODE,
    PLAN_NAME,
    REASON,
    RESOLUTION_NOTE,
    TIMEZONE,
    TextRule,
    text_problem,
)


def _iso_text(value: Any) -> Any:
    # pydantic would also take a number as Unix seconds; an instant must be ISO 8601 text.
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str):
        raise PydanticCustomError(
            "instant_type",
            "must be an ISO 8601 instant with a time zone such as '2025-01-31T09:00:00Z'",
        )
    return value


#: An instant in a request: ISO 8601 text with a zone; naive values are refused.
InstantIn = Annotated[AwareDatetime, BeforeValidator(_iso_text)]
#: An instant in a response: always UTC, ``Z``.
Instant = Annotated[datetime, PlainSerializer(format_instant, return_type=str, when_used="json")]

_FORBID = ConfigDict(extra="forbid")


def _checked_by(rule: TextRule) -> Any:
    def check(value: str) -> str:
        problem = text_problem(value, max_length=rule.max_length, multiline=rule.multiline)
        if problem is not None:
            # Reported as "field '<path>' <problem>" (billing.api.errors), without the value.
            raise PydanticCustomError("text", "{problem}", {"problem": problem})
        return value

    return AfterValidator(check)


#: What billing.text refuses, as a JSON Schema pattern in the OpenAPI document, so clients
#: (and the schema fuzzer) know it. Documentation only: billing.text does the check.
_ONE_LINE_PATTERN = r"^[^\u0000-\u001f\u007f]*$"
_MULTILINE_PATTERN = r"^[^\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f]*$"


def _bounded(rule: TextRule, *, min_length: int | None = None) -> Any:
    """The length bound (and the documented pattern) of a text field under ``rule``."""
    pattern = _MULTILINE_PATTERN if rule.multiline else _ONE_LINE_PATTERN
    return Field(
        min_length=min_length, max_length=rule.max_length, json_schema_extra={"pattern": pattern}
    )


# A request's text fields, each under its billing.text rule (no NUL or other control
# characters, no lone surrogates, no card numbers, the column's length): refused with 422
# naming the field.
PlanCodeIn = Annotated[str, _bounded(PLAN_CODE, min_length=1), _checked_by(PLAN_CODE)]
ExternalIdIn = Annotated[str, _bounded(EXTERNAL_ID, min_length=1), _checked_by(EXTERNAL_ID)]
CustomerNameIn = Annotated[str, _bounded(CUSTOMER_NAME, min_length=1), _checked_by(CUSTOMER_NAME)]
EmailIn = Annotated[str, _bounded(EMAIL), _checked_by(EMAIL)]
TimezoneIn = Annotated[str, _bounded(TIMEZONE, min_length=1), _checked_by(TIMEZONE)]


def _known_locale(value: str) -> str:
    try:
        return check_locale(value, field="locale")
    except InvalidInput as error:
        # Reported as "field 'customer.locale' ..." (billing.api.errors), as a text problem:
        # the message already shows the value where it is safe to.
        raise PydanticCustomError(
            "text", "{problem}", {"problem": error.message.removeprefix("locale ")}
        ) from None


#: A BCP 47 locale CLDR has data for (``billing.locales``), as its canonical tag. The
#: document states the tag's shape; which tags CLDR knows is the check's (babel's data).
LocaleIn = Annotated[
    str,
    Field(
        min_length=2,
        max_length=LOCALE.max_length,
        json_schema_extra={"pattern": r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*$"},
    ),
    _checked_by(LOCALE),
    AfterValidator(_known_locale),
]
OurIdIn = Annotated[str, _bounded(OUR_ID, min_length=1), _checked_by(OUR_ID)]
PaymentMethodIdIn = Annotated[
    str, _bounded(PAYMENT_METHOD_ID, min_length=1), _checked_by(PAYMENT_METHOD_ID)
]
ReasonIn = Annotated[str, _bounded(REASON), _checked_by(REASON)]
ResolutionNoteIn = Annotated[
    str, _bounded(RESOLUTION_NOTE, min_length=1), _checked_by(RESOLUTION_NOTE)
]


def _card_data_path(value: Any, path: str = "") -> str | None:
    """The path of the first key or string value in ``value`` that looks like a card
    number (or a card field name), or None."""
    if isinstance(value, dict):
        for key, inner in value.items():
            where = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and (
                contains_card_number(key) or key.lower() in CARD_FIELD_NAMES
            ):
                return where
            found = _card_data_path(inner, where)
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            found = _card_data_path(inner, f"{path}[{index}]")
            if found is not None:
                return found
    elif (
        isinstance(value, str | int)
        and not isinstance(value, bool)
        and contains_card_number(str(value))
    ):
        return path or "(body)"
    return None


#: Field names that only card details go by; never ours.
CARD_FIELD_NAMES = frozenset(
    {"card", "card_number", "cardnumber", "number", "pan", "cvc", "cvv", "cvc2", "exp_month"}
)


class RequestIn(BaseModel):
    """A request body: unknown fields are refused, and so is anything that looks like card
    details, before any field is read, without echoing the value. Cards reach us only as
    the provider's payment method ids (``pm_...``, from Stripe.js or Checkout)."""

    model_config = _FORBID

    @model_validator(mode="before")
    @classmethod
    def _refuse_card_data(cls, data: Any) -> Any:
        path = _card_data_path(data)
        if path is not None:
            raise PydanticCustomError(
                "card_data",
                "field '{path}' looks like card details (a card number or card field); "
                "send a payment method id ('pm_...') from Stripe.js or Checkout instead: "
                "card details must never reach this API",
                {"path": path},
            )
        return data


_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")


#: What our ids look like (``sub_01j...``, ``in_...``): checked on the way in, so nothing else
#: reaches a query.
ID_PATTERN = r"^[A-Za-z0-9_-]{1,40}$"
CURRENCY_PATTERN = r"^[A-Za-z]{3}$"

#: What a value refused by one of these patterns should have looked like.
PATTERN_HELP: dict[str, str] = {
    ID_PATTERN: "must be an id of 1 to 40 letters, digits, '_' or '-', such as "
    "'sub_01jd8x2k3m4n5p6q7r8s9t0vwx'",
    CURRENCY_PATTERN: "must be a 3-letter ISO 4217 code such as 'USD'",
}


class ErrorDetail(BaseModel):
    type: str = Field(description="Stable machine-readable code, e.g. 'change_refused'.")
    message: str = Field(description="What was wrong and what to do.")
    field: str | None = Field(None, description="The request field at fault, if one is.")


class ErrorOut(BaseModel):
    error: ErrorDetail


#: Why each error status is answered; every one has the ErrorOut shape.
ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "Malformed request: JSON that does not parse, or a bad Content-Length.",
    401: "Missing or unknown API key.",
    402: "The payment provider refused the card.",
    403: "The API key lacks the scope this endpoint needs.",
    404: "No such resource.",
    409: "Refused by the subscription's current state, or an Idempotency-Key reused with "
    "another body.",
    413: "Request body over the size limit.",
    415: "The body is not application/json.",
    422: "A field or parameter is invalid; the message names it and says what was wrong.",
    429: "Too many changes of this subscription in progress at once; nothing was changed: "
    "retry after the Retry-After header's seconds.",
    500: "Internal error; the message carries a reference to quote.",
    502: "The payment provider failed; retry later.",
    503: "A dependency (database, Temporal, payment provider) did not answer; retry.",
    504: "A change was accepted but not finished in time (it will still be applied), or "
    "Temporal did not say in time whether it was accepted: check the subscription first.",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for error statuses (plus 500, which any route may answer)."""
    return {
        code: {"model": ErrorOut, "description": ERROR_DESCRIPTIONS[code]}
        for code in sorted({*codes, 500})
    }


# ---- signup ------------------------------------------------------------------------------------


class CustomerIn(RequestIn):
    external_id: ExternalIdIn | None = Field(
        None, description="Your own reference for the customer."
    )
    email: EmailIn | None = None
    name: CustomerNameIn | None = None
    timezone: TimezoneIn = Field(
        "UTC",
        description="IANA zone in which billing dates are computed, e.g. 'Europe/Paris'.",
    )
    locale: LocaleIn | None = Field(
        None,
        description="BCP 47 locale CLDR knows, e.g. 'de-CH', for the customer's mails and "
        "invoice documents (amounts, dates, words); default: English mails and the seller's "
        "invoice locale. Given for an existing customer, it replaces theirs.",
    )

    @field_validator("email")
    @classmethod
    def _email(cls, value: str | None) -> str | None:
        # A shape check only: the address is the business's to verify, not ours.
        if value is not None and not _EMAIL.fullmatch(value):
            raise PydanticCustomError("email", "must be an email address such as 'pat@example.com'")
        return value


class SignupIn(RequestIn):
    plan: PlanCodeIn = Field(description="Plan code, e.g. 'basic-monthly'.")
    customer: CustomerIn = Field(default_factory=CustomerIn)
    customer_id: OurIdIn | None = Field(None, description="One of our existing customers.")
    payment_method_id: PaymentMethodIdIn | None = Field(
        None, description="A provider payment method, 'pm_...'."
    )
    billing_anchor_at: InstantIn | None = Field(
        None, description="First billing date; default: the trial's end, or now."
    )
    trial_days: StrictInt | None = Field(None, ge=0, le=MAX_TRIAL_DAYS)
    quantity: StrictInt = Field(
        1, ge=1, le=MAX_QUANTITY, description="Seats: each period bills quantity x the price."
    )


class SignupOut(BaseModel):
    id: str
    status: SubscriptionStatus
    customer_id: str
    plan: str
    next_billing_at: Instant | None
    trial_end_at: Instant | None
    workflow_id: str


# ---- changes -----------------------------------------------------------------------------------


class CancelIn(RequestIn):
    at_period_end: StrictBool = Field(
        True, description="True: end when the paid period does. False: end now."
    )
    reason: ReasonIn | None = None


class PauseIn(RequestIn):
    reason: ReasonIn | None = None


class ResumeIn(RequestIn):
    reason: ReasonIn | None = None


class ResumeBillingIn(RequestIn):
    reason: str | None = Field(
        None,
        max_length=500,
        description="What the operator fixed, for the audit log (e.g. 'amount corrected at "
        "the provider, ticket OPS-12').",
    )


class PaymentMethodIn(RequestIn):
    payment_method_id: PaymentMethodIdIn


class CancelOut(BaseModel):
    subscription_id: str
    status: SubscriptionStatus
    cancel_at_period_end: bool
    ends_at: Instant | None
    voided_invoice_id: str | None

    @classmethod
    def of(cls, subscription_id: str, result: CancelResult) -> CancelOut:
        return cls(
            subscription_id=subscription_id,
            status=result.status,
            cancel_at_period_end=result.cancel_at_period_end,
            ends_at=result.ends_at,
            voided_invoice_id=result.voided_invoice_id,
        )


class PauseOut(BaseModel):
    subscription_id: str
    status: SubscriptionStatus
    paused_at: Instant

    @classmethod
    def of(cls, subscription_id: str, result: PauseResult) -> PauseOut:
        return cls(
            subscription_id=subscription_id, status=result.status, paused_at=result.paused_at
        )


class ResumeOut(BaseModel):
    subscription_id: str
    status: SubscriptionStatus
    next_billing_at: Instant | None

    @classmethod
    def of(cls, subscription_id: str, result: ResumeResult) -> ResumeOut:
        return cls(
            subscription_id=subscription_id,
            status=result.status,
            next_billing_at=result.next_billing_at,
        )


class ResumeBillingOut(BaseModel):
    subscription_id: str
    status: SubscriptionStatus = Field(description="The status it had before it was parked.")
    resumed_step: str = Field(description="The step that had failed; it runs again now.")

    @classmethod
    def of(cls, subscription_id: str, result: ResumeBillingResult) -> ResumeBillingOut:
        return cls(
            subscription_id=subscription_id,
            status=result.status,
            resumed_step=result.resumed_step,
        )


class PaymentMethodOut(BaseModel):
    subscription_id: str
    payment_method_id: str
    status: SubscriptionStatus
    retry_scheduled: bool = Field(description="An open invoice is retried at once.")
    card_brand: str | None
    card_last4: str | None

    @classmethod
    def of(cls, subscription_id: str, result: UpdatePaymentMethodResult) -> PaymentMethodOut:
        return cls(
            subscription_id=subscription_id,
            payment_method_id=result.payment_method_id,
            status=result.status,
            retry_scheduled=result.retry_scheduled,
            card_brand=result.card_brand,
            card_last4=result.card_last4,
        )


# ---- subscription read -------------------------------------------------------------------------


class PriceOut(BaseModel):
    amount_minor: int
    currency: str
    amount_display: str | None
    interval: str
    interval_count: int


class OpenInvoiceOut(BaseModel):
    id: str
    number: str
    amount_minor: int
    currency: str
    period_start: Instant
    period_end: Instant
    attempts: int = Field(description="Charge attempts made so far (the dunning attempt count).")
    first_failure_at: Instant | None = None
    next_retry_at: Instant | None = Field(None, description="Only known from the live workflow.")
    blocked: str | None = Field(None, description="hard_decline or authentication_required.")
    last_decline_code: str | None = None

    @classmethod
    def of_view(cls, view: OpenInvoiceView) -> OpenInvoiceOut:
        return cls(
            id=view.invoice_id,
            number=view.number,
            amount_minor=view.amount_minor,
            currency=view.currency,
            period_start=view.period_start,
            period_end=view.period_end,
            attempts=view.attempts,
            first_failure_at=view.first_failure_at,
            next_retry_at=view.next_retry_at,
            blocked=view.blocked,
            last_decline_code=view.last_decline_code,
        )

    @classmethod
    def of_record(cls, invoice: InvoiceRecord, attempts: int) -> OpenInvoiceOut:
        return cls(
            id=invoice.id,
            number=invoice.number,
            amount_minor=invoice.amount_due_minor,
            currency=invoice.currency,
            period_start=invoice.period_start,
            period_end=invoice.period_end,
            attempts=attempts,
        )


class StatusChangeOut(BaseModel):
    from_status: SubscriptionStatus
    to_status: SubscriptionStatus
    changed_at: Instant = Field(description="When the subscription's workflow decided it.")
    reason: str | None = Field(description="Why, when known (the reason of a cancellation).")

    @classmethod
    def of(cls, change: StatusChangeRecord) -> StatusChangeOut:
        return cls(
            from_status=change.from_status,
            to_status=change.to_status,
            changed_at=change.changed_at,
            reason=change.reason,
        )


class PlanChangeOut(BaseModel):
    """A plan or seat change of the subscription's billing terms (issue 12), as logged when it
    took effect: what MRR's expansion and contraction are computed from."""

    changed_at: Instant = Field(description="When the change took effect (the workflow's sync).")
    from_plan: str
    to_plan: str
    from_amount_minor: int = Field(description="Unit price before, minor units.")
    to_amount_minor: int = Field(description="Unit price after, minor units.")
    from_quantity: int
    to_quantity: int
    from_interval: str
    to_interval: str
    from_interval_count: int
    to_interval_count: int
    from_mrr_minor: int = Field(description="Monthly recurring amount before (price x seats).")
    to_mrr_minor: int = Field(description="Monthly recurring amount after.")

    @classmethod
    def of(cls, change: TermsChangeRecord) -> PlanChangeOut:
        return cls(
            changed_at=change.changed_at,
            from_plan=change.from_plan_code,
            to_plan=change.to_plan_code,
            from_amount_minor=change.from_amount_minor,
            to_amount_minor=change.to_amount_minor,
            from_quantity=change.from_quantity,
            to_quantity=change.to_quantity,
            from_interval=change.from_interval.value,
            to_interval=change.to_interval.value,
            from_interval_count=change.from_interval_count,
            to_interval_count=change.to_interval_count,
            from_mrr_minor=change.from_monthly_minor,
            to_mrr_minor=change.to_monthly_minor,
        )


class AttentionOut(BaseModel):
    """Why a subscription is parked (status ``needs_attention``): billing waits until an
    operator has fixed the cause and calls ``POST /v1/subscriptions/{id}/resume-billing``."""

    step: str | None = Field(
        description="The step that failed, e.g. 'charge invoice INV-0001-0003' (None when "
        "only the database's copy is known and it does not name the step)."
    )
    reason: str = Field(description="What failed, as the provider or database reported it.")
    since: Instant | None = Field(description="When the subscription was parked.")

    @classmethod
    def of_view(cls, view: SubscriptionView) -> AttentionOut | None:
        """From the workflow's live state."""
        if view.status != SubscriptionStatus.NEEDS_ATTENTION or view.attention_reason is None:
            return None
        return cls(
            step=view.attention_step, reason=view.attention_reason, since=view.attention_since
        )

    @classmethod
    def of_record(cls, record: SubscriptionRecord, since: datetime | None) -> AttentionOut | None:
        """From the database: the workflow writes ``attention_reason`` as "STEP: REASON";
        ``since`` is when the status log saw it move to needs_attention."""
        if record.status != SubscriptionStatus.NEEDS_ATTENTION:
            return None
        text = record.attention_reason or "unknown (the workflow did not record a reason)"
        step: str | None = None
        # Steps are plain words and an invoice number ("charge invoice INV-..."); no colon.
        head, colon, tail = text.partition(": ")
        if colon and head and ":" not in head:
            step, text = head, tail
        return cls(step=step, reason=text, since=since)


def parked_since(history: Sequence[StatusChangeRecord]) -> datetime | None:
    """When the status log last saw the subscription move to needs_attention."""
    parked = [c for c in history if c.to_status == SubscriptionStatus.NEEDS_ATTENTION]
    return parked[-1].changed_at if parked else None


class PendingChangeOut(BaseModel):
    change_id: str
    plan: str
    quantity: int
    effective_at: Instant | None
    requested_at: Instant


class SubscriptionOut(BaseModel):
    id: str
    customer_id: str
    status: SubscriptionStatus
    plan: str
    price: PriceOut
    timezone: str
    anchor_at: Instant
    trial_end_at: Instant | None
    current_period_start: Instant | None
    current_period_end: Instant | None
    next_billing_at: Instant | None
    cancel_at_period_end: bool
    cancel_reason: str | None
    canceled_at: Instant | None
    ended_at: Instant | None
    paused_at: Instant | None
    open_invoice: OpenInvoiceOut | None
    attention: AttentionOut | None = Field(
        None,
        description="Set while status is needs_attention: the step that failed, why, and "
        "since when. Billing waits for POST .../resume-billing; changes are still accepted.",
    )
    invoices_issued: int
    workflow_id: str
    created_at: Instant
    quantity: int = Field(1, description="Seats; each period bills quantity x the unit price.")
    pending_change: PendingChangeOut | None = Field(
        None, description="A change scheduled for the next renewal (live reads only)."
    )
    pending_lines: list[LineOut] = Field(
        default_factory=list,
        description="Proration lines carried to the next renewal invoice (live reads only).",
    )
    live: bool = Field(
        description="True: from the running workflow. False: the workflow could not be asked "
        "(closed long ago, or Temporal unreachable), so this is the database's copy."
    )
    status_history: list[StatusChangeOut] = Field(
        default_factory=list,
        description="Every status change, oldest first, from the database's status log "
        "(the live status may be one step ahead of it for a moment).",
    )
    plan_history: list[PlanChangeOut] = Field(
        default_factory=list,
        description="Every plan or seat change that took effect, oldest first (changes "
        "before this log existed, migration 0024, are not in it).",
    )


class SubscriptionSummaryOut(BaseModel):
    """A subscription as the database mirrors it (the live state is one GET away)."""

    id: str
    customer_id: str
    status: SubscriptionStatus
    plan: str
    quantity: int = Field(1, description="Seats; each period bills quantity x the unit price.")
    price: PriceOut | None = None
    next_billing_at: Instant | None
    cancel_at_period_end: bool
    attention: AttentionOut | None = Field(
        None, description="Set while status is needs_attention: what failed, why, since when."
    )
    updated_at: Instant

    @classmethod
    def of(cls, record: SubscriptionRecord, parked_at: datetime | None) -> SubscriptionSummaryOut:
        return cls(
            id=record.id,
            customer_id=record.customer_id,
            status=record.status,
            plan=record.plan_code,
            quantity=record.quantity,
            price=PriceOut(
                amount_minor=record.amount_minor,
                currency=record.currency,
                amount_display=amount_display(record.amount_minor, record.currency),
                interval=record.interval.value,
                interval_count=record.interval_count,
            ),
            next_billing_at=record.next_billing_at,
            cancel_at_period_end=record.cancel_at_period_end,
            attention=AttentionOut.of_record(record, parked_at),
            updated_at=record.updated_at,
        )


class SubscriptionListOut(BaseModel):
    items: list[SubscriptionSummaryOut]
    next_cursor: str | None = Field(
        description="Pass as ``cursor`` for the next page; null on the last page."
    )


# ---- invoices ----------------------------------------------------------------------------------


class PaymentOut(BaseModel):
    id: str
    attempt_id: str
    stripe_payment_intent_id: str
    stripe_charge_id: str | None
    balance_transaction_id: str | None
    amount_minor: int
    currency: str
    fee_minor: int | None = Field(description="In settlement_currency.")
    net_minor: int | None = Field(description="In settlement_currency.")
    settlement_amount_minor: int | None
    settlement_currency: str | None
    settled_at: Instant

    @classmethod
    def of(cls, p: PaymentRecord) -> PaymentOut:
        return cls(
            id=p.id,
            attempt_id=p.attempt_id,
            stripe_payment_intent_id=p.stripe_payment_intent_id,
            stripe_charge_id=p.stripe_charge_id,
            balance_transaction_id=p.balance_transaction_id,
            amount_minor=p.amount_minor,
            currency=p.currency,
            fee_minor=p.fee_minor,
            net_minor=p.net_minor,
            settlement_amount_minor=p.settlement_amount_minor,
            settlement_currency=p.settlement_currency,
            settled_at=p.settled_at,
        )


class DisputeOut(BaseModel):
    """A dispute (chargeback) of a payment, as Stripe last reported it: no card data, the
    charge by its id only."""

    id: str
    stripe_dispute_id: str
    stripe_charge_id: str
    payment_id: str | None = Field(description="None: the charge is none of our payments.")
    invoice_id: str | None
    amount_minor: int
    currency: str
    status: DisputeStatus
    reason: str | None
    evidence_due_by: Instant | None
    created_at: Instant
    updated_at: Instant
    closed_at: Instant | None

    @classmethod
    def of(cls, d: DisputeRecord) -> DisputeOut:
        return cls(
            id=d.id,
            stripe_dispute_id=d.stripe_dispute_id,
            stripe_charge_id=d.stripe_charge_id,
            payment_id=d.payment_id,
            invoice_id=d.invoice_id,
            amount_minor=d.amount_minor,
            currency=d.currency,
            status=d.status,
            reason=d.reason,
            evidence_due_by=d.evidence_due_by,
            created_at=d.created_at,
            updated_at=d.updated_at,
            closed_at=d.closed_at,
        )


class AttemptOut(BaseModel):
    id: str
    attempt_number: int
    status: AttemptStatus
    outcome: str | None
    reason: str
    amount_minor: int
    currency: str
    decline_code: str | None
    failure_message: str | None
    idempotency_key: str = Field(description="What the payment provider saw for this attempt.")
    stripe_payment_intent_id: str | None
    stripe_charge_id: str | None
    payment_method_id: str | None
    created_at: Instant
    completed_at: Instant | None

    @classmethod
    def of(cls, a: PaymentAttemptRecord) -> AttemptOut:
        return cls(
            id=a.id,
            attempt_number=a.attempt_number,
            status=a.status,
            outcome=a.outcome.value if a.outcome is not None else None,
            reason=a.reason,
            amount_minor=a.amount_minor,
            currency=a.currency,
            decline_code=a.decline_code,
            failure_message=a.failure_message,
            idempotency_key=a.idempotency_key,
            stripe_payment_intent_id=a.stripe_payment_intent_id,
            stripe_charge_id=a.stripe_charge_id,
            payment_method_id=a.payment_method_id,
            created_at=a.created_at,
            completed_at=a.completed_at,
        )


class InvoiceLineOut(BaseModel):
    position: int
    kind: str = Field(description="subscription or proration.")
    description: str
    amount_minor: int = Field(description="Signed minor units: a credit is negative.")
    period_start: Instant
    period_end: Instant
    plan: str | None
    quantity: int
    unit_amount_minor: int | None
    change_id: str | None

    @classmethod
    def of(cls, line: InvoiceLineRecord) -> InvoiceLineOut:
        return cls(
            position=line.position,
            kind=line.kind.value,
            description=line.description,
            amount_minor=line.amount_minor,
            period_start=line.period_start,
            period_end=line.period_end,
            plan=line.plan_code,
            quantity=line.quantity,
            unit_amount_minor=line.unit_amount_minor,
            change_id=line.change_id,
        )


class InvoiceOut(BaseModel):
    id: str
    number: str
    status: InvoiceStatus
    customer_id: str
    subscription_id: str
    period_index: int
    period_start: Instant
    period_end: Instant
    amount_due_minor: int
    amount_paid_minor: int
    currency: str
    amount_due_display: str | None
    description: str
    status_reason: str | None
    created_at: Instant
    finalized_at: Instant | None
    paid_at: Instant | None
    voided_at: Instant | None
    marked_uncollectible_at: Instant | None
    payment: PaymentOut | None = Field(None, description="The settlement, once paid.")
    subtotal_minor: int = Field(0, description="Sum of the lines (negative: a net credit).")
    credit_applied_minor: int = Field(0, description="Credit balance used to pay it.")
    change_id: str | None = Field(None, description="The plan change it bills; null: renewal.")
    lines: list[InvoiceLineOut] = Field(default_factory=list)

    @classmethod
    def of(
        cls,
        i: InvoiceRecord,
        payment: PaymentRecord | None,
        lines: Sequence[InvoiceLineRecord] = (),
    ) -> InvoiceOut:
        return cls(
            subtotal_minor=i.subtotal_minor,
            credit_applied_minor=i.credit_applied_minor,
            change_id=i.change_id,
            lines=[InvoiceLineOut.of(line) for line in lines],
            id=i.id,
            number=i.number,
            status=i.status,
            customer_id=i.customer_id,
            subscription_id=i.subscription_id,
            period_index=i.period_index,
            period_start=i.period_start,
            period_end=i.period_end,
            amount_due_minor=i.amount_due_minor,
            amount_paid_minor=i.amount_paid_minor,
            currency=i.currency,
            amount_due_display=amount_display(i.amount_due_minor, i.currency),
            description=i.description,
            status_reason=i.status_reason,
            created_at=i.created_at,
            finalized_at=i.finalized_at,
            paid_at=i.paid_at,
            voided_at=i.voided_at,
            marked_uncollectible_at=i.marked_uncollectible_at,
            payment=PaymentOut.of(payment) if payment is not None else None,
        )

    @classmethod
    def of_item(cls, item: InvoiceListItem) -> InvoiceOut:
        return cls.of(item.invoice, item.payment, item.lines)


class InvoiceDetailOut(InvoiceOut):
    attempts: list[AttemptOut]
    payments: list[PaymentOut]

    @classmethod
    def of_detail(cls, detail: InvoiceDetail) -> InvoiceDetailOut:
        base = InvoiceOut.of(
            detail.invoice, detail.payments[0] if detail.payments else None, detail.lines
        )
        return cls(
            **base.model_dump(exclude={"payment"}),
            payment=base.payment,
            attempts=[AttemptOut.of(a) for a in detail.attempts],
            payments=[PaymentOut.of(p) for p in detail.payments],
        )


class InvoiceListOut(BaseModel):
    data: list[InvoiceOut]
    has_more: bool
    next_cursor: str | None = Field(
        description="Pass as 'cursor' for the next page; null on the last page."
    )

    @classmethod
    def of(cls, page: InvoicePage) -> InvoiceListOut:
        return cls(
            data=[InvoiceOut.of_item(item) for item in page.items],
            has_more=page.has_more,
            next_cursor=page.next_cursor,
        )


# ---- plans -------------------------------------------------------------------------------------

PlanNameIn = Annotated[str, _bounded(PLAN_NAME, min_length=1), _checked_by(PLAN_NAME)]


class DunningIn(RequestIn):
    retry_offsets_days: list[StrictInt] | None = Field(
        None,
        max_length=50,
        description="Days after the first failure, ascending; default Stripe's 1,3,5,7,9,11,14.",
    )
    final_action: FinalAction | None = Field(None, description="cancel or mark_unpaid.")


class PlanIn(RequestIn):
    """A plan. Immutable once created: a new price is a new code."""

    code: PlanCodeIn = Field(description="Lower-case letters, digits, '-' or '_'.")
    name: PlanNameIn
    amount_minor: StrictInt = Field(
        ge=0,
        le=MAX_AMOUNT_MINOR,
        description="Price of one seat for one interval, in minor units (JPY 0, USD 2, KWD 3 "
        "decimals). A subscription pays quantity x amount_minor.",
    )
    currency: str = Field(min_length=3, max_length=3, description="ISO 4217, e.g. 'USD'.")
    interval: IntervalUnit
    interval_count: StrictInt = Field(1, ge=1, le=1095)
    trial_days: StrictInt = Field(0, ge=0, le=MAX_TRIAL_DAYS)
    dunning: DunningIn | None = None

    def as_raw(self) -> dict[str, object]:
        """The fields as billing.plans.parse_plan reads them (it checks the domain rules)."""
        raw: dict[str, object] = self.model_dump(exclude={"dunning"})
        raw["interval"] = self.interval.value
        if self.dunning is not None:
            raw["dunning"] = self.dunning.model_dump(exclude_none=True)
        return raw


class PlanOut(BaseModel):
    code: str
    name: str
    amount_minor: int = Field(description="Per seat and interval, minor units.")
    currency: str
    amount_display: str | None
    interval: str
    interval_count: int
    trial_days: int
    retry_offsets_days: list[int]
    final_action: str
    active: bool = Field(description="False once archived: no new signups or changes to it.")
    created_at: Instant

    @classmethod
    def of(cls, entry: CatalogPlan) -> PlanOut:
        p = entry.plan
        return cls(
            code=p.code,
            name=p.name,
            amount_minor=p.amount_minor,
            currency=p.currency,
            amount_display=amount_display(p.amount_minor, p.currency),
            interval=p.interval.value,
            interval_count=p.interval_count,
            trial_days=p.trial_days,
            retry_offsets_days=list(p.dunning.retry_offsets_days),
            final_action=p.dunning.final_action.value,
            active=entry.active,
            created_at=entry.created_at,
        )


class PlanListOut(BaseModel):
    items: list[PlanOut]


# ---- customers ---------------------------------------------------------------------------------


class CardOut(BaseModel):
    payment_method_id: str
    brand: str | None = Field(description="As the provider reported it when attached.")
    last4: str | None


class CustomerSummaryOut(BaseModel):
    id: str
    external_id: str | None
    email: str | None
    name: str | None
    timezone: str
    locale: str | None = Field(
        None, description="BCP 47 locale of the customer's mails and invoice documents."
    )
    created_at: Instant

    @classmethod
    def of(cls, c: CustomerRecord) -> CustomerSummaryOut:
        return cls(
            id=c.id,
            external_id=c.external_id,
            email=c.email,
            name=c.name,
            timezone=c.timezone,
            locale=c.locale,
            created_at=c.created_at,
        )


class CustomerListOut(BaseModel):
    items: list[CustomerSummaryOut]
    next_cursor: str | None = Field(
        description="Pass as ``cursor`` for the next page; null on the last page."
    )


class BalanceOut(BaseModel):
    currency: str
    amount_minor: int = Field(
        description="Credit the customer holds (minor units); below 0: a debit they owe (an "
        "amount below the minimum charge, carried to the next invoice)."
    )
    amount_display: str | None


class CustomerOut(CustomerSummaryOut):
    card: CardOut | None = Field(description="The default card on file.")
    credit_balance: list[BalanceOut] = Field(
        description="Per currency; applied to the next invoices before charging."
    )
    subscriptions: list[SubscriptionSummaryOut]


# ---- plan changes ------------------------------------------------------------------------------


class ChangePlanIn(RequestIn):
    plan: PlanCodeIn | None = Field(None, description="The new plan's code; omit to keep it.")
    quantity: StrictInt | None = Field(
        None, ge=1, le=MAX_QUANTITY, description="The new number of seats; omit to keep it."
    )
    effective: ChangeEffective | None = Field(
        None, description="now or period_end; default: now for an upgrade, period_end otherwise."
    )
    proration: ProrationBehavior | None = Field(
        None,
        description="always_invoice (default), create_prorations (to the next renewal) or none.",
    )


class LineOut(BaseModel):
    description: str
    amount_minor: int = Field(description="Signed minor units: a credit is negative.")
    period_start: Instant
    period_end: Instant
    plan: str
    quantity: int
    unit_amount_minor: int

    @classmethod
    def of(cls, line: ProrationLine) -> LineOut:
        return cls(
            description=line.description,
            amount_minor=line.amount_minor,
            period_start=line.period_start,
            period_end=line.period_end,
            plan=line.plan_code,
            quantity=line.quantity,
            unit_amount_minor=line.unit_amount_minor,
        )


class ChangePlanOut(BaseModel):
    id: str
    change_id: str
    effective: str
    effective_at: Instant
    plan: str
    quantity: int
    proration: str
    lines: list[LineOut]
    invoice_id: str | None = Field(description="The invoice issued for the lines now, if any.")
    invoice_status: str | None
    amount_due_minor: int | None = Field(description="What that invoice leaves to charge.")
    voided_invoice_id: str | None = Field(
        description="The period's unpaid renewal, voided and billed again with the change."
    )
    pending: bool = Field(description="Scheduled for effective_at, cancelable until then.")

    @classmethod
    def of(cls, subscription_id: str, r: ChangePlanResult) -> ChangePlanOut:
        return cls(
            id=subscription_id,
            change_id=r.change_id,
            effective=r.effective,
            effective_at=r.effective_at,
            plan=r.plan_code,
            quantity=r.quantity,
            proration=r.proration,
            lines=[LineOut.of(line) for line in r.lines],
            invoice_id=r.invoice_id,
            invoice_status=r.invoice_status,
            amount_due_minor=r.amount_due_minor,
            voided_invoice_id=r.voided_invoice_id,
            pending=r.pending,
        )


class ChangePreviewOut(BaseModel):
    id: str
    effective: str
    effective_at: Instant | None
    plan: str
    quantity: int
    proration: str
    lines: list[LineOut]
    subtotal_minor: int = Field(description="Sum of the lines; the credit balance applies later.")
    currency: str
    invoice_now: bool
    carried_to_renewal: bool
    adjusts_invoice_id: str | None

    @classmethod
    def of(cls, subscription_id: str, p: ChangePreview) -> ChangePreviewOut:
        return cls(
            id=subscription_id,
            effective=p.effective,
            effective_at=p.effective_at,
            plan=p.plan_code,
            quantity=p.quantity,
            proration=p.proration,
            lines=[LineOut.of(line) for line in p.lines],
            subtotal_minor=p.subtotal_minor,
            currency=p.currency,
            invoice_now=p.invoice_now,
            carried_to_renewal=p.carried_to_renewal,
            adjusts_invoice_id=p.adjusts_invoice_id,
        )


class PendingChangeCancelOut(BaseModel):
    id: str
    change_id: str
    plan: str
    quantity: int


# ---- credit notes, refunds and payouts (their routers, and the events that show them) --------


class CreditNoteLineOut(BaseModel):
    position: int
    invoice_line_id: str | None
    description: str
    amount_minor: int

    @classmethod
    def of(cls, line: CreditNoteLineRecord) -> CreditNoteLineOut:
        return cls(
            position=line.position,
            invoice_line_id=line.invoice_line_id,
            description=line.description,
            amount_minor=line.amount_minor,
        )


class RefundOut(BaseModel):
    id: str
    invoice_id: str
    credit_note_id: str | None = Field(description="None: made elsewhere (Stripe's dashboard).")
    source: RefundSource
    refund_number: int | None
    status: RefundStatus
    amount_minor: int
    currency: str
    reason: RefundReason | None
    idempotency_key: str | None
    stripe_refund_id: str | None
    failure_reason: str | None
    created_at: Instant
    completed_at: Instant | None

    @classmethod
    def of(cls, refund: RefundRecord) -> RefundOut:
        return cls(
            id=refund.id,
            invoice_id=refund.invoice_id,
            credit_note_id=refund.credit_note_id,
            source=refund.source,
            refund_number=refund.refund_number,
            status=refund.status,
            amount_minor=refund.amount_minor,
            currency=refund.currency,
            reason=refund.reason,
            idempotency_key=refund.idempotency_key,
            stripe_refund_id=refund.stripe_refund_id,
            failure_reason=refund.failure_reason,
            created_at=refund.created_at,
            completed_at=refund.completed_at,
        )


class CreditNoteOut(BaseModel):
    id: str
    number: str
    invoice_id: str
    customer_id: str
    type: str = Field(description="post_payment (a paid invoice) or pre_payment (an open one).")
    currency: str
    reason: CreditNoteReason | None
    memo: str | None
    amount_minor: int
    refund_amount_minor: int
    credit_amount_minor: int
    out_of_band_amount_minor: int
    amount_due_reduction_minor: int
    created_at: Instant
    created_by: str | None
    lines: list[CreditNoteLineOut]
    refunds: list[RefundOut]

    @classmethod
    def of(
        cls, note: CreditNoteRecord, lines: list[CreditNoteLineRecord], refunds: list[RefundRecord]
    ) -> CreditNoteOut:
        return cls(
            id=note.id,
            number=note.number,
            invoice_id=note.invoice_id,
            customer_id=note.customer_id,
            type=note.type,
            currency=note.currency,
            reason=note.reason,
            memo=note.memo,
            amount_minor=note.amount_minor,
            refund_amount_minor=note.refund_amount_minor,
            credit_amount_minor=note.credit_amount_minor,
            out_of_band_amount_minor=note.out_of_band_amount_minor,
            amount_due_reduction_minor=note.amount_due_reduction_minor,
            created_at=note.created_at,
            created_by=note.created_by,
            lines=[CreditNoteLineOut.of(line) for line in lines],
            refunds=[RefundOut.of(refund) for refund in refunds],
        )


class PayoutOut(BaseModel):
    id: str
    stripe_payout_id: str
    amount_minor: int
    currency: str
    status: str
    automatic: bool
    arrival_date: Instant | None
    created_at: Instant | None
    imported_at: Instant | None

    @classmethod
    def of(cls, p: PayoutRecord) -> PayoutOut:
        return cls(
            id=p.id,
            stripe_payout_id=p.stripe_payout_id,
            amount_minor=p.amount_minor,
            currency=p.currency,
            status=p.status,
            automatic=p.automatic,
            arrival_date=p.arrival_date,
            created_at=p.provider_created_at,
            imported_at=p.imported_at,
        )


class FindingOut(BaseModel):
    kind: str
    severity: str
    detail: str
    balance_transaction_id: str | None
    source_id: str | None
    ours: str | None

    @classmethod
    def of(cls, f: Finding) -> FindingOut:
        return cls(
            kind=f.kind.value,
            severity=f.severity.value,
            detail=f.detail,
            balance_transaction_id=f.transaction_id,
            source_id=f.source_id,
            ours=f.ours,
        )


class PayoutReconciliationOut(BaseModel):
    stripe_payout_id: str
    currency: str
    amount_minor: int
    gross_minor: int
    fee_minor: int
    net_minor: int
    transactions_by_type: dict[str, int]
    matched: int
    differences: int
    findings: list[FindingOut]

    @classmethod
    def of(cls, r: PayoutReconciliation) -> PayoutReconciliationOut:
        return cls(
            stripe_payout_id=r.payout_id,
            currency=r.currency,
            amount_minor=r.amount_minor,
            gross_minor=r.gross_minor,
            fee_minor=r.fee_minor,
            net_minor=r.net_minor,
            transactions_by_type=r.counts_by_type,
            matched=len(r.matched),
            differences=len(r.findings),
            findings=[FindingOut.of(f) for f in r.findings],
        )
