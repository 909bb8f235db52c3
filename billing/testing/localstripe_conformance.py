"""Make localstripe's PaymentIntent follow Stripe's documented contract for confirming an
existing intent again and for canceling it, in the localstripe server process only.

Importing this module patches ``localstripe.resources.PaymentIntent`` (idempotent). Only
``billing.testing.localstripe_server`` imports it, inside the server process, *before*
``localstripe.server`` is imported: that module binds the handlers of the extra routes
(``/confirm``, ``/cancel``) when it is imported, so the patch also replaces them in
``localstripe.resources.extra_apis``. Nothing of localstripe is copied here; its code stays as
installed and runs around these two methods.

The engine keeps one PaymentIntent per invoice (Stripe Billing's model) and confirms it again
for each charge attempt, which localstripe 1.15 cannot do: its ``/confirm`` answers 500 "Not
implemented" for ``payment_method``, 400 for ``off_session``, and refuses (400 "Bad request")
unless the intent is ``requires_confirmation``, so never after a failed charge. What is
patched, each as Stripe documents it:

* ``POST /v1/payment_intents/{id}/confirm`` takes ``payment_method`` and ``off_session``
  (https://docs.stripe.com/api/payment_intents/confirm: "Confirm that your customer intends
  to pay with current or provided payment method"). An intent in ``requires_payment_method``
  (its last charge failed), ``requires_confirmation`` or ``requires_action`` (it waits for
  3-D Secure) is confirmed: a provided payment method replaces the old one, the pending
  ``next_action`` is dropped (the customer can no longer complete the old authentication:
  localstripe's ``/_authenticate`` then answers 400 because the intent is no longer
  ``requires_action``), and a new charge is made, which becomes ``latest_charge``
  (https://docs.stripe.com/payments/paymentintents/lifecycle). A decline answers 402 with the
  card error, as localstripe's create does. A card that needs authentication puts the intent
  in ``requires_action``, as localstripe's create with ``off_session=true`` already does (real
  Stripe would decline it with ``authentication_required``; both mean "the customer must act").
* Confirming an intent that ``succeeded``, is ``processing``, ``requires_capture`` or was
  ``canceled`` is refused with HTTP 400, ``code: payment_intent_unexpected_state`` and the
  intent in the error, as Stripe does
  (https://docs.stripe.com/error-codes#payment-intent-unexpected-state). An intent can
  therefore succeed only once, whoever confirms or authenticates it.
* ``POST /v1/payment_intents/{id}/cancel`` takes ``cancellation_reason`` (``duplicate``,
  ``fraudulent``, ``requested_by_customer``, ``abandoned``) and records it on the intent with
  ``canceled_at``; it cancels from ``requires_payment_method``, ``requires_capture``,
  ``requires_confirmation`` and ``requires_action``, and refuses any other status (``succeeded``,
  ``canceled``, ``processing``) with 400 ``payment_intent_unexpected_state``
  (https://docs.stripe.com/api/payment_intents/cancel). Stripe also allows canceling some
  ``processing`` intents "in rare cases"; this server never has such a case. A canceled
  intent sends ``payment_intent.canceled``
  (https://docs.stripe.com/api/events/types#event_types-payment_intent.canceled).

* A charge a PaymentIntent's create or confirm makes and the card declines answers 402 with
  an error of ``type: card_error`` that carries ``payment_intent``, the intent as it now is
  (https://docs.stripe.com/api/errors: "payment_intent: The PaymentIntent object for errors
  returned on a request involving a PaymentIntent"). localstripe 1.15 names only the
  ``charge``, which costs a client a read of that charge to learn its intent.
* ``POST /v1/customers`` with a ``payment_method`` the issuer refuses at attach fails as a
  whole (402 ``card_declined``) and creates no customer, as Stripe's create does (one
  request: https://docs.stripe.com/api/customers/create#create_customer-payment_method).
  localstripe 1.15 stores the customer first and then fails the attach, leaving a customer
  behind that the client was told was not created.
* ``POST /v1/payment_methods/{id}/attach`` of a card that is attached to *another* customer
  is refused with 400 ``invalid_request_error`` (Stripe: a PaymentMethod belongs to one
  customer and must be detached before it is attached elsewhere,
  https://docs.stripe.com/api/payment_methods/detach); localstripe 1.15 moves it silently.
  Attaching it again to the customer it belongs to succeeds.

* ``return_url`` is taken by the create with ``confirm=true`` and by ``/confirm``
  (https://docs.stripe.com/api/payment_intents/confirm#confirm_payment_intent-return_url:
  "The URL to redirect your customer back to after they authenticate or cancel their payment
  on the payment method's app or site"). A card that needs authentication then gives
  ``next_action: {type: redirect_to_url, redirect_to_url: {url, return_url}}``, the page the
  customer must visit (https://docs.stripe.com/payments/3d-secure/authentication-flow, "Manually
  handle 3D Secure authentication": "redirect your customer to next_action.redirect_to_url.url");
  without it, localstripe's ``use_stripe_sdk`` action stays (no URL, as on Stripe). The page
  here is a stand-in address on ``hooks.stripe.com`` naming the intent and its client
  secret; completing it is localstripe's own ``/_authenticate``.

``expand`` needs no patch: localstripe's handlers apply it to every answer, including
``latest_charge.balance_transaction`` on the create and the patched confirm (its
``latest_charge`` is always the charge object; the balance transaction is an id unless
expanded, as on Stripe).

Each refusal names what was wrong, as Stripe's messages do.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from localstripe import resources  # the server process's own localstripe
from localstripe.errors import UserError

__all__ = ["apply"]

_PaymentIntent: Any = resources.PaymentIntent

#: Statuses Stripe confirms from (the lifecycle's "waiting for the merchant or customer" ones).
_CONFIRMABLE = frozenset({"requires_payment_method", "requires_confirmation", "requires_action"})
#: Statuses Stripe cancels from (leaving out its rare cancelable ``processing``).
_CANCELABLE = frozenset(
    {"requires_payment_method", "requires_capture", "requires_confirmation", "requires_action"}
)
#: ``cancellation_reason`` values a caller may set.
_CANCELLATION_REASONS = frozenset({"duplicate", "fraudulent", "requested_by_customer", "abandoned"})


def _unexpected_state(intent: Any, action: str) -> UserError:
    return UserError(
        400,
        f"You cannot {action} this PaymentIntent because it has a status of {intent.status}.",
        {
            "code": "payment_intent_unexpected_state",
            "payment_intent": intent._export(),
        },
    )


def _retrieve(id: object) -> Any:
    if not (isinstance(id, str) and id.startswith("pi_")):
        raise UserError(400, f"Invalid payment intent id: {id!r}")
    return _PaymentIntent._api_retrieve(id)


def _checked_return_url(return_url: object) -> str | None:
    if return_url is None:
        return None
    if not (isinstance(return_url, str) and return_url.startswith(("https://", "http://"))):
        raise UserError(400, f"Invalid URL for return_url: {return_url!r}")
    return return_url


def _redirect_if_asked(intent: Any, return_url: str | None) -> None:
    """Stripe's redirect action for an intent waiting for 3-D Secure, when the confirmation
    named where the customer returns to."""
    if return_url is None or intent.status != "requires_action":
        return
    intent.next_action = {
        "type": "redirect_to_url",
        "redirect_to_url": {
            "url": "https://hooks.stripe.com/3d_secure_2/hosted?payment_intent="
            f"{intent.id}&payment_intent_client_secret={intent.client_secret}",
            "return_url": return_url,
        },
    }


_original_create: Any = _PaymentIntent._api_create.__func__


def _create(cls: Any, /, return_url: object = None, **data: Any) -> Any:
    checked = _checked_return_url(return_url)
    if checked is not None and resources.try_convert_to_bool(data.get("confirm")) is not True:
        raise UserError(400, "return_url can only be used with confirm=true")
    intent = _original_create(cls, **data)
    _redirect_if_asked(intent, checked)
    return intent


def _confirm(
    cls: Any,
    /,
    id: object,
    payment_method: object = None,
    off_session: object = None,
    return_url: object = None,
    **kwargs: Any,
) -> Any:
    if kwargs:
        raise UserError(400, "Unexpected " + ", ".join(kwargs.keys()))
    off_session = resources.try_convert_to_bool(off_session)
    if off_session is not None and not isinstance(off_session, bool):
        raise UserError(400, f"Invalid boolean for off_session: {off_session!r}")
    if payment_method is not None and not (
        isinstance(payment_method, str) and payment_method.startswith(("pm_", "src_", "card_"))
    ):
        raise UserError(400, f"Invalid payment_method: {payment_method!r}")
    intent = _retrieve(id)
    if intent.status not in _CONFIRMABLE:
        raise _unexpected_state(intent, "confirm")
    if payment_method is not None:
        resources.PaymentMethod._api_retrieve(payment_method)  # 404 if it does not exist
        intent.payment_method = payment_method
    if intent.payment_method is None:
        raise UserError(
            400,
            "You cannot confirm this PaymentIntent because it's missing a payment method. "
            "Provide a payment_method.",
            {"code": "payment_intent_unexpected_state"},
        )
    # A new confirmation: the old authentication and the failed charge are the past. Keep the
    # failed charge as latest_charge until a new one replaces it (Stripe does too), but
    # localstripe derives the status from these fields, and creates a charge only from
    # ``requires_confirmation``.
    previous_charge = intent.latest_charge
    intent.next_action = None
    intent._authentication_failed = False
    intent.latest_charge = None
    checked = _checked_return_url(return_url)
    try:
        intent._confirm(on_failure_now=intent._report_failure)
    finally:
        if intent.latest_charge is None:
            # Waiting for authentication again: no new charge was made.
            intent.latest_charge = previous_charge
    _redirect_if_asked(intent, checked)
    return intent


def _cancel(cls: Any, /, id: object, cancellation_reason: object = None, **kwargs: Any) -> Any:
    if kwargs:
        raise UserError(400, "Unexpected " + ", ".join(kwargs.keys()))
    if cancellation_reason is not None and cancellation_reason not in _CANCELLATION_REASONS:
        raise UserError(
            400,
            f"Invalid cancellation_reason: {cancellation_reason!r}; one of "
            + ", ".join(sorted(_CANCELLATION_REASONS)),
        )
    intent = _retrieve(id)
    if intent.status not in _CANCELABLE:
        raise _unexpected_state(intent, "cancel")
    intent._canceled = True
    intent.next_action = None
    intent.cancellation_reason = cancellation_reason
    intent.canceled_at = int(time.time())
    resources.schedule_webhook(resources.Event("payment_intent.canceled", intent))
    return intent


_original_report_failure: Any = _PaymentIntent._report_failure
_original_customer_create: Any = resources.Customer._api_create.__func__
_original_attach: Any = resources.PaymentMethod._api_attach.__func__


def _report_failure(self: Any) -> None:
    """localstripe's decline, answered as Stripe's card error: typed, with the intent."""
    try:
        _original_report_failure(self)
    except UserError as error:
        if error.code == 402:
            error.body["error"]["type"] = "card_error"
            error.body["error"]["payment_intent"] = self._export()
        raise


def _customer_create(cls: Any, /, **data: Any) -> Any:
    payment_method = data.get("payment_method")
    if isinstance(payment_method, str) and payment_method.startswith("pm_"):
        card = resources.PaymentMethod._api_retrieve(payment_method)  # 404 if unknown
        if getattr(card, "customer", None) is not None:
            raise UserError(
                400,
                "The payment method you provided has already been attached to a customer.",
            )
        if card._attaching_is_declined():
            raise UserError(
                402, "Your card was declined.", {"code": "card_declined", "type": "card_error"}
            )
    return _original_customer_create(cls, **data)


def _attach(cls: Any, /, id: object, customer: object = None, **kwargs: Any) -> Any:
    if isinstance(id, str) and isinstance(customer, str):
        card = resources.PaymentMethod._api_retrieve(id)
        owner = getattr(card, "customer", None)
        if owner is not None and owner != customer:
            raise UserError(
                400,
                "The payment method you provided has already been attached to a customer.",
            )
    return _original_attach(cls, id, customer=customer, **kwargs)


def apply() -> None:
    """Patch ``PaymentIntent`` confirm and cancel, and the route table the server builds its
    handlers from. Idempotent. Must run before ``localstripe.server`` is imported."""
    if "localstripe.server" in sys.modules:
        raise RuntimeError(
            "localstripe.server is already imported and has bound the unpatched confirm and "
            "cancel handlers; import billing.testing.localstripe_conformance before it"
        )
    confirm = classmethod(_confirm)
    cancel = classmethod(_cancel)
    _PaymentIntent._api_confirm = confirm
    _PaymentIntent._api_cancel = cancel
    _PaymentIntent._api_create = classmethod(_create)
    _PaymentIntent._report_failure = _report_failure
    resources.Customer._api_create = classmethod(_customer_create)
    resources.PaymentMethod._api_attach = classmethod(_attach)
    by_url = {
        "/v1/payment_intents/{id}/confirm": _PaymentIntent._api_confirm,
        "/v1/payment_intents/{id}/cancel": _PaymentIntent._api_cancel,
        "/v1/payment_methods/{id}/attach": resources.PaymentMethod._api_attach,
    }
    resources.extra_apis[:] = [
        (method, url, by_url.get(url, func)) for method, url, func in resources.extra_apis
    ]


apply()
