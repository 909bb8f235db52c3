"""One error shape for every answer that is not a success:

    {"error": {"type": "invalid_input", "message": "what was wrong and what to do", "field": ...}}

Domain errors map to statuses here; request validation errors are rewritten to name the field
and what was wrong; refusals from the subscription workflow keep the workflow's reason. Nothing
unexpected ever shows a stack trace: it is logged with a reference the caller can quote.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from temporalio.client import WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from billing.card_data import redact_card_numbers
from billing.errors import (
    BillingError,
    ChangeRefused,
    IdempotencyConflict,
    InvalidInput,
    MissingPaymentMethod,
    NotFound,
    PaymentMethodRejected,
    SignupInProgress,
    UnknownPlan,
)

logger = logging.getLogger("billing.api")

#: HTTP status of each domain error (the most specific class in the MRO wins).
STATUS_BY_ERROR: dict[type[BillingError], int] = {
    InvalidInput: 422,  # also InvalidCurrency, InvalidTimezone
    UnknownPlan: 422,
    MissingPaymentMethod: 422,
    PaymentMethodRejected: 402,
    NotFound: 404,
    ChangeRefused: 409,
    IdempotencyConflict: 409,
    SignupInProgress: 409,
}


def status_for(error: BillingError) -> int:
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 400


class ApiError(Exception):
    """An HTTP-level refusal (auth, size, media type, upstream trouble) in the common shape."""

    def __init__(
        self,
        status_code: int,
        error_type: str,
        message: str,
        *,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error_type = error_type
        self.message = message
        self.field = field
        self.headers = dict(headers or {})


def _encodable(text: str) -> str:
    """``text`` with lone surrogates written as escapes: a message or field name that quotes
    what was sent (JSON's ``"\\ud800"``) must still encode as UTF-8, or the answer itself fails."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(error_type: str, message: str, field: str | None = None) -> dict[str, Any]:
    # Messages quote what was sent (an unknown id, a bad value); a card number pasted into
    # any field must not come back (or reach a log that stores answers).
    return {
        "error": {
            "type": error_type,
            "message": _encodable(redact_card_numbers(message)),
            "field": None if field is None else _encodable(redact_card_numbers(field)),
        }
    }


def error_response(
    status_code: int,
    error_type: str,
    message: str,
    *,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(error_type, message, field), status_code=status_code, headers=headers
    )


# ---- workflow refusals -------------------------------------------------------------------------


def _domain_error_classes() -> dict[str, type[BillingError]]:
    found: dict[str, type[BillingError]] = {}
    pending: list[type[BillingError]] = [BillingError]
    while pending:
        cls = pending.pop()
        found[cls.__name__] = cls
        pending.extend(cls.__subclasses__())
    return found


def from_update_failure(error: WorkflowUpdateFailedError) -> Exception:
    """The domain error (or ApiError) a failed workflow update stands for.

    The workflow raises ApplicationErrors typed by the domain error's class name
    (``ChangeRefused``, ``InvalidInput``, ``PaymentMethodRejected`` ...), with the reason the
    caller should see as the message.
    """
    cause = error.cause
    if isinstance(cause, ApplicationError):
        domain = _domain_error_classes().get(cause.type or "")
        if domain is not None:
            # A refusal may name the field at fault as its first detail (an InvalidInput from
            # the update's validator).
            details = cause.details
            field = details[0] if details and isinstance(details[0], str) else None
            return domain(cause.message, field=field)
        if cause.type == "PaymentProviderError":
            return ApiError(
                502,
                "payment_provider_error",
                f"the payment provider failed: {cause.message}; try again later",
            )
    return error


# ---- request validation ------------------------------------------------------------------------

_LOCATION_WORDS = {"query": "query parameter", "header": "header", "path": "path parameter"}


def _where(loc: Sequence[Any]) -> tuple[str, str | None]:
    """('body field customer.timezone', 'customer.timezone') from a pydantic location."""
    if not loc:
        return "request", None
    kind, rest = str(loc[0]), [str(part) for part in loc[1:]]
    if kind == "body":
        if not rest:
            return "request body", None
        path = ".".join(rest)
        return f"field '{path}'", path
    name = rest[-1] if rest else kind
    return f"{_LOCATION_WORDS.get(kind, kind)} '{name}'", name


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(error: Mapping[str, Any]) -> str:
    kind = str(error.get("type", ""))
    value = error.get("input")
    match kind:
        case "missing":
            return "is required"
        case "extra_forbidden":
            return "is not a known field; remove it (see /docs for the accepted fields)"
        case "text":
            # billing.text's finding; the value is not quoted (it may be a card number, or
            # ten thousand characters).
            return str(error.get("msg", "is not valid text"))
        case "timezone_aware":
            return (
                f"has no time zone ({_shown(value)}); send an ISO 8601 instant with a zone "
                "such as '2025-01-31T09:00:00Z' or '2025-01-31T10:00:00+01:00'"
            )
    if kind == "string_pattern_mismatch":
        from billing.api.schemas import PATTERN_HELP  # schemas is the patterns' home

        pattern = str((error.get("ctx") or {}).get("pattern", ""))
        if pattern in PATTERN_HELP:
            return f"{PATTERN_HELP[pattern]}; got {_shown(value)}"
    message = str(error.get("msg", "is not valid"))
    message = message[:1].lower() + message[1:]
    if isinstance(value, str | int | float | bool) or value is None:
        return f"{message}; got {_shown(value)}"
    return message


def validation_message(errors: Sequence[Mapping[str, Any]]) -> tuple[str, str | None]:
    """A message naming each bad field and what was wrong (first three), and the first field."""
    parts = []
    first_field: str | None = None
    for index, error in enumerate(errors):
        where, field = _where(tuple(error.get("loc", ())))
        if error.get("type") == "card_data":
            # Found by a check of the whole body, which knows the field's path.
            field = str((error.get("ctx") or {}).get("path") or field)
        if index == 0:
            first_field = field
        if index < 3:
            parts.append(f"{where} {_describe(error)}")
    if len(errors) > 3:
        parts.append(f"and {len(errors) - 3} more")
    return "; ".join(parts) or "the request is not valid", first_field


# ---- handlers ----------------------------------------------------------------------------------


async def _billing_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BillingError)
    # A signup that waited its turn for the customer and did not get it: soon is fine.
    headers = {"Retry-After": "2"} if isinstance(exc, SignupInProgress) else None
    return error_response(status_for(exc), exc.code, exc.message, field=exc.field, headers=headers)


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(
        exc.status_code, exc.error_type, exc.message, field=exc.field, headers=exc.headers
    )


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    malformed = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if malformed is not None:
        # FastAPI parses JSON before any dependency runs, auth included: check the key first,
        # so an unauthenticated caller learns nothing about the endpoint. (Imported here
        # because billing.api.auth imports this module.)
        from billing.api.auth import check_route_auth

        refused = check_route_auth(request)
        if refused is not None:
            return await _api_error(request, refused)
        ctx = malformed.get("ctx") or {}
        loc: Sequence[Any] = malformed.get("loc") or ()
        position = f" at character {loc[1]}" if len(loc) > 1 else ""
        return error_response(
            400,
            "malformed_json",
            f"malformed JSON: {ctx.get('error', 'could not be decoded')}{position}; "
            "send a JSON object",
        )
    message, field = validation_message(errors)
    return error_response(422, "invalid_input", message, field=field)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 404:
        return error_response(
            404,
            "not_found",
            f"no such endpoint: {request.method} {request.url.path}; see /docs for the API",
            headers=headers,
        )
    if exc.status_code == 405:
        allowed = headers.get("Allow") or headers.get("allow") or ""
        return error_response(
            405,
            "method_not_allowed",
            f"{request.method} is not allowed on {request.url.path}"
            + (f"; use {allowed}" if allowed else ""),
            headers=headers,
        )
    detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    return error_response(exc.status_code, "http_error", detail, headers=headers)


