"""The Stripe payment adapter: the only module that imports ``stripe``.

Every Stripe answer is translated here into the normalized results of ``billing.payments``
(Kill Bill's plugin shape), so nothing past this module sees a Stripe object or exception:

* a business outcome (paid, declined, needs authentication) is a returned ``ChargeOutcome``;
* a fault that a retry with the *same* idempotency key can fix (network, 5xx, 429, lock
  timeouts, an idempotent request still in flight) raises ``TransientPaymentError``;
* anything a retry cannot fix (bad API key, missing permission, invalid parameters, an
  idempotency key reused with other parameters) raises ``PaymentProviderError``.

One PaymentIntent per invoice (Stripe Billing's model): an invoice's first attempt creates its
intent and confirms it in the same request (``charge``); every later attempt confirms that same
intent again with the customer's current card (``confirm_payment_intent``), and the intent is
canceled when the invoice is closed unpaid (``cancel_payment_intent``). An intent can succeed
only once, so an old attempt that needed authentication can never be paid on top of a new one.

Stripe keeps an Idempotency-Key for about 24 hours only. Every PaymentIntent we create therefore
also carries its key in ``metadata["idempotency_key"]``, so ``find_charge_attempt`` can tell,
long after the key expired, whether a charge whose answer was lost was created at all.

Amounts are integer minor units; currencies are upper-case ISO 4217 codes on our side and
lower-case on the wire (Stripe's convention).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, cast

import stripe
from stripe.params import (
    ChargeListParams,
    CustomerCreateParams,
    PaymentIntentCancelParams,
    PaymentIntentConfirmParams,
    PaymentIntentCreateParams,
    PaymentIntentListParams,
)
from temporalio import activity

from billing.charge_reconciliation import ProviderCharge
from billing.contracts import idempotency_key_for
from billing.credit_notes import RefundReason, RefundStatus
from billing.disputes import DisputeStatus, ProviderDispute
from billing.errors import PaymentMethodRejected
from billing.ledger import (
    LedgerGateway,
    PayoutStatus,
    ProviderBalanceTransaction,
    ProviderPayout,
)
from billing.pacing import ProviderPacer
from billing.payments import (
    AttachedPaymentMethod,
    ChargeOutcome,
    ChargeOutcomeKind,
    PaymentGateway,
    PaymentIntentCancellation,
    PaymentProviderError,
    ProviderCustomer,
    SettlementDetails,
    TransientPaymentError,
    classify_decline,
)
from billing.refunds import ProviderRefund, RefundGateway, RefundRefused
from billing.settings import (
    DEFAULT_STRIPE_CONNECT_TIMEOUT_S,
    DEFAULT_STRIPE_MAX_NETWORK_RETRIES,
    DEFAULT_STRIPE_READ_TIMEOUT_S,
)

if TYPE_CHECKING:
    from stripe.params import (
        BalanceTransactionListParams,
        ChargeListParams,
        CustomerCreateParams,
        PaymentIntentCancelParams,
        PaymentIntentConfirmParams,
        PaymentIntentCreateParams,
        PaymentIntentListParams,
        PayoutListParams,
        RefundCreateParams,
        RefundListParams,
    )

__all__ = [
    "IDEMPOTENCY_KEY_METADATA",
    "STRIPE_API_VERSION",
    "StripeGateway",
    "make_stripe_client",
]

logger = logging.getLogger(__name__)

#: Stripe rejects longer Idempotency-Key headers.
_MAX_IDEMPOTENCY_KEY_LENGTH = 255

#: Error codes meaning "Stripe is momentarily busy with this object/key; the same request will
#: succeed later" (Stripe sends ``lock_timeout`` with 429, sometimes 400).
_TRANSIENT_ERROR_CODES = frozenset({"lock_timeout", "rate_limit"})

#: Invalid-request codes on attach that mean "this card cannot be used" rather than "our
#: request was malformed": the customer must supply another payment method.
_REJECTED_PAYMENT_METHOD_CODES = frozenset(
    {
        "resource_missing",
        "payment_method_unexpected_state",
        "payment_method_invalid_parameter",
        "payment_method_not_available",
        "payment_method_unactivated",
    }
)

#: PaymentIntent statuses that wait for the customer to act (3-D Secure / confirm on-session).
_NEEDS_CUSTOMER_STATUSES = frozenset({"requires_action", "requires_confirmation"})

#: Stripe's error code for a request the PaymentIntent's status does not allow: confirming one
#: that succeeded or was canceled, canceling one that succeeded or was canceled already
#: (https://docs.stripe.com/error-codes#payment-intent-unexpected-state).
_UNEXPECTED_STATE = "payment_intent_unexpected_state"

#: The metadata field holding the Idempotency-Key a PaymentIntent was created with. Stripe
#: never shows a request's key and forgets it after ~24 hours; the intent keeps this for good.
IDEMPOTENCY_KEY_METADATA = "idempotency_key"

#: What a charge's answer carries expanded: its charge and that charge's balance transaction
#: (https://docs.stripe.com/api/expanding_objects), so the one create-and-confirm (or confirm)
#: request also tells the fee and net, and no read follows a paid charge.
_CHARGE_EXPAND = ["latest_charge.balance_transaction"]

#: Stripe's test-mode tokens (``pm_card_visa``, ...) resolve to a *new* PaymentMethod each
#: time they are used (https://docs.stripe.com/testing#cards), so one request cannot both
#: attach one and name it as the default: they take the attach-then-default path.
_TEST_TOKEN_PREFIX = "pm_card_"

#: A payment method id that goes into an Idempotency-Key as it is: what Stripe issues
#: (``pm_...``, ``card_...``). Anything else a caller sends (any text the API's edge lets
#: through) is hashed first, since an HTTP header carries only Latin-1, and the key must stay
#: within Stripe's 255 characters.
_KEY_SAFE_ID = re.compile(r"[A-Za-z0-9_]{1,100}")

#: Stripe's largest page size for list endpoints.
_PAGE_LIMIT = 100

#: The PaymentIntent list filters ``find_charge_attempt`` relies on. A provider refusing one
#: of these (and nothing else) is the one case that switches to the fallback lookup.
_INTENT_LIST_FILTERS = frozenset({"customer", "created"})

#: localstripe's refusal of list parameters it does not implement: "Unexpected a, b".
_UNEXPECTED_PARAMETERS = re.compile(r"Unexpected (?P<names>[\w\[\]]+(?:, [\w\[\]]+)*)")


#: The Stripe API version every request names (``Stripe-Version`` header). Without it Stripe
#: answers in the account's default version, which the account owner can change in the
#: dashboard (and new accounts start on the newest): the objects we parse could change shape
#: under a running deployment. This is the version stripe-python 16.1 is generated for, so its
#: types match the answers; move it deliberately, with the SDK, after reading Stripe's
#: upgrade notes for the fields this module reads.
STRIPE_API_VERSION = "2026-10-28.endive"


#: Left in hand after a try's worst case before the activity attempt's deadline.
_DEADLINE_MARGIN_S = 2.0

#: Outside an activity, how long a request waits at most for its turn under the provider cap.
_PACING_MAX_WAIT_S = 30.0


def activity_time_left_s() -> float | None:
    """Seconds until the running activity attempt's start-to-close deadline, or None outside
    an activity (or without such a timeout). The deadline is the server's; so is the clock."""
    if not activity.in_activity():
        return None
    info = activity.info()
    if info.start_to_close_timeout is None:
        return None
    deadline = info.started_time + info.start_to_close_timeout
    return (deadline - datetime.now(UTC)).total_seconds()


