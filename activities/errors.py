"""How an activity's failure reaches Temporal: shared by every activity class."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from temporalio.exceptions import ApplicationError

from billing.errors import BillingError
from billing.payments import PaymentProviderError

F = TypeVar("F", bound=Callable[..., Any])


def domain_errors_are_final(fn: F) -> F:
    """Domain errors become non-retryable ApplicationErrors typed by the error's class name;
    a provider misconfiguration too. Everything else propagates and is retried."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BillingError as error:
            raise ApplicationError(
                error.message, type=type(error).__name__, non_retryable=True
            ) from error
        except PaymentProviderError as error:
            raise ApplicationError(
                str(error), type="PaymentProviderError", non_retryable=True
            ) from error

    return wrapper  # type: ignore[return-value]
