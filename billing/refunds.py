"""The provider's refunds, normalized: what the Stripe adapter returns for a refund, and the
part of the gateway that makes and reads them (Kill Bill's plugin shape, as
``billing.payments``). Amounts are integer minor units; currencies upper-case ISO 4217."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from billing.credit_notes import RefundReason, RefundStatus
from billing.payments import PaymentProviderError


@dataclass(frozen=True, slots=True)
class ProviderRefund:
    """One refund as the provider holds it."""

    refund_id: str
    charge_id: str | None
    payment_intent_id: str | None
    amount_minor: int
    currency: str
    status: RefundStatus
    #: The Idempotency-Key it was made with, as its metadata carries it (ours only).
    idempotency_key: str | None = None
    reason: str | None = None
    failure_reason: str | None = None
    balance_transaction_id: str | None = None
    created: datetime | None = None


class RefundGateway(Protocol):
    """Refunds at the payment provider. Implemented by ``StripeGateway``."""

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
        """Refund ``amount_minor`` of the charge. The key goes on the wire and in metadata:
        Stripe answers a repeated key with the first refund. A refusal that a retry cannot
        fix (over the refundable amount, a charge already fully refunded or disputed) raises
        PaymentProviderError; transient faults raise TransientPaymentError."""
        ...

    def find_refund(self, *, charge_id: str, idempotency_key: str) -> ProviderRefund | None:
        """The refund of the charge made with ``idempotency_key`` (by its metadata), or None:
        read before any send, so a refund whose answer was lost is never made again, even
        after Stripe forgot the key (24 hours)."""
        ...

    def retrieve_refund(self, *, refund_id: str) -> ProviderRefund:
        """The refund as the provider holds it now."""
        ...

    def list_charge_refunds(self, *, charge_id: str) -> list[ProviderRefund]:
        """Every refund of the charge, ours and those made elsewhere (the dashboard)."""
        ...


class RefundRefused(PaymentProviderError):
    """The provider refused to make the refund, for a reason a retry cannot fix: more than is
    left of the charge, a charge already refunded or disputed. A business outcome: the refund
    is recorded failed with this reason (never retried into a dead queue)."""
