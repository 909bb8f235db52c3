"""Normalized payment outcomes. The Stripe adapter maps every provider answer to one of these
at the edge; nothing past the adapter sees a Stripe object (Kill Bill's plugin shape)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Protocol


class ChargeOutcomeKind(StrEnum):
    PAID = "paid"
    SOFT_DECLINE = "soft_decline"
    HARD_DECLINE = "hard_decline"
    AUTHENTICATION_REQUIRED = "authentication_required"


#: Decline codes after which retrying the same card is pointless or harmful (card networks
#: penalise retries of these). Follows Stripe's non-retryable list for Smart Retries, plus the
#: codes its decline-code reference marks "do not retry" / "the customer must use another card".
HARD_DECLINE_CODES: frozenset[str] = frozenset(
    {
        "lost_card",
        "stolen_card",
        "pickup_card",
        "fraudulent",
        "merchant_blacklist",
        "restricted_card",
        "security_violation",
        "incorrect_number",
        "invalid_number",
        "invalid_account",
        "account_closed",
        "card_not_supported",
        "currency_not_supported",
        "expired_card",
        "do_not_try_again",
        "revocation_of_authorization",
        "revocation_of_all_authorizations",
        "stop_payment_order",
        "new_account_information_available",
        "transaction_not_allowed",
    }
)

AUTHENTICATION_CODES: frozenset[str] = frozenset(
    {"authentication_required", "card_authentication_required"}
)


def classify_decline(error_code: str | None, decline_code: str | None) -> ChargeOutcomeKind:
    """Map a provider decline to soft, hard or authentication-required.

    ``decline_code`` (the issuer's reason) wins over the generic ``error_code``
    (``card_declined``, ``expired_card``, ...). Anything unknown is soft: retrying a soft decline
    on the dunning schedule is safe, while wrongly calling it hard would give up on money.
    """
    # The issuer's reason, when there is one, decides alone: a soft decline_code such as
    # insufficient_funds stays soft whatever generic error_code came with it.
    code = decline_code or error_code
    if code in AUTHENTICATION_CODES:
        return ChargeOutcomeKind.AUTHENTICATION_REQUIRED
    if code in HARD_DECLINE_CODES:
        return ChargeOutcomeKind.HARD_DECLINE
    return ChargeOutcomeKind.SOFT_DECLINE


@dataclass(frozen=True)
class SettlementDetails:
    """What the customer paid (the charge: matches the invoice) and what the account received
    (the balance transaction, in the account's settlement currency, which may differ).
    Minor units; settlement fields are None when the provider reports no balance transaction."""

    charge_id: str | None
    #: The charge's amount and currency, as presented to the customer.
    amount_minor: int
    currency: str
    fee_minor: int | None
    net_minor: int | None
    balance_transaction_id: str | None
    #: Gross, fee and net are in this currency; ``fee + net == settlement_amount``.
    settlement_amount_minor: int | None = None
    settlement_currency: str | None = None


@dataclass(frozen=True)
class ChargeOutcome:
    """What one charge attempt produced, in domain terms. Amounts in minor units."""

    kind: ChargeOutcomeKind
    payment_intent_id: str | None = None
    #: AUTHENTICATION_REQUIRED: the page where the customer authenticates, as the provider
    #: gave it (Stripe's ``next_action.redirect_to_url.url``); None when it gave none.
    authentication_url: str | None = None
    charge_id: str | None = None
    decline_code: str | None = None
    failure_message: str | None = None
    amount_minor: int = 0
    currency: str = ""
    #: A paid outcome's settlement, when the provider's answer to the charge itself carried
    #: it (the charge and its balance transaction expanded): recorded with the outcome, no
    #: read after the charge. None: read it with ``settlement_details``.
    settlement: SettlementDetails | None = None


@dataclass(frozen=True)
class PaymentIntentCancellation:
    """What canceling an invoice's PaymentIntent found. Exactly one of ``canceled`` and
    ``paid`` holds: an intent that succeeded cannot be canceled, and the money must be
    recorded instead."""

    payment_intent_id: str
    #: The intent is canceled (by this call or an earlier one): nobody can pay it any more.
    canceled: bool
    #: The intent had already succeeded: the payment it took (kind PAID).
    paid: ChargeOutcome | None = None


@dataclass(frozen=True)
class AttachedPaymentMethod:
    payment_method_id: str
    card_brand: str | None = None
    card_last4: str | None = None


@dataclass(frozen=True)
class ProviderCustomer:
    """A provider customer just created, with the card attached as its default (None: it was
    created without one)."""

    provider_customer_id: str
    payment_method: AttachedPaymentMethod | None = None


class TransientPaymentError(Exception):
    """The provider could not be reached or answered 5xx / 429. Safe to retry with the same
    idempotency key; activities let it propagate so Temporal's RetryPolicy retries."""


class PaymentProviderError(Exception):
    """The provider refused the request for a reason retrying cannot fix (bad API key,
    invalid parameters, idempotency key reused with other parameters). Non-retryable."""


class PaymentGateway(Protocol):
    """The payment plugin interface (Kill Bill's shape): returns normalized domain results.
    Implemented by ``activities.stripe_gateway.StripeGateway``."""

    def ensure_customer(self, *, customer_id: str, email: str | None, name: str | None) -> str:
        """Provider customer id for our customer, created once (idempotent per customer_id)."""
        ...

    def create_customer(
        self,
        *,
        customer_id: str,
        email: str | None,
        name: str | None,
        payment_method_id: str | None,
    ) -> ProviderCustomer:
        """Create the provider customer for our ``customer_id`` with ``payment_method_id``
        attached and made its default, in one request where the provider allows it. Retried
        with the same card it answers the same customer. Raises
        billing.errors.PaymentMethodRejected if the card is refused (no customer is made)."""
        ...

    def attach_payment_method(
        self, *, provider_customer_id: str, payment_method_id: str
    ) -> AttachedPaymentMethod:
        """Attach and make default. Raises billing.errors.PaymentMethodRejected if refused."""
        ...

    def default_payment_method(self, *, provider_customer_id: str) -> str | None: ...

    def detach_payment_method(self, *, payment_method_id: str) -> None:
        """Detach the card from its customer (a signup that can never start gives back what
        it attached). Done when it is already detached; transient faults raise."""
        ...

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
        """One off-session charge on a new PaymentIntent: an invoice's first attempt creates
        the intent that its later attempts confirm (``confirm_payment_intent``). Declines are
        returned; transient faults raise TransientPaymentError; misconfiguration raises
        PaymentProviderError."""
        ...

    def confirm_payment_intent(
        self,
        *,
        payment_intent_id: str,
        payment_method_id: str,
        amount_minor: int,
        currency: str,
        idempotency_key: str,
    ) -> ChargeOutcome:
        """Charge an invoice's existing PaymentIntent again, off-session, on
        ``payment_method_id`` (a new card replaces the one that failed or needed
        authentication). An intent that already succeeded is reported PAID, never charged
        twice. Declines are returned; faults raise as for ``charge``."""
        ...

    def cancel_payment_intent(self, *, payment_intent_id: str) -> PaymentIntentCancellation:
        """Cancel the PaymentIntent so nobody can pay it any more; idempotent. One that
        already succeeded is reported as ``paid``; one still processing raises
        TransientPaymentError (ask again later)."""
        ...

    def update_payment_intent_amount(
        self,
        *,
        payment_intent_id: str,
        amount_minor: int,
        currency: str,
        idempotency_key: str | None = None,
    ) -> int:
        """Set the amount (minor units) of the invoice's PaymentIntent before it is confirmed
        again (a credit note lowered the invoice). Returns the amount the provider now holds.
        An intent that succeeded or was canceled is refused: PaymentProviderError."""
        ...

    def settlement_details(
        self, *, payment_intent_id: str, charge_id: str | None
    ) -> SettlementDetails: ...

    def payment_intent_outcome(self, *, payment_intent_id: str) -> ChargeOutcome:
        """Current state of a payment intent (used after the customer authenticates)."""
        ...

    def find_charge_attempt(
        self, *, provider_customer_id: str, idempotency_key: str, created_after: datetime
    ) -> ChargeOutcome | None:
        """The normalized outcome of the charge that ``charge`` created with
        ``idempotency_key`` for this customer at or after ``created_after`` (aware UTC), or
        None if the provider holds no such charge.

        Our own record of what was sent, for when the provider's idempotency key may have
        expired: None means a charge with this key was never created, so sending it is safe.
        Reads only; transient faults raise TransientPaymentError."""
        ...