_UNREACHABLE = (RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED)


def temporal_unreachable(error: BaseException) -> bool:
    """Whether ``error`` says the Temporal frontend could not be reached: an RPC that found no
    server, or a lazily connecting client's failed connect (a plain RuntimeError)."""
    if isinstance(error, RPCError):
        return error.status in _UNREACHABLE
    return isinstance(error, RuntimeError) and str(error).startswith("Failed client connect")


async def _temporal_error(request: Request, exc: Exception) -> JSONResponse:
    """RPCError, and RuntimeError (which is how a lazy client reports a failed connect)."""
    if temporal_unreachable(exc):
        logger.warning("Temporal unreachable in %s %s: %s", request.method, request.url.path, exc)
        return error_response(
            503,
            "temporal_unavailable",
            "the workflow service did not answer; retry the request (a signup with the same "
            "Idempotency-Key)",
            headers={"Retry-After": "5"},
        )
    if isinstance(exc, RPCError) and exc.status == RPCStatusCode.RESOURCE_EXHAUSTED:
        # A namespace's rate limit, or a workflow's most Updates in flight, outlasted the
        # client's own retries: nothing was started or changed.
        logger.warning("Temporal busy in %s %s: %s", request.method, request.url.path, exc)
        return error_response(
            503,
            "temporal_busy",
            f"the workflow service refused the request for now ({exc.message}); nothing was "
            "changed: retry after a few seconds (a signup with the same Idempotency-Key)",
            headers={"Retry-After": "5"},
        )
    return _internal_error(request.method, request.url.path, exc)


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OperationalError)
    reference = secrets.token_hex(6)
    logger.error(
        "database error %s in %s %s", reference, request.method, request.url.path, exc_info=exc
    )
    return error_response(
        503,
        "database_unavailable",
        f"the database did not answer (reference {reference}); retry the request",
        headers={"Retry-After": "5"},
    )


