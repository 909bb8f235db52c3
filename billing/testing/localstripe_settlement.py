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

* **Disputes** (https://docs.stripe.com/api/disputes/object,
  https://docs.stripe.com/disputes/how-disputes-work): ``POST
  /_config/settlement/charges/{id}/dispute`` (``reason``, ``status`` ``needs_response`` or
  ``warning_needs_response``) opens one as a cardholder would; a chargeback withdraws the amount
  plus Stripe's 15.00 dispute fee at once (an ``adjustment`` balance transaction, reporting
  category ``dispute``) and sends ``charge.dispute.created`` and
  ``charge.dispute.funds_withdrawn``; an inquiry moves no money. ``POST
  /_config/settlement/disputes/{id}/close`` (``status`` ``won`` or ``lost``) closes it: won gives
  the amount and the fee back (``dispute_reversal``) with ``charge.dispute.funds_reinstated``;
  both send ``charge.dispute.closed``. ``GET /v1/disputes/{id}`` and ``GET /v1/disputes``
  read them. A disputed charge refuses refunds (``charge_disputed``).
* **Automatic payouts** (https://docs.stripe.com/payouts,
  https://docs.stripe.com/api/balance_transactions/list): ``POST
  /_config/settlement/payouts/run`` is one day's payout run: per currency, every balance
  transaction available and in no payout yet is batched into one automatic payout of their
  net sum (when positive), with its own ``payout`` balance transaction; it sends
  ``payout.created`` and, with ``paid=true`` (default), ``payout.paid``. ``GET
  /v1/balance_transactions?payout=po_...`` lists what a payout paid out (the payout's own
  transaction included), as Stripe does for automatic payouts; ``type`` and ``created`` filter
  too. A test can make a balance transaction's amounts differ from its source
  (``POST /_config/settlement/balance_transactions/{id}``: ``fee``) or add one that is not ours
  (``POST /_config/settlement/balance_transactions`` with ``amount``, ``currency``,
  ``description``: a charge from another integration).

Nothing of localstripe is copied; its objects and store are used as they are.
"""

from __future__ import annotations

import time
from typing import Any

from localstripe import resources  # the server process's own localstripe
from localstripe.errors import UserError

from billing.testing.localstripe_index import objects_of

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
    # The store's disputes only (localstripe_index), not a scan of everything stored.
    return any(getattr(obj, "charge", None) == charge.id for obj in objects_of("dispute"))


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


# ---- balance transactions of every type -----------------------------------------------------

#: Stripe's dispute fee (USD 15.00; minor units of the dispute's currency here).
DISPUTE_FEE_MINOR = 1500


def _new_balance_transaction(
    *,
    amount: int,
    currency: str,
    type: str,
    reporting_category: str,
    source: str | None,
    fee: int = 0,
    description: str | None = None,
) -> Any:
    """A balance transaction of any of Stripe's types (localstripe's own constructor takes only
    charge and refund)."""
    txn = object.__new__(_BalanceTransaction)
    resources.StripeObject.__init__(txn)
    txn.amount = amount
    txn.available_on = txn.created
    txn.currency = currency
    txn.description = description
    txn.exchange_rate = None
    txn.fee = fee
    txn.fee_details = (
        [
            {
                "amount": fee,
                "application": None,
                "currency": currency,
                "description": description,
                "type": "stripe_fee",
            }
        ]
        if fee
        else []
    )
    txn.reporting_category = reporting_category
    txn.source = source
    txn.status = "available"
    txn.type = type
    return txn


def _within(created: int, op: str, bound: int) -> bool:
    if op == "gt":
        return created > bound
    if op == "gte":
        return created >= bound
    if op == "lt":
        return created < bound
    return created <= bound


def _list_balance_transactions(
    cls: Any,
    /,
    url: str,
    limit: object = None,
    starting_after: object = None,
    payout: object = None,
    type: object = None,
    created: object = None,
    **kwargs: Any,
) -> Any:
    if kwargs:
        raise UserError(400, "Unexpected " + ", ".join(kwargs.keys()))
    li = resources.StripeObject._api_list_all.__func__(cls, url, limit, starting_after)
    items = li._list
    if payout is not None:
        if not (isinstance(payout, str) and payout.startswith("po_")):
            raise UserError(400, f"Invalid payout: {payout!r}")
        resources.Payout._api_retrieve(payout)  # 404 if it does not exist
        items = [t for t in items if getattr(t, "_payout", None) == payout]
    if type is not None:
        items = [t for t in items if t.type == type]
    if created is not None:
        if not isinstance(created, dict) or not created:
            raise UserError(400, "created must be a range such as created[gte]=1700000000")
        for op, value in created.items():
            bound = resources.try_convert_to_int(value)
            if op not in ("gt", "gte", "lt", "lte") or not isinstance(bound, int):
                raise UserError(400, f"Invalid created[{op}]")
            items = [t for t in items if _within(int(t.created), op, bound)]
    items.sort(key=lambda t: t.created, reverse=True)
    li._list = items
    return li


def _add_balance_transaction(
    amount: object = None, currency: object = None, description: object = None, **kwargs: Any
) -> Any:
    """A charge that is not ours (another integration on the account)."""
    if kwargs:
        raise UserError(400, "Unexpected " + ", ".join(kwargs.keys()))
    value = resources.try_convert_to_int(amount)
    if not isinstance(value, int) or value <= 0 or not isinstance(currency, str):
        raise UserError(400, "amount (> 0) and currency are required")
    return _new_balance_transaction(
        amount=value,
        currency=currency.lower(),
        type="charge",
        reporting_category="charge",
        source=f"ch_foreign{resources.random_id(10)}",
        fee=stripe_fee(value),
        description=description if isinstance(description, str) else "not ours",
    )


def _alter_balance_transaction(id: object, fee: object = None, **kwargs: Any) -> Any:
    if kwargs:
        raise UserError(400, "Unexpected " + ", ".join(kwargs.keys()))
    if not isinstance(id, str):
        raise UserError(400, "Bad request")
    txn = _BalanceTransaction._api_retrieve(id)
    value = resources.try_convert_to_int(fee)
    if not isinstance(value, int) or value < 0:
        raise UserError(400, "fee must be a whole number >= 0")
    txn.fee = value
    txn.fee_details = [
        {
            "amount": value,
            "application": None,
            "currency": txn.currency,
            "description": "Stripe processing fees",
            "type": "stripe_fee",
        }
    ]
    return txn


# ---- disputes ---------------------------------------------------------------------------------


class Dispute(resources.StripeObject):  # type: ignore[misc]
    object = "dispute"
    _id_prefix = "dp_"

    def __init__(self, charge: Any, reason: str, status: str) -> None:
        super().__init__()
        self.amount = charge.amount
        self.currency = charge.currency
        self.charge = charge.id
        self.payment_intent = getattr(charge, "payment_intent", None)
        self.reason = reason
        self.status = status
        self.is_charge_refundable = False
        self.balance_transactions: list[Any] = []
        self.evidence_details = {
            "due_by": self.created + 7 * 24 * 3600,
            "has_evidence": False,
            "past_due": False,
            "submission_count": 0,
        }
        self.metadata: dict[str, str] = {}

    @classmethod
    def _api_create(cls, **data: Any) -> Any:
        raise UserError(405, "Method Not Allowed")

    @classmethod
    def _api_update(cls, id: Any, **data: Any) -> Any:
        raise UserError(405, "Method Not Allowed")

    @classmethod
    def _api_delete(cls, id: Any) -> Any:
        raise UserError(405, "Method Not Allowed")

    @classmethod
    def _api_list_all(
        cls,
        url: str,
        limit: Any = None,
        starting_after: Any = None,
        charge: Any = None,
        **kwargs: Any,
    ) -> Any:
        if kwargs:
            raise UserError(400, "Unexpected " + ", ".join(kwargs.keys()))
        li = resources.StripeObject._api_list_all.__func__(cls, url, limit, starting_after)
        if charge is not None:
            li._list = [d for d in li._list if d.charge == charge]
        li._list.sort(key=lambda d: d.created, reverse=True)
        return li


_DISPUTE_REASONS = frozenset(
    {
        "bank_cannot_process",
        "credit_not_processed",
        "customer_initiated",
        "debit_not_authorized",
        "duplicate",
        "fraudulent",
        "general",
        "incorrect_account_details",
        "insufficient_funds",
        "product_not_received",
        "product_unacceptable",
        "subscription_canceled",
        "unrecognized",
    }
)


def _open_dispute(
    id: object, reason: object = "fraudulent", status: object = "needs_response", **kwargs: Any
) -> Any:
    if kwargs:
        raise UserError(400, "Unexpected " + ", ".join(kwargs.keys()))
    if reason not in _DISPUTE_REASONS or status not in ("needs_response", "warning_needs_response"):
        raise UserError(400, "Invalid reason or status")
    if not isinstance(id, str):
        raise UserError(400, "Bad request")
    charge = _Charge._api_retrieve(id)
    dispute = Dispute(charge, str(reason), str(status))
    if status == "needs_response":
        withdrawal = _new_balance_transaction(
            amount=-dispute.amount,
            currency=dispute.currency,
            type="adjustment",
            reporting_category="dispute",
            source=dispute.id,
            fee=DISPUTE_FEE_MINOR,
            description=f"Chargeback withdrawal for {charge.id}",
        )
        dispute.balance_transactions = [withdrawal]
    _schedule("charge.dispute.created", dispute)
    if status == "needs_response":
        _schedule("charge.dispute.funds_withdrawn", dispute)
    return dispute


def _close_dispute(id: object, status: object = None, **kwargs: Any) -> Any:
    if kwargs:
        raise UserError(400, "Unexpected " + ", ".join(kwargs.keys()))
    if status not in ("won", "lost") or not isinstance(id, str):
        raise UserError(400, "status must be won or lost")
    dispute = Dispute._api_retrieve(id)
    if dispute.status in ("won", "lost", "warning_closed"):
        raise UserError(400, f"Dispute {id} is already closed ({dispute.status}).")
    inquiry = dispute.status.startswith("warning_")
    dispute.status = "warning_closed" if inquiry else status
    if status == "won" and not inquiry:
        reinstated = _new_balance_transaction(
            amount=dispute.amount,
            currency=dispute.currency,
            type="adjustment",
            reporting_category="dispute_reversal",
            source=dispute.id,
            fee=-DISPUTE_FEE_MINOR,
            description=f"Chargeback reversal for {dispute.charge}",
        )
        dispute.balance_transactions = [*dispute.balance_transactions, reinstated]
        _schedule("charge.dispute.funds_reinstated", dispute)
    _schedule("charge.dispute.closed", dispute)
    return dispute


# ---- automatic payouts ---------------------------------------------------------------------


def _run_payouts(paid: object = "true", **kwargs: Any) -> Any:
    if kwargs:
        raise UserError(400, "Unexpected " + ", ".join(kwargs.keys()))
    now = int(time.time())
    by_currency: dict[str, list[Any]] = {}
    for key, obj in list(resources.store.items()):
        if not key.startswith("balance_transaction:"):
            continue
        if getattr(obj, "_payout", None) is not None or obj.type == "payout":
            continue
        if obj.available_on <= now and obj.status == "available":
            by_currency.setdefault(obj.currency, []).append(obj)
    made = []
    for currency, batch in sorted(by_currency.items()):
        net = sum(t.amount - t.fee for t in batch)
        if net <= 0:
            continue  # Stripe waits for a positive balance
        payout = object.__new__(resources.Payout)
        resources.StripeObject.__init__(payout)
        payout.amount = net
        payout.currency = currency
        payout.description = "STRIPE PAYOUT"
        payout.destination = "ba_settlementdouble"
        payout.metadata = {}
        payout.method = "standard"
        payout.source_type = "card"
        payout.statement_descriptor = ""
        payout.arrival_date = now + 2 * 24 * 3600
        payout.automatic = True
        payout.failure_balance_transaction = None
        payout.failure_code = None
        payout.failure_message = None
        payout.original_payout = None
        payout.reversed_by = None
        payout.status = "paid" if str(paid).lower() == "true" else "pending"
        payout.type = "bank_account"
        own = _new_balance_transaction(
            amount=-net,
            currency=currency,
            type="payout",
            reporting_category="payout",
            source=payout.id,
            description="STRIPE PAYOUT",
        )
        payout.balance_transaction = own.id
        for txn in [*batch, own]:
            txn._payout = payout.id
        _schedule("payout.created", payout)
        if payout.status == "paid":
            _schedule("payout.paid", payout)
        made.append(payout)
    return _Listed(made)


def _list_payouts(
    cls: Any,
    /,
    url: str,
    limit: Any = None,
    starting_after: Any = None,
    created: Any = None,
    status: Any = None,
    **kwargs: Any,
) -> Any:
    """Stripe's payout list filters ``created`` (a range) and ``status``."""
    if kwargs:
        raise UserError(400, "Unexpected " + ", ".join(kwargs.keys()))
    li = resources.StripeObject._api_list_all.__func__(cls, url, limit, starting_after)
    items = li._list
    if status is not None:
        items = [p for p in items if p.status == status]
    if created is not None:
        if not isinstance(created, dict) or not created:
            raise UserError(400, "created must be a range such as created[gte]=1700000000")
        for op, value in created.items():
            bound = resources.try_convert_to_int(value)
            if op not in ("gt", "gte", "lt", "lte") or not isinstance(bound, int):
                raise UserError(400, f"Invalid created[{op}]")
            items = [p for p in items if _within(int(p.created), op, bound)]
    items.sort(key=lambda p: p.created, reverse=True)
    li._list = items
    return li