class ActivityDeadlineClient(stripe.RequestsClient):
    """The SDK's HTTP client with its timeouts, which starts no try that could outlive the
    activity attempt making it. One try is bounded (connect + read timeout), but an activity
    makes several requests in a row (a charge: the customer's card, the intent, the
    settlement), and the SDK retries each: without this, a hung Stripe could keep a thread
    talking to it after Temporal had given up on the attempt and started its retry beside it.
    A try refused here is a connection error the SDK does not retry; the activity fails and
    its retry sends the same request under the same idempotency key."""

    def __init__(self, *, timeout: tuple[float, float], pacer: ProviderPacer | None = None) -> None:
        super().__init__(timeout=timeout)
        self._worst_try_s = timeout[0] + timeout[1] + _DEADLINE_MARGIN_S
        self._pacer = pacer

    def request(  # type: ignore[override]
        self, method: str, url: str, headers: Mapping[str, str] | None, post_data: Any = None
    ) -> tuple[Any, int, Mapping[str, str]]:
        if self._pacer is not None:
            self._wait_turn(method, url)
        left = activity_time_left_s()
        if left is not None and left < self._worst_try_s:
            raise stripe.APIConnectionError(  # type: ignore[no-untyped-call]
                f"{method.upper()} {url} not sent: {max(left, 0):.1f} s are left of this "
                f"activity attempt and one try may take {self._worst_try_s:.1f} s; the "
                "activity's retry sends it again under the same idempotency key",
                should_retry=False,
            )
        result: tuple[Any, int, Mapping[str, str]] = super().request(
            method, url, headers, post_data
        )
        return result

    def _wait_turn(self, method: str, url: str) -> None:
        """Wait for this try's turn in the schedule every worker shares (the provider cap);
        a turn later than this activity attempt can still use is not taken: the attempt fails
        at once and its retry asks again."""
        assert self._pacer is not None
        left = activity_time_left_s()
        max_wait_s = _PACING_MAX_WAIT_S if left is None else left - self._worst_try_s
        if self._pacer.wait_turn(max_wait_s=max_wait_s) is None:
            raise stripe.APIConnectionError(  # type: ignore[no-untyped-call]
                f"{method.upper()} {url} not sent: the provider cap's next free turn is more "
                f"than {max(max_wait_s, 0):.1f} s away, later than this activity attempt can "
                "wait; the activity's retry sends it under the same idempotency key",
                should_retry=False,
            )


def make_stripe_client(
    *,
    api_key: str,
    api_base: str | None,
    max_network_retries: int = DEFAULT_STRIPE_MAX_NETWORK_RETRIES,
    connect_timeout_s: float = DEFAULT_STRIPE_CONNECT_TIMEOUT_S,
    read_timeout_s: float = DEFAULT_STRIPE_READ_TIMEOUT_S,
    http_client: stripe.HTTPClient | None = None,
    pacer: ProviderPacer | None = None,
) -> stripe.StripeClient:
    """A ``StripeClient`` for ``api_base`` (None: api.stripe.com; else e.g. localstripe's URL)
    speaking ``STRIPE_API_VERSION``.

    The SDK retries connection errors, 409 and 5xx itself ``max_network_retries`` times, reusing
    the request's Idempotency-Key, before the adapter sees a ``TransientPaymentError``. Each try
    waits at most ``connect_timeout_s`` to connect and ``read_timeout_s`` for each read (the
    SDK's default is 80 s, longer than the activity that makes the call): ``Settings`` checks
    that the worst case fits inside the provider activity's start-to-close timeout.
    ``http_client`` (tests) replaces the timed client, with its own timeouts. ``pacer``: every
    try first waits for its turn under the provider cap shared by all workers
    (``billing.pacing``); None sends at once.
    """
    if not api_key:
        raise PaymentProviderError(
            "the Stripe API key is empty; configure a secret key such as 'sk_test_...'"
        )
    if http_client is None:
        http_client = ActivityDeadlineClient(
            timeout=(connect_timeout_s, read_timeout_s), pacer=pacer
        )
    return stripe.StripeClient(
        api_key,
        base_addresses={"api": api_base} if api_base else None,
        stripe_version=STRIPE_API_VERSION,
        max_network_retries=max_network_retries,
        http_client=http_client,
    )