def _internal_error(method: str, path: str, exc: BaseException) -> JSONResponse:
    reference = secrets.token_hex(6)
    logger.error("unhandled error %s in %s %s", reference, method, path, exc_info=exc)
    return error_response(500, "internal_error", _internal_message(reference))


def _internal_message(reference: str) -> str:
    return (
        f"internal error (reference {reference}); try again later, and quote the reference "
        "if it persists"
    )


def install_error_handlers(
    app: FastAPI, *, max_body_bytes: int, path_limits: dict[str, int] | None = None
) -> None:
    """Error handlers and middleware. ``path_limits``: body limits for particular paths."""
    app.add_exception_handler(BillingError, _billing_error)
    app.add_exception_handler(RPCError, _temporal_error)
    app.add_exception_handler(RuntimeError, _temporal_error)
    app.add_exception_handler(OperationalError, _database_error)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    # add_middleware puts each new middleware outside the previous ones: the size limit runs
    # first, then the catch-all, then FastAPI's own exception handling.
    app.add_middleware(UnhandledErrorMiddleware)
    app.add_middleware(
        BodySizeLimitMiddleware, max_body_bytes=max_body_bytes, path_limits=path_limits
    )


# ---- middleware --------------------------------------------------------------------------------


async def _send_error(
    send: Send,
    status_code: int,
    error_type: str,
    message: str,
    headers: Mapping[str, str] | None = None,
) -> None:
    body = json.dumps(error_body(error_type, message)).encode()
    raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()),
    ]
    await send({"type": "http.response.start", "status": status_code, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class BodySizeLimitMiddleware:
    """Refuse request bodies above ``max_body_bytes`` with 413, before any route runs.

    A declared Content-Length above the limit is refused without reading. Otherwise the body
    is read here, counting the bytes as they stream in (a chunked body has no Content-Length),
    and refused as soon as the count passes the limit; a body within it is handed on to the
    application unchanged. So no route ever sees a partial or oversized body, whatever it is.
    """

    def __init__(
        self, app: ASGIApp, *, max_body_bytes: int, path_limits: dict[str, int] | None = None
    ) -> None:
        self.app = app
        self.default_max_body_bytes = max_body_bytes
        self.path_limits = path_limits or {}

    def _too_large(self, limit: int) -> str:
        return f"request body is larger than the limit of {limit} bytes; send a smaller body"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.path_limits.get(scope.get("path", ""), self.default_max_body_bytes)
        declared = Headers(scope=scope).get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await _send_error(
                    send, 400, "invalid_request", f"Content-Length {declared!r} is not a number"
                )
                return
            if int(declared) > limit:
                await _send_error(send, 413, "payload_too_large", self._too_large(limit))
                return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away; nobody is left to answer
            body += message.get("body", b"")
            if len(body) > limit:
                await _send_error(
                    send, 413, "payload_too_large", self._too_large(limit), {"Connection": "close"}
                )
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # afterwards: http.disconnect, for streaming responses

        await self.app(scope, replay, send)


class UnhandledErrorMiddleware:
    """Anything no handler claimed becomes a 500 with a generic message and a reference; the
    stack trace goes to the log under that reference, never to the caller."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            reference = secrets.token_hex(6)
            logger.exception(
                "unhandled error %s in %s %s", reference, scope.get("method"), scope.get("path")
            )
            if started:
                raise  # mid-stream: dropping the connection tells the client it is incomplete
            await _send_error(send, 500, "internal_error", _internal_message(reference))
