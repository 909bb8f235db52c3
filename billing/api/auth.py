"""API keys: ``Authorization: Bearer <key>`` (or ``X-API-Key: <key>``), each with one scope.

``signup`` may create subscriptions; ``finance`` may read; ``admin`` may change subscriptions
and read. A missing or unknown key is 401 (with ``WWW-Authenticate: Bearer``); a known key
without the scope an endpoint needs is 403, naming that scope.

Keys are compared in constant time: the SHA-256 of the presented key against the SHA-256 of
every configured key, with ``hmac.compare_digest`` and no early exit, so timing says neither
which key matched nor how much of one did.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, get_args

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from billing.api.errors import ApiError
from billing.settings import ApiKey, ApiScope, Settings

KNOWN_SCOPES: tuple[str, ...] = get_args(ApiScope)

# Declared for the OpenAPI document (the "Authorize" button in /docs); the headers are read
# by ``KeyRing.authenticate`` itself, so both schemes are accepted on every endpoint.
bearer_scheme = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
api_key_scheme = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key")


@dataclass(frozen=True, slots=True)
class Caller:
    """Who made the request: the API key's name and scope (never the key itself)."""

    key_name: str
    scope: ApiScope
    #: A digest of the key that identifies it without revealing it: idempotency keys are
    #: scoped by it (the same Idempotency-Key from two API keys is two requests).
    key_id: str = ""


def api_key_id(key: str) -> str:
    """The stored identity of an API key: 32 hex digits of a domain-separated SHA-256. The
    keys are long random secrets, so the digest reveals nothing usable."""
    return hashlib.sha256(f"billing-api-key-id\x1f{key}".encode()).hexdigest()[:32]


class KeyRing:
    """The configured keys as SHA-256 digests, built once per app."""

    def __init__(self, keys: Sequence[ApiKey]) -> None:
        self._entries = [
            (hashlib.sha256(k.key.get_secret_value().encode()).digest(), k) for k in keys
        ]

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        return cls(settings.api_keys)

    def find(self, presented: str) -> ApiKey | None:
        digest = hashlib.sha256(presented.encode()).digest()
        found: ApiKey | None = None
        for configured, key in self._entries:
            # Every key is compared, whatever matched before.
            if hmac.compare_digest(digest, configured):
                found = key
        return found

    def authenticate(self, request: Request, scopes: Sequence[str]) -> Caller:
        """The caller, if the request carries a known key with one of ``scopes``; raises
        ApiError 401 or 403 otherwise."""
        presented = presented_key(request)
        key = self.find(presented) if presented else None
        if key is None:
            message = (
                "API key not recognized; check the key, or ask for a new one"
                if presented
                else "missing API key; send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
            )
            raise ApiError(401, "unauthenticated", message, headers={"WWW-Authenticate": "Bearer"})
        if key.scope not in scopes:
            needed = " or ".join(f"'{s}'" for s in scopes)
            raise ApiError(
                403,
                "forbidden",
                f"API key {key.name!r} has scope '{key.scope}'; this endpoint needs scope {needed}",
            )
        caller = Caller(key.name, key.scope, api_key_id(key.key.get_secret_value()))
        request.state.caller = caller
        return caller


def presented_key(request: Request) -> str | None:
    """The key from ``Authorization: Bearer`` (preferred) or ``X-API-Key``; None if absent."""
    authorization = request.headers.get("authorization")
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise ApiError(
                401,
                "unauthenticated",
                "the Authorization header must be 'Bearer <key>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return value.strip()
    header = request.headers.get("x-api-key")
    return header.strip() if header and header.strip() else None


def keyring(request: Request) -> KeyRing:
    ring = request.app.state.keyring
    assert isinstance(ring, KeyRing)
    return ring


class ScopeRequirement:
    """A dependency: the request must carry a key with one of ``scopes``."""

    def __init__(self, *scopes: ApiScope) -> None:
        unknown = [s for s in scopes if s not in KNOWN_SCOPES]
        if not scopes or unknown:
            raise ValueError(f"scopes must be some of {KNOWN_SCOPES}; got {scopes}")
        self.scopes: tuple[ApiScope, ...] = scopes

    def check(self, request: Request) -> Caller:
        return keyring(request).authenticate(request, self.scopes)

    async def __call__(
        self,
        request: Request,
        _bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
        _api_key: Annotated[str | None, Depends(api_key_scheme)],
    ) -> Caller:
        return self.check(request)


def require_scope(*scopes: ApiScope) -> Any:
    """``dependencies=[require_scope("finance", "admin")]``: any one of the scopes will do.

    A ``Security`` dependency, so the OpenAPI document lists the scopes in each operation's
    security requirements (``{"HTTPBearer": ["finance", "admin"]}``): callers and tests read
    there which key a route takes."""
    return Security(ScopeRequirement(*scopes), scopes=list(scopes))


def check_route_auth(request: Request) -> ApiError | None:
    """The auth refusal of the matched route, if any. For answers produced before FastAPI ran
    the route's dependencies (a malformed JSON body), so an unauthenticated caller learns
    nothing about the endpoint."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    for dependency in getattr(dependant, "dependencies", ()):
        if isinstance(dependency.call, ScopeRequirement):
            try:
                dependency.call.check(request)
            except ApiError as refused:
                return refused
    return None