def _list_disputes(**data: Any) -> Any:
    return Dispute._api_list_all("/v1/disputes", **data)


class _Listed:
    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def _export(self, expand: object = None) -> dict[str, Any]:
        return {"object": "list", "data": [item._export() for item in self.items]}


_original_intent_update = resources.PaymentIntent._api_update
_INTENT_UPDATABLE = frozenset(
    {"requires_payment_method", "requires_confirmation", "requires_action"}
)


def _intent_update(cls: Any, /, id: Any, **data: Any) -> Any:
    """Stripe's update of a PaymentIntent's ``amount``: a whole number of minor units (stored
    as a number, where localstripe kept the form's text), only while the intent has not
    succeeded, been canceled or started processing (``payment_intent_unexpected_state``)."""
    if "amount" in data:
        amount = resources.try_convert_to_int(data["amount"])
        if not isinstance(amount, int) or amount < 1:
            raise UserError(400, "Invalid positive integer", {"param": "amount"})
        intent = resources.PaymentIntent._api_retrieve(id)
        if intent.status not in _INTENT_UPDATABLE:
            raise UserError(
                400,
                f"You cannot update this PaymentIntent because it has a status of {intent.status}.",
                {"code": "payment_intent_unexpected_state"},
            )
        data["amount"] = amount
    return _original_intent_update(id, **data)