def _expandable_id(value: object) -> str | None:
    """The id of an expandable field, which Stripe returns as an id string or, when expanded
    (localstripe always expands ``latest_charge``), as the object itself."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    object_id = getattr(value, "id", None)
    return object_id if isinstance(object_id, str) else None


def _settlement_of_charge(charge: object) -> SettlementDetails | None:
    """The settlement a charge object carries with its balance transaction expanded, or None
    when the charge is only an id or its balance transaction was not expanded (a provider
    that ignored ``expand``): then it is read with ``settlement_details``. A charge without
    a balance transaction (Stripe sets none on some asynchronous methods) settles without a
    fee and net, as ``settlement_details`` reports it."""
    if charge is None or isinstance(charge, str):
        return None
    charge_id = _get(charge, "id")
    amount = _get(charge, "amount")
    currency = _get(charge, "currency")
    if not isinstance(charge_id, str) or not isinstance(amount, int) or not currency:
        return None
    balance_transaction = _get(charge, "balance_transaction")
    if isinstance(balance_transaction, str):
        return None
    if balance_transaction is None:
        return SettlementDetails(
            charge_id=charge_id,
            amount_minor=amount,
            currency=str(currency).upper(),
            fee_minor=None,
            net_minor=None,
            balance_transaction_id=None,
        )
    return SettlementDetails(
        charge_id=charge_id,
        amount_minor=amount,
        currency=str(currency).upper(),
        fee_minor=int(balance_transaction.fee),
        net_minor=int(balance_transaction.net),
        balance_transaction_id=str(balance_transaction.id),
        settlement_amount_minor=int(balance_transaction.amount),
        settlement_currency=str(balance_transaction.currency).upper(),
    )


def _redirect_url(intent: object) -> str | None:
    """``next_action.redirect_to_url.url`` of an intent waiting for the customer: the page
    where they authenticate (only when it was confirmed with a ``return_url``); None for any
    other next action (``use_stripe_sdk`` needs Stripe.js on the business's own page)."""
    action = _get(intent, "next_action")
    if _get(action, "type") != "redirect_to_url":
        return None
    url = _get(_get(action, "redirect_to_url"), "url")
    return url if isinstance(url, str) and url.startswith("https://") else None


def _get(obj: object, name: str) -> Any:
    """A field of a Stripe object, or None when absent. Stripe omits null fields in some
    payloads (error objects) and localstripe omits fields real Stripe always sends."""
    if obj is None:
        return None
    return getattr(obj, name, None)


def _describe(error: stripe.StripeError) -> str:
    """A compact, log-friendly description of a Stripe error for our own messages."""
    parts = [f"HTTP {error.http_status}" if error.http_status else "no HTTP response"]
    code = error.code or _get(error.error, "code")
    if code:
        parts.append(f"code={code}")
    decline_code = _get(error.error, "decline_code")
    if decline_code:
        parts.append(f"decline_code={decline_code}")
    if error.request_id:
        parts.append(f"request_id={error.request_id}")
    message = error.user_message or "no message"
    return f"{message} ({', '.join(parts)})"


def _is_card_error(error: stripe.StripeError) -> bool:
    return isinstance(error, stripe.CardError) or _get(error.error, "type") == "card_error"


def _is_transient(error: stripe.StripeError) -> bool:
    code = error.code or _get(error.error, "code")
    if code in _TRANSIENT_ERROR_CODES:
        return True
    if isinstance(error, stripe.RateLimitError | stripe.APIConnectionError):
        return True
    if isinstance(error, stripe.APIError):
        # The SDK maps every status it has no class for to APIError. 5xx and 409 (another
        # request with this idempotency key is still in flight) are worth retrying with the
        # same key; a missing status means no response at all.
        status = error.http_status
        return status is None or status >= 500 or status == 409
    return False


def _is_unsupported_list_filter(error: stripe.StripeError) -> bool:
    """Whether the provider refused a PaymentIntent list *only* because it does not support the
    ``customer``/``created`` filters. Any other refusal (bad key, unknown customer, bad value,
    outage) is not this and must surface as usual, never be papered over by a fallback.

    Two answers count, both HTTP 400 ``invalid_request_error`` naming nothing but those filters:

    * Stripe's shape for a parameter an endpoint does not know: ``code="parameter_unknown"``
      and ``param`` naming it (Stripe itself supports both filters; an older API version, a
      proxy or another Stripe-protocol server might not);
    * localstripe 1.15's shape: no ``code``, message ``"Unexpected customer, created"``. Its
      PaymentIntent list is the generic one, which accepts only ``limit`` and
      ``starting_after`` and names every other parameter it received.
    """
    if not isinstance(error, stripe.InvalidRequestError) or error.http_status != 400:
        return False
    code = error.code or _get(error.error, "code")
    if code == "parameter_unknown":
        param = error.param or _get(error.error, "param") or ""
        return str(param).split("[", 1)[0] in _INTENT_LIST_FILTERS
    if code:
        return False
    match = _UNEXPECTED_PARAMETERS.fullmatch(str(_get(error.error, "message") or "").strip())
    if match is None:
        return False
    names = {name.split("[", 1)[0] for name in match["names"].split(", ")}
    return names <= _INTENT_LIST_FILTERS


def _metadata_of(obj: object) -> dict[str, str]:
    metadata = _get(obj, "metadata")
    if metadata is None:
        return {}
    raw = metadata.to_dict() if isinstance(metadata, stripe.StripeObject) else dict(metadata)
    return {str(key): str(value) for key, value in raw.items()}


def _created_with_key(
    intent: stripe.PaymentIntent, *, provider_customer_id: str, idempotency_key: str, since: int
) -> bool:
    """Whether ``charge`` created this intent for this customer with this key, at or after
    ``since`` (Unix seconds)."""
    if _expandable_id(_get(intent, "customer")) != provider_customer_id:
        return False
    if int(_get(intent, "created") or 0) < since:
        return False
    metadata = _metadata_of(intent)
    recorded = metadata.get(IDEMPOTENCY_KEY_METADATA)
    if recorded is not None:
        return recorded == idempotency_key
    # Intents created before the key was put in metadata still carry what it derives from.
    invoice_id, attempt_number = metadata.get("invoice_id"), metadata.get("attempt_number")
    return (
        invoice_id is not None
        and attempt_number is not None
        and attempt_number.isdigit()
        and idempotency_key_for(invoice_id, int(attempt_number)) == idempotency_key
    )


def _preferred_intent(
    matches: list[stripe.PaymentIntent], idempotency_key: str
) -> stripe.PaymentIntent | None:
    """The intent that answers for the key. Several can carry it only if the key was not
    honoured (a provider that ignores keys, or a re-send after the key expired): a succeeded
    one wins, since money was taken; otherwise the newest."""
    if not matches:
        return None
    succeeded = [intent for intent in matches if intent.status == "succeeded"]
    if len(succeeded) > 1:
        logger.error(
            "%d succeeded payment intents (%s) carry idempotency key %r: the customer was "
            "charged more than once; refund all but one",
            len(succeeded),
            ", ".join(intent.id for intent in succeeded),
            idempotency_key,
        )
    return max(succeeded or matches, key=lambda intent: int(_get(intent, "created") or 0))


def _key_part(payment_method_id: str) -> str:
    """``payment_method_id`` as a part of an Idempotency-Key: itself when it looks like an id
    Stripe issues (so keys of requests in flight across an upgrade are unchanged), else a
    digest of it (``sha256-...``), deterministic, header-safe and of bounded length. Such an
    id can name no card; the request still goes out, and Stripe's refusal of it is
    translated like any other unknown card's."""
    if _KEY_SAFE_ID.fullmatch(payment_method_id):
        return payment_method_id
    digest = hashlib.sha256(payment_method_id.encode("utf-8", "surrogatepass")).hexdigest()
    return f"sha256-{digest}"


def _rejects_payment_method(error: stripe.StripeError) -> bool:
    """Whether an invalid request was refused because of the card it names (no such card, or
    one that cannot be used), rather than because our request was malformed."""
    code = error.code or _get(error.error, "code")
    return isinstance(error, stripe.InvalidRequestError) and (
        error.http_status == 404 or code in _REJECTED_PAYMENT_METHOD_CODES
    )


def _check_idempotency_key(idempotency_key: str) -> None:
    if not idempotency_key or len(idempotency_key) > _MAX_IDEMPOTENCY_KEY_LENGTH:
        # Without a key the SDK would invent a random one per call, silently losing the
        # at-most-once guarantee; refuse instead.
        raise PaymentProviderError(
            f"idempotency_key must be 1 to {_MAX_IDEMPOTENCY_KEY_LENGTH} characters; got "
            f"{idempotency_key!r}. Derive it from the invoice id and attempt number"
        )


def _is_unexpected_state(error: stripe.StripeError) -> bool:
    """Whether Stripe refused a PaymentIntent request because of the intent's status. Stripe
    says so with ``payment_intent_unexpected_state``; localstripe 1.15 (unpatched) answers a
    bare 400 "Bad request" with no code, which is read the same way: the caller then reads the
    intent, whose status is the real answer."""
    if not isinstance(error, stripe.InvalidRequestError) or error.http_status != 400:
        return False
    code = error.code or _get(error.error, "code")
    if code == _UNEXPECTED_STATE:
        return True
    return code is None and str(_get(error.error, "message") or "").strip() == "Bad request"


def _raise_translated(error: stripe.StripeError, *, operation: str) -> NoReturn:
    """Raise the domain exception for a Stripe error that is not a business outcome."""
    detail = _describe(error)
    if _is_transient(error):
        raise TransientPaymentError(
            f"Stripe could not complete {operation}: {detail}; this is safe to retry (a write "
            "with the same idempotency key)"
        ) from error
    if isinstance(error, stripe.AuthenticationError):
        raise PaymentProviderError(
            f"Stripe rejected the API key while trying {operation}: {detail}; configure a valid "
            "secret key (sk_live_... or sk_test_...) for this account"
        ) from error
    if isinstance(error, stripe.PermissionError):
        raise PaymentProviderError(
            f"the Stripe API key may not perform {operation}: {detail}; use a key with write "
            "access to customers, payment methods and payment intents"
        ) from error
    if isinstance(error, stripe.IdempotencyError):
        raise PaymentProviderError(
            f"Stripe refused {operation} because its idempotency key was already used with "
            f"different parameters: {detail}; derive a new key for a different request"
        ) from error
    if isinstance(error, stripe.InvalidRequestError):
        raise PaymentProviderError(
            f"Stripe rejected {operation} as invalid: {detail}; fix the request parameters "
            "(a retry will be refused the same way)"
        ) from error
    raise PaymentProviderError(f"Stripe failed {operation}: {detail}") from error


_P = TypeVar("_P", PaymentIntentCreateParams, PaymentIntentConfirmParams)


def _without_expand_if_refused(
    send: Callable[[_P], stripe.PaymentIntent], params: _P
) -> stripe.PaymentIntent:
    """Send a charge with its charge and balance transaction expanded. Stripe compares a
    repeated Idempotency-Key's parameters with the first request's: a charge first sent by a
    version of this adapter that did not ask for ``expand`` (in flight across an upgrade, its
    answer lost) is refused as a different request. It is then sent again exactly as the
    first time, which Stripe answers with the first result; its settlement is read after."""
    try:
        return send(params)
    except stripe.IdempotencyError:
        if "expand" not in params:
            raise
        logger.warning(
            "a charge's idempotency key was first used without expand; re-sending it as it "
            "was first sent"
        )
        first = cast(_P, {name: value for name, value in params.items() if name != "expand"})
        return send(first)


#: The SDK's classes of the objects our calls get back. stripe-python imports each one the
#: first time a response holds it, inside that response's conversion: the first charge of a
#: process imported PaymentIntent's module, on billing day under the burst's load (56 of a
#: burst profile's 1,150 samples of the worker's interpreter, in that module's class body,
#: before the first charge could return). A gateway loads them when it is made instead.
RESPONSE_CLASSES = (
    "BalanceTransaction",
    "Charge",
    "Customer",
    "Dispute",
    "ListObject",
    "PaymentIntent",
    "PaymentMethod",
    "Refund",
    "SetupIntent",
)


def load_response_classes() -> None:
    """Import the SDK's modules of ``RESPONSE_CLASSES`` now (each once per process)."""
    for name in RESPONSE_CLASSES:
        getattr(stripe, name)


class StripeGateway:
    """``billing.payments.PaymentGateway`` on Stripe's API, through an injected ``StripeClient``.

    ``send_description``: localstripe 1.15 rejects ``description`` on PaymentIntents
    (HTTP 400 "Unexpected description"). Pass False there; the description then travels as
    ``metadata["description"]`` instead. Real Stripe takes it as a field (the default).
    """

    def __init__(
        self,
        client: stripe.StripeClient,
        *,
        send_description: bool = True,
        return_url: str | None = None,
    ) -> None:
        load_response_classes()
        self._client = client
        self._send_description = send_description
        #: Where Stripe sends the customer back after authenticating a payment. With it, every
        #: charge and confirmation passes ``return_url``, so an intent that waits for 3-D
        #: Secure carries ``next_action.redirect_to_url.url``: the page the action-required
        #: mail links to. Without it Stripe gives no such URL (``use_stripe_sdk`` needs the
        #: business's own page with Stripe.js).
        self._return_url = return_url

    # -- customers and payment methods ------------------------------------------------------

    def ensure_customer(self, *, customer_id: str, email: str | None, name: str | None) -> str:
        """Create the Stripe customer for our ``customer_id`` and return its id (``cus_...``).

        The Idempotency-Key ``customer-{customer_id}`` makes a retried call return the same
        customer (Stripe keeps keys for 24 hours); callers persist the returned id.
        """
        params: CustomerCreateParams = {"metadata": {"billing_customer_id": customer_id}}
        if email:
            params["email"] = email
        if name:
            params["name"] = name
        try:
            customer = self._client.v1.customers.create(
                params=params, options={"idempotency_key": f"customer-{customer_id}"}
            )
        except stripe.StripeError as error:
            _raise_translated(error, operation=f"creating the customer for {customer_id!r}")
        return customer.id

    def create_customer(
        self,
        *,
        customer_id: str,
        email: str | None,
        name: str | None,
        payment_method_id: str | None,
    ) -> ProviderCustomer:
        """Create the Stripe customer for our ``customer_id`` with the card attached and made
        its invoice default, in one request (``payment_method`` and
        ``invoice_settings.default_payment_method`` of the customer's create,
        https://docs.stripe.com/api/customers/create), the default expanded so the answer also
        gives the card. A card Stripe refuses fails the whole create: ``PaymentMethodRejected``,
        and no customer exists.

        The Idempotency-Key derives from our customer id *and the card*: a retry after a lost
        answer with the same card gets the same customer; a retry with another card (the
        first was refused, and Stripe keeps that refusal under its key for 24 hours) is a new
        request. A test token (``pm_card_...``) takes the customer create, then
        ``attach_payment_method``."""
        if payment_method_id is None or payment_method_id.startswith(_TEST_TOKEN_PREFIX):
            provider_customer_id = self.ensure_customer(
                customer_id=customer_id, email=email, name=name
            )
            attached = (
                None
                if payment_method_id is None
                else self.attach_payment_method(
                    provider_customer_id=provider_customer_id,
                    payment_method_id=payment_method_id,
                )
            )
            return ProviderCustomer(provider_customer_id, attached)
        params: CustomerCreateParams = {
            "metadata": {"billing_customer_id": customer_id},
            "payment_method": payment_method_id,
            "invoice_settings": {"default_payment_method": payment_method_id},
            "expand": ["invoice_settings.default_payment_method"],
        }
        if email:
            params["email"] = email
        if name:
            params["name"] = name
        try:
            customer = self._client.v1.customers.create(
                params=params,
                options={
                    "idempotency_key": f"customer-{customer_id}-{_key_part(payment_method_id)}"
                },
            )
        except stripe.StripeError as error:
            self._raise_for_new_customer(error, payment_method_id, customer_id)
        default = _get(_get(customer, "invoice_settings"), "default_payment_method")
        card = _get(default, "card")
        return ProviderCustomer(
            customer.id,
            AttachedPaymentMethod(
                payment_method_id=_expandable_id(default) or payment_method_id,
                card_brand=_get(card, "brand"),
                card_last4=_get(card, "last4"),
            ),
        )

    def attach_payment_method(
        self, *, provider_customer_id: str, payment_method_id: str
    ) -> AttachedPaymentMethod:
        """Attach the payment method to the customer and make it the default for invoices: two
        requests. Raises ``PaymentMethodRejected`` if Stripe refuses the card or it belongs to
        another customer.

        The attach carries an Idempotency-Key derived from the customer and the card, so a
        retry after a lost answer is answered with the first result. A refusal that is not
        about the card itself (Stripe refuses to attach a card that is already attached) is
        looked into with one read: already this customer's is success (a retry after the key
        expired), another customer's is a rejection."""
        try:
            payment_method = self._client.v1.payment_methods.attach(
                payment_method_id,
                params={"customer": provider_customer_id},
                options={
                    "idempotency_key": (
                        f"attach-{provider_customer_id}-{_key_part(payment_method_id)}"
                    )
                },
            )
        except stripe.StripeError as error:
            if _is_card_error(error) or not isinstance(error, stripe.InvalidRequestError):
                self._raise_for_attach(error, payment_method_id, provider_customer_id)
            payment_method = self._attached_already(error, payment_method_id, provider_customer_id)

        # Stripe test tokens such as ``pm_card_visa`` resolve to a new ``pm_...``: from here on
        # use the id Stripe gave us.
        attached_id = payment_method.id
        owner = _expandable_id(payment_method.customer)
        if owner is not None and owner != provider_customer_id:
            raise PaymentMethodRejected(
                f"payment method {payment_method_id!r} belongs to another Stripe customer "
                f"({owner}), not {provider_customer_id}; collect a new card from this customer",
                field="payment_method_id",
            )
        try:
            self._client.v1.customers.update(
                provider_customer_id,
                params={"invoice_settings": {"default_payment_method": attached_id}},
            )
        except stripe.StripeError as error:
            _raise_translated(
                error,
                operation=f"making {attached_id} the default payment method of "
                f"{provider_customer_id}",
            )

        card = _get(payment_method, "card")
        return AttachedPaymentMethod(
            payment_method_id=attached_id,
            card_brand=_get(card, "brand"),
            card_last4=_get(card, "last4"),
        )

    def _attached_already(
        self, error: stripe.StripeError, payment_method_id: str, provider_customer_id: str
    ) -> stripe.PaymentMethod:
        """After an attach refused as invalid: the card if it is already attached (the caller
        checks to whom); otherwise the refusal, translated."""
        try:
            payment_method = self._client.v1.payment_methods.retrieve(payment_method_id)
        except stripe.StripeError as read_error:
            self._raise_for_attach(read_error, payment_method_id, provider_customer_id)
        if _expandable_id(payment_method.customer) is None:
            self._raise_for_attach(error, payment_method_id, provider_customer_id)
        return payment_method

    def _raise_for_new_customer(
        self, error: stripe.StripeError, payment_method_id: str, customer_id: str
    ) -> NoReturn:
        """A customer create with a card failed as a whole. A refusal that names no reason
        about the card (an invalid request without a card code: localstripe's bare "Bad
        request" for an id that is not ``pm_...``, a card attached elsewhere) is looked into
        with one read, as the attach does: no such card, or another customer's, is a
        rejection of the card (``PaymentMethodRejected``); otherwise the refusal, translated.
        Only a failed create reads: a new customer still costs one request."""
        where = f"a new customer ({customer_id})"
        if (
            _is_card_error(error)
            or not isinstance(error, stripe.InvalidRequestError)
            or _rejects_payment_method(error)
        ):
            self._raise_for_attach(error, payment_method_id, where)
        try:
            payment_method = self._client.v1.payment_methods.retrieve(payment_method_id)
        except stripe.StripeError as read_error:
            self._raise_for_attach(read_error, payment_method_id, where)
        owner = _expandable_id(payment_method.customer)
        if owner is not None:
            raise PaymentMethodRejected(
                f"payment method {payment_method_id!r} belongs to another Stripe customer "
                f"({owner}); collect a new card from this customer",
                field="payment_method_id",
            ) from error
        self._raise_for_attach(error, payment_method_id, where)

    def _raise_for_attach(
        self, error: stripe.StripeError, payment_method_id: str, provider_customer_id: str
    ) -> NoReturn:
        code = error.code or _get(error.error, "code")
        if _is_card_error(error) or _rejects_payment_method(error):
            decline_code = _get(error.error, "decline_code")
            reason = error.user_message or "no reason given"
            codes = ", ".join(
                f"{label}={value}"
                for label, value in (("decline_code", decline_code), ("code", code))
                if value
            )
            raise PaymentMethodRejected(
                f"Stripe refused payment method {payment_method_id!r} for customer "
                f"{provider_customer_id}: {reason}" + (f" ({codes})" if codes else "") + "; "
                "ask the customer for another card",
                field="payment_method_id",
            ) from error
        _raise_translated(
            error,
            operation=f"attaching {payment_method_id} to {provider_customer_id}",
        )

    def detach_payment_method(self, *, payment_method_id: str) -> None:
        """Detach the card from its customer; an already detached card is done (a retry
        after a lost answer)."""
        try:
            payment_method = self._client.v1.payment_methods.retrieve(payment_method_id)
            if _expandable_id(payment_method.customer) is None:
                return
            self._client.v1.payment_methods.detach(payment_method_id)
        except stripe.StripeError as error:
            _raise_translated(error, operation=f"detaching payment method {payment_method_id}")

    def default_payment_method(self, *, provider_customer_id: str) -> str | None:
        """The customer's default payment method for invoices (``pm_...``), or None."""
        try:
            customer = self._client.v1.customers.retrieve(provider_customer_id)
        except stripe.StripeError as error:
            _raise_translated(error, operation=f"reading customer {provider_customer_id}")
        if _get(customer, "deleted"):
            raise PaymentProviderError(
                f"Stripe customer {provider_customer_id} is deleted; create a new customer "
                "with ensure_customer before charging"
            )
        invoice_settings = _get(customer, "invoice_settings")
        return _expandable_id(_get(invoice_settings, "default_payment_method"))

    # -- charges -----------------------------------------------------------------------------

    def charge(
        self,
        *,
        provider_customer_id: str,
        payment_method_id: str,
        amount_minor: int,
        currency: str,
        idempotency_key: str,
        description: str,
        metadata: dict[str, str],
    ) -> ChargeOutcome:
        """One off-session, automatically captured charge of ``amount_minor`` (minor units).

        ``idempotency_key`` goes on the wire as the Idempotency-Key: Stripe answers a retry of
        the same key with the first attempt's result instead of charging again.
        """
        _check_idempotency_key(idempotency_key)
        currency_upper = currency.upper()
        # The key also goes into metadata, where it outlives Stripe's ~24-hour memory of it:
        # find_charge_attempt looks for it there before an old attempt is re-sent.
        wire_metadata = {**metadata, IDEMPOTENCY_KEY_METADATA: idempotency_key}
        params: PaymentIntentCreateParams = {
            "amount": amount_minor,
            "currency": currency.lower(),
            "customer": provider_customer_id,
            "payment_method": payment_method_id,
            "off_session": True,
            "confirm": True,
            "metadata": wire_metadata,
            "expand": list(_CHARGE_EXPAND),
        }
        if self._return_url is not None:
            params["return_url"] = self._return_url
        if self._send_description:
            params["description"] = description
        else:
            wire_metadata.setdefault("description", description)

        def create(params: PaymentIntentCreateParams) -> stripe.PaymentIntent:
            return self._client.v1.payment_intents.create(
                params=params, options={"idempotency_key": idempotency_key}
            )

        try:
            intent = _without_expand_if_refused(create, params)
        except stripe.StripeError as error:
            if _is_card_error(error):
                return self._with_authentication_link(
                    self._outcome_from_card_error(
                        error, amount_minor=amount_minor, currency=currency_upper
                    ),
                    payment_method_id=payment_method_id,
                    idempotency_key=idempotency_key,
                )
            _raise_translated(
                error,
                operation=f"charging {amount_minor} {currency_upper} minor units to "
                f"{provider_customer_id} (idempotency key {idempotency_key!r})",
            )
        return self._outcome_from_intent(intent)

    def confirm_payment_intent(
        self,
        *,
        payment_intent_id: str,
        payment_method_id: str,
        amount_minor: int,
        currency: str,
        idempotency_key: str,
    ) -> ChargeOutcome:
        """Confirm the invoice's existing PaymentIntent again, off-session, with
        ``payment_method_id`` (``POST /v1/payment_intents/{id}/confirm``; one request).

        Stripe confirms an intent that ``requires_payment_method`` (the last charge failed) or
        ``requires_action`` (it waits for authentication) with a newly provided payment method:
        the new card replaces the old one and the pending authentication is dropped, so the
        customer can no longer complete it (https://docs.stripe.com/api/payment_intents/confirm,
        https://docs.stripe.com/payments/paymentintents/lifecycle). An intent that already
        succeeded (the customer authenticated it meanwhile) is refused with
        ``payment_intent_unexpected_state``; it is then read and reported PAID: the money was
        taken once, and no second charge can exist.
        """
        _check_idempotency_key(idempotency_key)
        currency_upper = currency.upper()
        params: PaymentIntentConfirmParams = {
            "payment_method": payment_method_id,
            "off_session": True,
            "expand": list(_CHARGE_EXPAND),
        }
        if self._return_url is not None:
            params["return_url"] = self._return_url
        operation = (
            f"confirming payment intent {payment_intent_id} with {payment_method_id} "
            f"(idempotency key {idempotency_key!r})"
        )

        def confirm(params: PaymentIntentConfirmParams) -> stripe.PaymentIntent:
            return self._client.v1.payment_intents.confirm(
                payment_intent_id, params=params, options={"idempotency_key": idempotency_key}
            )

        try:
            intent = _without_expand_if_refused(confirm, params)
        except stripe.StripeError as error:
            if _is_card_error(error):
                return self._with_authentication_link(
                    self._outcome_from_card_error(
                        error,
                        amount_minor=amount_minor,
                        currency=currency_upper,
                        payment_intent_id=payment_intent_id,
                    ),
                    payment_method_id=payment_method_id,
                    idempotency_key=idempotency_key,
                )
            if _is_unexpected_state(error):
                # Succeeded or canceled meanwhile: its state is the answer, not an error.
                return self.payment_intent_outcome(payment_intent_id=payment_intent_id)
            _raise_translated(error, operation=operation)
        return self._outcome_from_intent(intent)

    def cancel_payment_intent(self, *, payment_intent_id: str) -> PaymentIntentCancellation:
        """Cancel the invoice's PaymentIntent (``cancellation_reason=abandoned``) so that
        nobody can pay it afterwards (https://docs.stripe.com/api/payment_intents/cancel).

        Idempotent: Stripe refuses to cancel an intent that is already canceled or that
        succeeded (``payment_intent_unexpected_state``); on any such refusal the intent is read
        and its status decides: canceled is success, succeeded is returned as ``paid`` (money
        was taken and must be recorded), processing raises TransientPaymentError.

        No fixed Idempotency-Key: Stripe would replay a refusal recorded under it (say, while
        the intent was processing) for 24 hours, even after the intent became cancelable. The
        SDK's own per-call key still covers its network retries; a repeated cancel is harmless.
        """
        params: PaymentIntentCancelParams = {"cancellation_reason": "abandoned"}
        operation = f"canceling payment intent {payment_intent_id}"
        try:
            intent = self._client.v1.payment_intents.cancel(payment_intent_id, params=params)
        except stripe.StripeError as error:
            if not _is_unexpected_state(error):
                _raise_translated(error, operation=operation)
            try:
                intent = self._client.v1.payment_intents.retrieve(
                    payment_intent_id, params={"expand": list(_CHARGE_EXPAND)}
                )
            except stripe.StripeError as read_error:
                _raise_translated(
                    read_error, operation=f"reading payment intent {payment_intent_id}"
                )
            if intent.status not in ("canceled", "succeeded", "processing"):
                # Refused although cancelable: not the state problem we know how to read.
                _raise_translated(error, operation=operation)
        if intent.status == "canceled":
            return PaymentIntentCancellation(payment_intent_id=intent.id, canceled=True)
        if intent.status == "processing":
            raise TransientPaymentError(
                f"payment intent {intent.id} is processing and cannot be canceled now; ask "
                "again once it succeeded or failed"
            )
        outcome = self._outcome_from_intent(intent)
        if outcome.kind != ChargeOutcomeKind.PAID:
            raise PaymentProviderError(
                f"payment intent {intent.id} is {intent.status} after a cancel; inspect it in "
                "the Stripe dashboard"
            )
        return PaymentIntentCancellation(payment_intent_id=intent.id, canceled=False, paid=outcome)

    def payment_intent_status(self, *, payment_intent_id: str) -> str:
        """The intent's status (https://docs.stripe.com/api/payment_intents/object#payment_intent_object-status);
        a read, so the daily reconciliation asks it before canceling anything."""
        try:
            intent = self._client.v1.payment_intents.retrieve(payment_intent_id)
        except stripe.StripeError as error:
            _raise_translated(error, operation=f"reading payment intent {payment_intent_id}")
        return str(intent.status)

    def payment_intent_outcome(self, *, payment_intent_id: str) -> ChargeOutcome:
        """The current state of a PaymentIntent, e.g. after the customer authenticated."""
        try:
            intent = self._client.v1.payment_intents.retrieve(
                payment_intent_id, params={"expand": list(_CHARGE_EXPAND)}
            )
        except stripe.StripeError as error:
            _raise_translated(error, operation=f"reading payment intent {payment_intent_id}")
        return self._outcome_from_intent(intent)

    def find_charge_attempt(
        self, *, provider_customer_id: str, idempotency_key: str, created_after: datetime
    ) -> ChargeOutcome | None:
        """The outcome of the PaymentIntent ``charge`` created for this customer with
        ``idempotency_key`` at or after ``created_after`` (aware UTC), or None if there is none.

        Matches ``metadata["idempotency_key"]`` (intents from before that field: their
        ``invoice_id`` and ``attempt_number``). Uses the PaymentIntent list filtered by customer
        and creation time, which is strongly consistent; the Search API is not (new intents
        appear there after a delay) and would answer "none" for an intent that exists.
        Only a provider that answers that those filters are unsupported (localstripe) gets the
        fallback, ``_find_without_intent_filters``.
        """
        if created_after.tzinfo is None:
            raise PaymentProviderError(
                f"created_after must be a timezone-aware UTC datetime; got {created_after!r}"
            )
        # Whole seconds, rounded down: the bound stays inclusive.
        since = int(created_after.timestamp())
        operation = (
            f"looking up the payment intent of {provider_customer_id} with idempotency key "
            f"{idempotency_key!r}"
        )
        try:
            matches = self._find_by_intent_filters(provider_customer_id, idempotency_key, since)
        except stripe.StripeError as error:
            if not _is_unsupported_list_filter(error):
                _raise_translated(error, operation=operation)
            logger.info(
                "the provider cannot list payment intents by customer and date (%s); looking "
                "up %r through the customer's charges instead",
                _describe(error),
                idempotency_key,
            )
            try:
                matches = self._find_without_intent_filters(
                    provider_customer_id, idempotency_key, since
                )
            except stripe.StripeError as fallback_error:
                _raise_translated(fallback_error, operation=operation)
        intent = _preferred_intent(matches, idempotency_key)
        return None if intent is None else self._outcome_from_intent(intent)

    def _find_by_intent_filters(
        self, provider_customer_id: str, idempotency_key: str, since: int
    ) -> list[stripe.PaymentIntent]:
        """Stripe: the customer's PaymentIntents created since ``since``, every page."""
        params: PaymentIntentListParams = {
            "customer": provider_customer_id,
            "created": {"gte": since},
            "limit": _PAGE_LIMIT,
        }
        matches: list[stripe.PaymentIntent] = []
        while True:
            page = self._client.v1.payment_intents.list(params=params)
            matches.extend(
                intent
                for intent in page.data
                if _created_with_key(
                    intent,
                    provider_customer_id=provider_customer_id,
                    idempotency_key=idempotency_key,
                    since=since,
                )
            )
            if not page.has_more or not page.data:
                return matches
            params["starting_after"] = page.data[-1].id

    def _find_without_intent_filters(
        self, provider_customer_id: str, idempotency_key: str, since: int
    ) -> list[stripe.PaymentIntent]:
        """For a provider without the PaymentIntent list filters (localstripe 1.15).

        First the customer's charges since ``since`` (localstripe filters charges by customer
        and ``created[gt]``), each leading to its PaymentIntent: every intent that was paid or
        declined has a charge. Only if that finds nothing, every PaymentIntent on the account
        (localstripe's list takes ``limit`` and ``starting_after`` only), filtered here: an
        off-session intent that needs authentication has no charge on localstripe (Stripe
        would have failed it with one). Unbounded on a large account, which is why real Stripe
        never comes here.
        """
        # ``gt since - 1`` is ``gte since`` in whole seconds; localstripe implements only ``gt``
        # of the range operators (``gte`` answers 500 "Not implemented").
        charge_params: ChargeListParams = {
            "customer": provider_customer_id,
            "created": {"gt": since - 1},
            "limit": _PAGE_LIMIT,
        }

        def is_ours(intent: stripe.PaymentIntent) -> bool:
            return _created_with_key(
                intent,
                provider_customer_id=provider_customer_id,
                idempotency_key=idempotency_key,
                since=since,
            )

        matches: list[stripe.PaymentIntent] = []
        seen: set[str] = set()
        while True:
            charges = self._client.v1.charges.list(params=charge_params)
            for charge in charges.data:
                intent_id = _expandable_id(_get(charge, "payment_intent"))
                if intent_id is None or intent_id in seen:
                    continue
                seen.add(intent_id)
                intent = self._client.v1.payment_intents.retrieve(
                    intent_id, params={"expand": list(_CHARGE_EXPAND)}
                )
                if is_ours(intent):
                    matches.append(intent)
            if not charges.has_more or not charges.data:
                break
            charge_params["starting_after"] = charges.data[-1].id
        if matches:
            return matches
        intent_params: PaymentIntentListParams = {"limit": _PAGE_LIMIT}
        while True:
            intents = self._client.v1.payment_intents.list(params=intent_params)
            matches.extend(intent for intent in intents.data if is_ours(intent))
            if not intents.has_more or not intents.data:
                return matches
            intent_params["starting_after"] = intents.data[-1].id

    def _outcome_from_intent(self, intent: stripe.PaymentIntent) -> ChargeOutcome:
        status = intent.status
        amount = intent.amount
        currency = intent.currency.upper()
        charge_id = _expandable_id(intent.latest_charge)
        if status == "succeeded":
            return ChargeOutcome(
                kind=ChargeOutcomeKind.PAID,
                payment_intent_id=intent.id,
                charge_id=charge_id,
                amount_minor=amount,
                currency=currency,
                settlement=_settlement_of_charge(intent.latest_charge),
            )
        if status in _NEEDS_CUSTOMER_STATUSES:
            return ChargeOutcome(
                kind=ChargeOutcomeKind.AUTHENTICATION_REQUIRED,
                payment_intent_id=intent.id,
                authentication_url=_redirect_url(intent),
                charge_id=charge_id,
                failure_message=(
                    f"payment intent {intent.id} is {status}: the customer must authenticate "
                    "the payment on-session"
                ),
                amount_minor=amount,
                currency=currency,
            )
        if status == "processing":
            raise TransientPaymentError(
                f"payment intent {intent.id} is still processing (asynchronous payment method); "
                "check it again later with payment_intent_outcome"
            )
        if status == "requires_payment_method":
            error = _get(intent, "last_payment_error")
            code = _get(error, "code")
            decline_code = _get(error, "decline_code")
            if error is None:
                message = (
                    f"payment intent {intent.id} has no payment method and reports no decline; "
                    "ask the customer for a card"
                )
            else:
                message = _get(error, "message") or f"payment intent {intent.id} was declined"
            return ChargeOutcome(
                kind=classify_decline(code, decline_code),
                payment_intent_id=intent.id,
                charge_id=charge_id or _get(error, "charge"),
                decline_code=decline_code or code,
                failure_message=message,
                amount_minor=amount,
                currency=currency,
            )
        if status == "canceled":
            reason = _get(intent, "cancellation_reason") or "no reason given"
            return ChargeOutcome(
                kind=ChargeOutcomeKind.SOFT_DECLINE,
                payment_intent_id=intent.id,
                charge_id=charge_id,
                failure_message=(
                    f"payment intent {intent.id} was canceled ({reason}); nothing can be "
                    "charged on it any more"
                ),
                amount_minor=amount,
                currency=currency,
            )
        raise PaymentProviderError(
            f"payment intent {intent.id} has status {status!r}, which this adapter never "
            "creates (it confirms off-session with automatic capture); inspect it in the "
            "Stripe dashboard"
        )

    def _outcome_from_card_error(
        self,
        error: stripe.StripeError,
        *,
        amount_minor: int,
        currency: str,
        payment_intent_id: str | None = None,
    ) -> ChargeOutcome:
        code = error.code or _get(error.error, "code")
        decline_code = _get(error.error, "decline_code")
        intent = _get(error.error, "payment_intent")
        payment_intent_id = _expandable_id(intent) or payment_intent_id
        charge_id = _expandable_id(_get(error.error, "charge")) or _expandable_id(
            _get(intent, "latest_charge")
        )
        if payment_intent_id is None and charge_id is not None:
            # Stripe puts the PaymentIntent in the error (and so does localstripe with
            # billing.testing.localstripe_conformance); an error naming only the charge (an
            # unpatched localstripe) costs a read: the charge points back at its
            # PaymentIntent. That read must succeed: a decline recorded without its intent
            # leaves the intent unknown to us, so the next attempt would create a second one
            # for the invoice and closing the invoice would not cancel the first (found by
            # scripts/chaos.py). A transient failure of the read raises, and the retry
            # replays the charge under its key, then reads again.
            payment_intent_id = self._payment_intent_of_charge(charge_id)
        return ChargeOutcome(
            kind=classify_decline(code, decline_code),
            payment_intent_id=payment_intent_id,
            charge_id=charge_id,
            decline_code=decline_code or code,
            failure_message=error.user_message,
            amount_minor=amount_minor,
            currency=currency,
        )

    def _with_authentication_link(
        self, outcome: ChargeOutcome, *, payment_method_id: str, idempotency_key: str
    ) -> ChargeOutcome:
        """An off-session charge Stripe declined with ``authentication_required`` (its
        documented answer when the bank wants 3-D Secure and nobody is there) leaves the
        intent in ``requires_payment_method`` with no next action, so no link. With a
        ``return_url`` configured, confirm it once more *on-session* with it: Stripe then
        answers ``requires_action`` with ``next_action.redirect_to_url.url``, the page where
        the customer authenticates, and the payment completes there (Stripe's "manually
        handle 3D Secure" flow). Its own idempotency key (the attempt's plus ``:auth``), so a
        retried activity asks once. Any failure keeps the outcome without a link: the mail
        then falls back (``BILLING_MAIL_AUTHENTICATION_URL``), and the decline stands."""
        if (
            outcome.kind != ChargeOutcomeKind.AUTHENTICATION_REQUIRED
            or outcome.authentication_url is not None
            or outcome.payment_intent_id is None
            or self._return_url is None
        ):
            return outcome
        params: PaymentIntentConfirmParams = {
            "payment_method": payment_method_id,
            "return_url": self._return_url,
        }
        try:
            intent = self._client.v1.payment_intents.confirm(
                outcome.payment_intent_id,
                params=params,
                options={"idempotency_key": f"{idempotency_key}:auth"},
            )
        except stripe.StripeError as error:
            logger.warning(
                "no authentication link for %s: %s", outcome.payment_intent_id, _describe(error)
            )
            return outcome
        try:
            now = self._outcome_from_intent(intent)
        except (PaymentProviderError, TransientPaymentError):
            return outcome  # processing: a later attempt or read finds how it ended
        if now.kind == ChargeOutcomeKind.PAID:
            # The bank let it through on-session after all: the money is taken, and that is
            # the outcome to record (never a second charge later).
            return now
        if now.kind == ChargeOutcomeKind.AUTHENTICATION_REQUIRED:
            return dataclasses.replace(outcome, authentication_url=now.authentication_url)
        return outcome

    def _payment_intent_of_charge(self, charge_id: str) -> str | None:
        """The PaymentIntent of a declined charge. A transient failure raises
        TransientPaymentError (retry); any other failure is logged and gives None (the decline
        is still the outcome)."""
        try:
            charge = self._client.v1.charges.retrieve(charge_id)
        except stripe.StripeError as error:
            if _is_transient(error):
                _raise_translated(
                    error,
                    operation=f"reading declined charge {charge_id} to find its payment intent",
                )
            logger.warning(
                "could not look up the payment intent of declined charge %s: %s",
                charge_id,
                _describe(error),
            )
            return None
        return _expandable_id(charge.payment_intent)

    # -- settlement --------------------------------------------------------------------------

    def settlement_details(
        self, *, payment_intent_id: str, charge_id: str | None
    ) -> SettlementDetails:
        """The charge's amount and currency (what the customer paid, in the invoice's currency)
        plus the balance transaction's gross, fee and net in the settlement currency, where
        ``fee + net == settlement amount``. Settlement fields are None without a balance
        transaction."""
        if charge_id is None:
            try:
                intent = self._client.v1.payment_intents.retrieve(payment_intent_id)
            except stripe.StripeError as error:
                _raise_translated(error, operation=f"reading payment intent {payment_intent_id}")
            charge_id = _expandable_id(intent.latest_charge)
            if charge_id is None:
                return SettlementDetails(
                    charge_id=None,
                    amount_minor=intent.amount,
                    currency=intent.currency.upper(),
                    fee_minor=None,
                    net_minor=None,
                    balance_transaction_id=None,
                )
        try:
            charge = self._client.v1.charges.retrieve(
                charge_id, params={"expand": ["balance_transaction"]}
            )
        except stripe.StripeError as error:
            _raise_translated(error, operation=f"reading charge {charge_id}")

        balance_transaction: Any = charge.balance_transaction
        if isinstance(balance_transaction, str):
            # Not expanded after all (some proxies/fakes ignore ``expand``): fetch it.
            try:
                balance_transaction = self._client.v1.balance_transactions.retrieve(
                    balance_transaction
                )
            except stripe.StripeError as error:
                _raise_translated(
                    error, operation=f"reading balance transaction {balance_transaction}"
                )
        if balance_transaction is None:
            return SettlementDetails(
                charge_id=charge.id,
                amount_minor=charge.amount,
                currency=charge.currency.upper(),
                fee_minor=None,
                net_minor=None,
                balance_transaction_id=None,
            )
        return SettlementDetails(
            charge_id=charge.id,
            amount_minor=int(charge.amount),
            currency=str(charge.currency).upper(),
            fee_minor=int(balance_transaction.fee),
            net_minor=int(balance_transaction.net),
            balance_transaction_id=str(balance_transaction.id),
            settlement_amount_minor=int(balance_transaction.amount),
            settlement_currency=str(balance_transaction.currency).upper(),
        )

    # -- refunds and disputes (issue 13; new functions only, beside the charge path) --------

    def create_refund(
        self,
        *,
        charge_id: str,
        amount_minor: int,
        currency: str,
        reason: RefundReason,
        idempotency_key: str,
        metadata: dict[str, str],
    ) -> ProviderRefund:
        """``POST /v1/refunds`` of ``amount_minor`` of the charge, with Stripe's reason
        (https://docs.stripe.com/api/refunds/create). The key goes on the wire, so a retry is
        answered with the first refund, and into ``metadata["idempotency_key"]``, where
        ``find_refund`` finds it after Stripe forgot the key.

        Stripe refuses a refund over what is left of the charge (``amount_too_large``), of a
        charge already refunded (``charge_already_refunded``) or disputed
        (``charge_disputed``): a retry cannot fix those, PaymentProviderError."""
        _check_idempotency_key(idempotency_key)
        params: RefundCreateParams = {
            "charge": charge_id,
            "amount": amount_minor,
            "reason": reason.value,
            "metadata": {**metadata, IDEMPOTENCY_KEY_METADATA: idempotency_key},
        }
        try:
            refund = self._client.v1.refunds.create(
                params=params, options={"idempotency_key": idempotency_key}
            )
        except stripe.StripeError as error:
            if (
                isinstance(error, stripe.InvalidRequestError)
                and not isinstance(error, stripe.IdempotencyError)
                and error.http_status == 400
            ):
                raise RefundRefused(
                    f"Stripe refused to refund {amount_minor} {currency.upper()} minor units of "
                    f"charge {charge_id}: {_describe(error)}"
                ) from error
            _raise_translated(
                error,
                operation=f"refunding {amount_minor} {currency.upper()} minor units of charge "
                f"{charge_id} (idempotency key {idempotency_key!r})",
            )
        return _provider_refund(refund)

    def find_refund(self, *, charge_id: str, idempotency_key: str) -> ProviderRefund | None:
        """The charge's refund made with ``idempotency_key`` (its metadata), or None. Lists the
        charge's refunds (``GET /v1/refunds?charge=``, strongly consistent; a charge has few)."""
        for refund in self._charge_refunds(charge_id):
            if refund.idempotency_key == idempotency_key:
                return refund
        return None

    def retrieve_refund(self, *, refund_id: str) -> ProviderRefund:
        try:
            refund = self._client.v1.refunds.retrieve(refund_id)
        except stripe.StripeError as error:
            _raise_translated(error, operation=f"reading refund {refund_id}")
        return _provider_refund(refund)

    def list_charge_refunds(self, *, charge_id: str) -> list[ProviderRefund]:
        return self._charge_refunds(charge_id)

    def _charge_refunds(self, charge_id: str) -> list[ProviderRefund]:
        params: RefundListParams = {"charge": charge_id, "limit": _PAGE_LIMIT}
        try:
            pages = self._client.v1.refunds.list(params=params).auto_paging_iter()
            return [_provider_refund(refund) for refund in pages]
        except stripe.StripeError as error:
            _raise_translated(error, operation=f"listing the refunds of charge {charge_id}")

    def retrieve_dispute(self, *, dispute_id: str) -> ProviderDispute:
        """The dispute as Stripe holds it now (https://docs.stripe.com/api/disputes/object)."""
        try:
            dispute = self._client.v1.disputes.retrieve(dispute_id)
        except stripe.StripeError as error:
            _raise_translated(error, operation=f"reading dispute {dispute_id}")
        return _provider_dispute(dispute)

    def update_payment_intent_amount(
        self,
        *,
        payment_intent_id: str,
        amount_minor: int,
        currency: str,
        idempotency_key: str | None = None,
    ) -> int:
        """Set the amount of an invoice's PaymentIntent that has not succeeded (a pre-payment
        credit note lowered the invoice), so the next confirm takes the new amount
        (https://docs.stripe.com/api/payment_intents/update; allowed while it waits for a
        payment method, a confirmation or an action). Returns the amount Stripe now holds. An
        intent that succeeded or was canceled meanwhile is refused by Stripe
        (``payment_intent_unexpected_state``): PaymentProviderError, the caller reads it.
        ``idempotency_key``: the charge attempt's (derived), so a re-drive of the attempt within
        Stripe's 24 hours is answered with the first update's result."""
        if isinstance(amount_minor, bool) or amount_minor < 1:
            raise PaymentProviderError(f"a PaymentIntent amount is >= 1; got {amount_minor!r}")
        if idempotency_key is not None:
            _check_idempotency_key(idempotency_key)
        try:
            intent = self._client.v1.payment_intents.update(
                payment_intent_id,
                params={"amount": amount_minor},
                options={"idempotency_key": idempotency_key} if idempotency_key else {},
            )
        except stripe.StripeError as error:
            _raise_translated(
                error,
                operation=f"setting payment intent {payment_intent_id} to {amount_minor} "
                f"{currency.upper()} minor units",
            )
        if str(intent.currency).upper() != currency.upper():
            raise PaymentProviderError(
                f"payment intent {payment_intent_id} is in {intent.currency}, not {currency}"
            )
        return int(intent.amount)

    # -- the ledger: balance transactions and payouts (issue 13) -----------------------------

    def retrieve_balance_transaction(self, *, transaction_id: str) -> ProviderBalanceTransaction:
        try:
            txn = self._client.v1.balance_transactions.retrieve(transaction_id)
        except stripe.StripeError as error:
            _raise_translated(error, operation=f"reading balance transaction {transaction_id}")
        return _provider_balance_transaction(txn)

    def list_balance_transactions(
        self, *, payout_id: str | None = None, created_from: datetime | None = None
    ) -> list[ProviderBalanceTransaction]:
        """``GET /v1/balance_transactions`` with ``payout`` (what an automatic payout paid out,
        its own transaction included) or ``created[gte]``, every page."""
        params: BalanceTransactionListParams = {"limit": _PAGE_LIMIT}
        if payout_id is not None:
            params["payout"] = payout_id
        if created_from is not None:
            params["created"] = {"gte": int(created_from.timestamp())}
        try:
            pages = self._client.v1.balance_transactions.list(params=params).auto_paging_iter()
            return [_provider_balance_transaction(txn) for txn in pages]
        except stripe.StripeError as error:
            _raise_translated(error, operation="listing balance transactions")

    def retrieve_payout(self, *, payout_id: str) -> ProviderPayout:
        try:
            payout = self._client.v1.payouts.retrieve(payout_id)
        except stripe.StripeError as error:
            _raise_translated(error, operation=f"reading payout {payout_id}")
        return _provider_payout(payout)

    def list_payouts(self, *, created_from: datetime | None = None) -> list[ProviderPayout]:
        params: PayoutListParams = {"limit": _PAGE_LIMIT}
        if created_from is not None:
            params["created"] = {"gte": int(created_from.timestamp())}
        try:
            pages = self._client.v1.payouts.list(params=params).auto_paging_iter()
            return [_provider_payout(payout) for payout in pages]
        except stripe.StripeError as error:
            _raise_translated(error, operation="listing payouts")

    def list_charges(self, *, created_from: datetime) -> list[ProviderCharge]:
        """``GET /v1/charges`` created since ``created_from``, every page. ``created[gt]`` one
        second before is ``gte`` in whole seconds (localstripe implements only ``gt``)."""
        params: ChargeListParams = {
            "created": {"gt": int(created_from.timestamp()) - 1},
            "limit": _PAGE_LIMIT,
            # The intent's metadata names our invoice, even when our record of the attempt
            # never learnt the intent (an answer lost): that is the late success to find.
            "expand": ["data.payment_intent"],
        }
        try:
            pages = self._client.v1.charges.list(params=params).auto_paging_iter()
            return [
                ProviderCharge(
                    charge_id=str(charge.id),
                    payment_intent_id=_expandable_id(_get(charge, "payment_intent")),
                    amount_minor=int(charge.amount),
                    currency=str(charge.currency).upper(),
                    succeeded=_get(charge, "status") == "succeeded",
                    customer_id=_expandable_id(_get(charge, "customer")),
                    created=_timestamp(_get(charge, "created")),
                    invoice_id=_metadata_of(_get(charge, "payment_intent")).get("invoice_id")
                    if not isinstance(_get(charge, "payment_intent"), str)
                    else None,
                )
                for charge in pages
            ]
        except stripe.StripeError as error:
            _raise_translated(error, operation="listing charges")


def _exchange_rate_text(value: object) -> str | None:
    """Stripe's exchange rate (a JSON number) as the shortest text that reads back as it."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return repr(float(value))[:32]
    return str(value)[:32]


def _provider_balance_transaction(txn: Any) -> ProviderBalanceTransaction:
    return ProviderBalanceTransaction(
        transaction_id=str(txn.id),
        type=str(_get(txn, "type") or "unknown"),
        reporting_category=_get(txn, "reporting_category"),
        amount_minor=int(txn.amount),
        fee_minor=int(_get(txn, "fee") or 0),
        net_minor=int(txn.net),
        currency=str(txn.currency).upper(),
        source_id=_expandable_id(_get(txn, "source")),
        exchange_rate=_exchange_rate_text(_get(txn, "exchange_rate")),
        created=_timestamp(_get(txn, "created")),
        available_on=_timestamp(_get(txn, "available_on")),
        description=_get(txn, "description"),
    )


def _provider_payout(payout: Any) -> ProviderPayout:
    raw_status = str(_get(payout, "status") or "")
    try:
        status = PayoutStatus(raw_status)
    except ValueError:
        raise PaymentProviderError(
            f"payout {payout.id} has status {raw_status!r}, which this adapter does not know"
        ) from None
    return ProviderPayout(
        payout_id=str(payout.id),
        amount_minor=int(payout.amount),
        currency=str(payout.currency).upper(),
        status=status,
        automatic=bool(_get(payout, "automatic")),
        balance_transaction_id=_expandable_id(_get(payout, "balance_transaction")),
        arrival_date=_timestamp(_get(payout, "arrival_date")),
        created=_timestamp(_get(payout, "created")),
        failure_code=_get(payout, "failure_code"),
    )


def _timestamp(value: object) -> datetime | None:
    return datetime.fromtimestamp(int(value), UTC) if isinstance(value, int) and value > 0 else None


def _provider_refund(refund: Any) -> ProviderRefund:
    """A Stripe Refund as ``ProviderRefund``. An unknown status is PaymentProviderError: never
    guess whether money moved."""
    raw_status = str(_get(refund, "status") or "")
    try:
        status = RefundStatus(raw_status)
    except ValueError:
        raise PaymentProviderError(
            f"refund {refund.id} has status {raw_status!r}, which this adapter does not know; "
            "inspect it in the Stripe dashboard"
        ) from None
    return ProviderRefund(
        refund_id=str(refund.id),
        charge_id=_expandable_id(_get(refund, "charge")),
        payment_intent_id=_expandable_id(_get(refund, "payment_intent")),
        amount_minor=int(refund.amount),
        currency=str(refund.currency).upper(),
        status=status,
        idempotency_key=_metadata_of(refund).get(IDEMPOTENCY_KEY_METADATA),
        reason=_get(refund, "reason"),
        failure_reason=_get(refund, "failure_reason"),
        balance_transaction_id=_expandable_id(_get(refund, "balance_transaction")),
        created=_timestamp(_get(refund, "created")),
    )


def _provider_dispute(dispute: Any) -> ProviderDispute:
    raw_status = str(_get(dispute, "status") or "")
    try:
        status = DisputeStatus(raw_status)
    except ValueError:
        raise PaymentProviderError(
            f"dispute {dispute.id} has status {raw_status!r}, which this adapter does not know; "
            "inspect it in the Stripe dashboard"
        ) from None
    transactions = _get(dispute, "balance_transactions") or []
    evidence = _get(dispute, "evidence_details")
    charge_id = _expandable_id(_get(dispute, "charge"))
    if charge_id is None:
        raise PaymentProviderError(f"dispute {dispute.id} names no charge")
    return ProviderDispute(
        dispute_id=str(dispute.id),
        charge_id=charge_id,
        payment_intent_id=_expandable_id(_get(dispute, "payment_intent")),
        amount_minor=int(dispute.amount),
        currency=str(dispute.currency).upper(),
        status=status,
        reason=_get(dispute, "reason"),
        balance_transaction_ids=tuple(
            txn_id for txn_id in (_expandable_id(t) for t in transactions) if txn_id is not None
        ),
        evidence_due_by=_timestamp(_get(evidence, "due_by")),
        created=_timestamp(_get(dispute, "created")),
    )


if TYPE_CHECKING:
    # mypy proves here that StripeGateway implements the PaymentGateway protocol exactly.
    _implements_protocol: type[PaymentGateway] = StripeGateway
    _implements_refunds: type[RefundGateway] = StripeGateway
    _implements_ledger: type[LedgerGateway] = StripeGateway


def webhook_signature_valid(
    payload: str, header: str, secret: str, tolerance_seconds: int | None
) -> bool:
    """Whether ``header`` (Stripe-Signature) signs ``payload`` with ``secret``; with a
    tolerance, the signed timestamp must also be that recent. Uses the SDK's own check."""
    try:
        stripe.WebhookSignature.verify_header(payload, header, secret, tolerance_seconds)
    except stripe.SignatureVerificationError:
        return False
    return True
