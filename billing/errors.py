"""Domain errors. Each message says what was wrong and what to do about it."""

from __future__ import annotations


class BillingError(Exception):
    """Base class for every error the billing domain raises on purpose."""

    #: A short machine-readable code, stable across releases (used by the API and CLI).
    code: str = "billing_error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidInput(BillingError):
    """A value is out of range or malformed."""

    code = "invalid_input"


class InvalidCurrency(InvalidInput):
    code = "invalid_currency"


class InvalidTimezone(InvalidInput):
    code = "invalid_timezone"


class UnknownPlan(BillingError):
    code = "unknown_plan"


class PlanArchived(UnknownPlan):
    """The plan exists but is archived: it takes no new signups or changes to it."""

    code = "plan_archived"


class MissingPaymentMethod(BillingError):
    code = "missing_payment_method"


class PaymentMethodRejected(BillingError):
    """The payment provider refused to attach the card (declined at attach)."""

    code = "payment_method_rejected"


class ChangeRefused(BillingError):
    """A subscription change that the subscription's current state does not allow."""

    code = "change_refused"


class NotFound(BillingError):
    code = "not_found"


class IdempotencyConflict(BillingError):
    """The idempotency key was already used with a different request body."""

    code = "idempotency_conflict"


class SignupInProgress(BillingError):
    """Another signup for the same customer is running; retry once it has finished."""

    code = "signup_in_progress"