def apply() -> None:
    """Patch fees and refunds, and add the test routes. Idempotent. Must run before
    ``localstripe.server`` is imported (it binds the extra routes then)."""
    if getattr(_Refund, "_settlement_patched", False):
        return
    _BalanceTransaction.__init__ = _balance_transaction_init
    _BalanceTransaction._api_list_all = classmethod(_list_balance_transactions)
    resources.Payout._api_list_all = classmethod(_list_payouts)
    resources.PaymentIntent._api_update = classmethod(_intent_update)
    _Refund._api_create = classmethod(_refund_create)
    _Refund._settlement_patched = True
    resources.extra_apis.extend(
        (
            ("POST", "/_config/settlement/refunds/{id}/status", _refund_set_status),
            ("POST", "/_config/settlement", _set_config),
            ("POST", "/_config/settlement/charges/{id}/dispute", _open_dispute),
            ("POST", "/_config/settlement/disputes/{id}/close", _close_dispute),
            ("POST", "/_config/settlement/payouts/run", _run_payouts),
            ("POST", "/_config/settlement/balance_transactions/{id}", _alter_balance_transaction),
            ("POST", "/_config/settlement/balance_transactions", _add_balance_transaction),
            ("GET", "/v1/disputes/{id}", Dispute._api_retrieve),
            ("GET", "/v1/disputes", _list_disputes),
        )
    )


apply()
