"""The daily reconciliation of charges, as pure rules: the provider's charges of the last days
against our attempts and payments. It finds what the money-safety bugs would leave behind in
production: a success nobody booked (late success), money taken with no attempt of ours, an
amount that is not the invoice's, a second success for one invoice, and attempts whose outcome
is still unknown. Amounts are integer minor units."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from billing.ledger import Severity


class FindingStatus(StrEnum):
    """Where finance is with a finding: ``open`` until resolved with a note (who, when, why).
    Only open ones count in the metric."""

    OPEN = "open"
    RESOLVED = "resolved"


class ChargeFindingKind(StrEnum):
    LATE_SUCCESS = "late_success"
    CHARGE_WITHOUT_ATTEMPT = "charge_without_attempt"
    FOREIGN_CHARGE = "foreign_charge"
    AMOUNT_MISMATCH = "amount_mismatch"
    DOUBLE_CHARGE = "double_charge"
    UNKNOWN_OUTCOME = "unknown_outcome"
    #: The PaymentIntent of an invoice that is void, written off or paid without it (by a
    #: credit note) was still open at Stripe: it could have been confirmed later. The daily
    #: reconciliation cancels it and reports it.
    OPEN_INTENT_CANCELED = "open_intent_canceled"


CHARGE_SEVERITY: dict[ChargeFindingKind, Severity] = {
    ChargeFindingKind.LATE_SUCCESS: Severity.ERROR,
    ChargeFindingKind.CHARGE_WITHOUT_ATTEMPT: Severity.ERROR,
    #: A charge of another integration on the same account: not ours to book.
    ChargeFindingKind.FOREIGN_CHARGE: Severity.INFO,
    ChargeFindingKind.AMOUNT_MISMATCH: Severity.ERROR,
    ChargeFindingKind.DOUBLE_CHARGE: Severity.ERROR,
    ChargeFindingKind.UNKNOWN_OUTCOME: Severity.WARNING,
    ChargeFindingKind.OPEN_INTENT_CANCELED: Severity.WARNING,
}

#: Statuses of a PaymentIntent that could still take money if confirmed
#: (https://docs.stripe.com/payments/paymentintents/lifecycle): cancelable.
CANCELABLE_INTENT_STATUSES = frozenset(
    {"requires_payment_method", "requires_confirmation", "requires_action", "requires_capture"}
)

#: An attempt still without an outcome this long after it was recorded is reported.
UNKNOWN_OUTCOME_AFTER = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class ProviderCharge:
    charge_id: str
    payment_intent_id: str | None
    amount_minor: int
    currency: str
    succeeded: bool
    customer_id: str | None = None
    created: datetime | None = None
    #: The invoice its PaymentIntent's metadata names (our charges carry it); a claim only:
    #: our records decide.
    invoice_id: str | None = None


@dataclass(frozen=True, slots=True)
class OurSide:
    """What our records hold for the charge's PaymentIntent (None fields: nothing)."""

    invoice_id: str | None
    invoice_amount_minor: int | None = None
    invoice_currency: str | None = None
    #: The invoice's recorded payment: its intent and charge.
    paid_by_intent: str | None = None
    paid_by_charge: str | None = None
    #: An attempt of this intent succeeded in our records.
    attempt_succeeded: bool = False
    #: The charge's provider customer is one of ours.
    customer_is_ours: bool = False


@dataclass(frozen=True, slots=True)
class ChargeFinding:
    kind: ChargeFindingKind
    subject_key: str
    detail: str
    invoice_id: str | None = None
    payment_intent_id: str | None = None
    charge_id: str | None = None
    amount_minor: int | None = None
    currency: str | None = None

    @property
    def severity(self) -> Severity:
        return CHARGE_SEVERITY[self.kind]


def reconcile_charge(charge: ProviderCharge, ours: OurSide) -> list[ChargeFinding]:
    """The differences one provider charge shows against our records."""
    if not charge.succeeded:
        return []

    def finding(kind: ChargeFindingKind, detail: str) -> ChargeFinding:
        return ChargeFinding(
            kind,
            charge.charge_id,
            detail,
            ours.invoice_id,
            charge.payment_intent_id,
            charge.charge_id,
            charge.amount_minor,
            charge.currency,
        )

    money = f"{charge.amount_minor} {charge.currency}"
    if ours.invoice_id is None:
        if ours.customer_is_ours:
            return [
                finding(
                    ChargeFindingKind.CHARGE_WITHOUT_ATTEMPT,
                    f"charge {charge.charge_id} ({money}) of our customer {charge.customer_id} "
                    f"belongs to no attempt of ours (intent {charge.payment_intent_id})",
                )
            ]
        return [
            finding(
                ChargeFindingKind.FOREIGN_CHARGE,
                f"charge {charge.charge_id} ({money}) is not from this service",
            )
        ]
    found = []
    if (ours.invoice_amount_minor, (ours.invoice_currency or "").upper()) != (
        charge.amount_minor,
        charge.currency.upper(),
    ):
        found.append(
            finding(
                ChargeFindingKind.AMOUNT_MISMATCH,
                f"charge {charge.charge_id} is {money}; invoice {ours.invoice_id} is "
                f"{ours.invoice_amount_minor} {ours.invoice_currency}",
            )
        )
    if ours.paid_by_charge is not None and ours.paid_by_charge != charge.charge_id:
        found.append(
            finding(
                ChargeFindingKind.DOUBLE_CHARGE,
                f"invoice {ours.invoice_id} is paid by {ours.paid_by_charge}, and charge "
                f"{charge.charge_id} ({money}) took money for it too: refund one",
            )
        )
    elif ours.paid_by_charge is None and not ours.attempt_succeeded:
        found.append(
            finding(
                ChargeFindingKind.LATE_SUCCESS,
                f"charge {charge.charge_id} ({money}) succeeded for invoice {ours.invoice_id}, "
                "which our records do not show paid by it",
            )
        )
    return found
