"""Make localstripe play Stripe's documented settlement behaviour, in the localstripe server
process only (imported by ``billing.testing.localstripe_server`` beside the conformance patch).

localstripe 1.15 reports every fee as 0, refuses Stripe's ``reason`` on refunds, refunds more
than a charge holds, and sends no refund events. Patched here, each as Stripe documents it:

* **Fees** (https://stripe.com/pricing, https://docs.stripe.com/api/balance_transactions/object):
  a charge's balance transaction carries Stripe's standard card fee, 2.9% of the amount plus
  30 minor units, rounded half up to the minor unit, in ``fee`` and ``fee_details`` (one
  ``stripe_fee``); ``net = amount - fee``. A refund's balance transaction has no fee (Stripe
  keeps the original fee).
* **Refunds** (https://docs.stripe.com/api/refunds/create): ``reason`` is one of
  ``duplicate``, ``fraudulent``, ``requested_by_customer`` and is kept on the refund;
  ``metadata`` is kept. A refund over what is left of the charge is refused with HTTP 400
  ``amount_too_large``; one of a fully refunded charge with ``charge_already_refunded``; one of
  a disputed charge with ``charge_disputed``
  (https://docs.stripe.com/error-codes). Each refund sends ``refund.created`` and
  ``charge.refunded`` (the charge, with ``amount_refunded`` and ``refunded``), as Stripe does
  (https://docs.stripe.com/api/events/types).
* **Refund updates**: Stripe moves a refund to ``failed`` (the card is closed) or from
  ``pending`` to ``succeeded`` on its own; a test asks for that with
  ``POST /_config/settlement/refunds/{id}/status`` (``status``, ``failure_reason``), which sends
  ``charge.refund.updated`` and ``refund.updated``. ``POST /_config/settlement`` with
  ``refund_status=pending`` makes new refunds stay pending (asynchronous methods) until then.

Nothing of localstripe is copied; its objects and store are used as they are.
"""

from __future__ import annotations

from typing import Any

from localstripe import resources  # the server process's own localstripe
from localstripe.errors import UserError

__all__ = ["apply", "stripe_fee"]

_Refund: Any = resources.Refund
_Charge: Any = resources.Charge
_BalanceTransaction: Any = resources.BalanceTransaction

_REFUND_REASONS = frozenset({"duplicate", "fraudulent", "requested_by_customer"})
_REFUND_STATUSES = frozenset({"pending", "succeeded", "failed", "canceled", "requires_action"})
_FAILURE_REASONS = frozenset(
    {
        "charge_for_pending_refund_disputed",
        "declined",
        "expired_or_canceled_card",
        "insufficient_funds",
        "lost_or_stolen_card",
        "merchant_request",
        "unknown",
    }
)

#: The test's wishes for refunds made from now on (``/_settlement/config``).
_config: dict[str, Any] = {"refund_status": "succeeded"}


def stripe_fee(amount_minor: int) -> int:
    """Stripe's standard card fee on a charge: 2.9% + 30 minor units, rounded half up."""
    return (amount_minor * 29 + 500) // 1000 + 30


def _schedule(event_type: str, obj: Any) -> None:
    resources.schedule_webhook(resources.Event(event_type, obj))


_original_balance_transaction_init = _BalanceTransaction.__init__


def _balance_transaction_init(self: Any, *args: Any, **kwargs: Any) -> None:
    _original_balance_transaction_init(self, *args, **kwargs)
    if self.type == "charge" and self.amount > 0:
        self.fee = stripe_fee(self.amount)
        self.fee_details = [
            {
                "amount": self.fee,
                "application": None,
                "currency": self.currency,
                "description": "Stripe processing fees",
                "type": "stripe_fee",
            }
        ]


def _charge_disputed(charge: Any) -> bool:
    return any(
        key.startswith("dispute:") and getattr(obj, "charge", None) == charge.id
        for key, obj in resources.store.items()
    )


_original_refund_create = _Refund._api_create


def _refund_create(cls: Any, /, reason: object = None, **data: Any) -> Any:
    if reason is not None and reason not in _REFUND_REASONS:
        raise UserError(
            400,
            f"Invalid reason: must be one of {', '.join(sorted(_REFUND_REASONS))}",
            {"code": "parameter_invalid_string", "param": "reason"},
        )
    charge_id = data.get("charge")
    if charge_id is None and isinstance(data.get("payment_intent"), str):
        intent = resources.PaymentIntent._api_retrieve(data["payment_intent"])
        charge_id = intent.latest_charge.id if intent.latest_charge is not None else None
    if isinstance(charge_id, str):
        charge = _Charge._api_retrieve(charge_id)
        left = charge.amount - charge.amount_refunded
        amount = resources.try_convert_to_int(data.get("amount"))
        if _charge_disputed(charge):
            raise UserError(
                400,
                f"Charge {charge.id} has been charged back; cannot issue a refund.",
                {"code": "charge_disputed", "charge": charge.id},
            )
        if left <= 0:
            raise UserError(
                400,
                f"Charge {charge.id} has already been refunded.",
                {"code": "charge_already_refunded", "charge": charge.id},
            )
        if isinstance(amount, int) and amount > left:
            raise UserError(
                400,
                f"Refund amount ({amount}) is greater than unrefunded amount on charge ({left})",
                {"code": "amount_too_large", "param": "amount"},
            )
    refund = _original_refund_create(**data)
    refund.reason = reason
    refund.failure_reason = None
    status = _config["refund_status"]
    if status != "succeeded":
        refund.status = status
    _schedule("refund.created", refund)
    _schedule("charge.refunded", _Charge._api_retrieve(refund.charge))
    return refund


def _refund_set_status(
    id: object, status: object = None, failure_reason: object = None, **kwargs: Any
) -> Any:
    if kwargs:
        raise UserError(400, "Unexpected " + ", ".join(kwargs.keys()))
    if status not in _REFUND_STATUSES:
        raise UserError(400, f"Invalid status: one of {', '.join(sorted(_REFUND_STATUSES))}")
    if failure_reason is not None and failure_reason not in _FAILURE_REASONS:
        raise UserError(
            400, f"Invalid failure_reason: one of {', '.join(sorted(_FAILURE_REASONS))}"
        )
    if not isinstance(id, str):
        raise UserError(400, "Bad request")
    refund = _Refund._api_retrieve(id)
    refund.status = status
    refund.failure_reason = failure_reason if status == "failed" else None
    _schedule("charge.refund.updated", refund)
    _schedule("refund.updated", refund)
    return refund


def _set_config(refund_status: object = None, **kwargs: Any) -> Any:
    if kwargs:
        raise UserError(400, "Unexpected " + ", ".join(kwargs.keys()))
    if refund_status is not None:
        if refund_status not in _REFUND_STATUSES:
            raise UserError(400, f"Invalid refund_status: {refund_status!r}")
        _config["refund_status"] = refund_status
    return _ConfigView()


class _ConfigView:
    def _export(self, expand: object = None) -> dict[str, Any]:
        return dict(_config)


def apply() -> None:
    """Patch fees and refunds, and add the test routes. Idempotent. Must run before
    ``localstripe.server`` is imported (it binds the extra routes then)."""
    if getattr(_Refund, "_settlement_patched", False):
        return
    _BalanceTransaction.__init__ = _balance_transaction_init
    _Refund._api_create = classmethod(_refund_create)
    _Refund._settlement_patched = True
    resources.extra_apis.extend(
        (
            ("POST", "/_config/settlement/refunds/{id}/status", _refund_set_status),
            ("POST", "/_config/settlement", _set_config),
        )
    )


apply()
