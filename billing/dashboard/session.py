"""Dashboard sessions: a signed cookie, no server-side store.

The cookie is ``v1.<key id>.<expires>.<nonce>.<signature>``: the digest id of the API key that
signed in (never the key), when the session ends (Unix seconds), a random nonce, and an
HMAC-SHA256 of the rest under the session secret. A session is valid while its signature
checks, it has not expired, and its key is still configured with the finance or admin scope:
removing a key from ``BILLING_API_KEYS`` ends its sessions.

The cookie is HttpOnly (no script reads it), SameSite=Strict (no other site's page sends it),
Path=/dashboard, and Secure outside dev and test. Every form that changes something (sign-out)
also carries a CSRF token, an HMAC of the session's nonce, and is refused without it or from
another Origin. The sign-in form carries a token bound to a short-lived cookie of its own
(double submit), so no other site can sign a browser in with the attacker's key.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from billing.settings import ApiKey

SESSION_COOKIE = "billing_dashboard_session"
LOGIN_COOKIE = "billing_dashboard_login"
DASHBOARD_SCOPES = ("finance", "admin")


def _key_id(key: str) -> str:
    # The same digest id the API stores for idempotency scopes (billing.api.auth.api_key_id).
    return hashlib.sha256(f"billing-api-key-id\x1f{key}".encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class DashboardSession:
    key_name: str
    scope: str
    key_id: str
    expires_at: int
    nonce: str


class SessionSigner:
    """Issues and checks session cookies and CSRF tokens with one secret."""

    def __init__(self, secret: bytes, keys: Sequence[ApiKey], *, ttl_s: int) -> None:
        self._secret = secret
        self._ttl_s = ttl_s
        self._keys = {
            _key_id(k.key.get_secret_value()): k for k in keys if k.scope in DASHBOARD_SCOPES
        }

    def _sign(self, text: str) -> str:
        return hmac.new(self._secret, text.encode(), hashlib.sha256).hexdigest()

    def find_key(self, presented: str) -> ApiKey | None:
        """The configured finance or admin key equal to ``presented`` (constant-time compare
        against every one)."""
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for key in self._keys.values():
            if hmac.compare_digest(
                digest, hashlib.sha256(key.key.get_secret_value().encode()).digest()
            ):
                found = key
        return found

    def issue(self, key: ApiKey, *, now: float) -> str:
        expires = int(now) + self._ttl_s
        body = f"v1.{_key_id(key.key.get_secret_value())}.{expires}.{secrets.token_hex(16)}"
        return f"{body}.{self._sign(body)}"

    def check(self, cookie: str | None, *, now: float) -> DashboardSession | None:
        if not cookie or len(cookie) > 300:
            return None
        body, _, signature = cookie.rpartition(".")
        if not hmac.compare_digest(self._sign(body), signature):
            return None
        parts = body.split(".")
        if len(parts) != 4 or parts[0] != "v1" or not parts[2].isdigit():
            return None
        _, key_id, expires, nonce = parts
        key = self._keys.get(key_id)
        if key is None or int(expires) <= now:
            return None
        return DashboardSession(key.name, key.scope, key_id, int(expires), nonce)

    def csrf_token(self, session: DashboardSession) -> str:
        return self._sign(f"csrf.{session.nonce}")

    def check_csrf(self, session: DashboardSession, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf_token(session), token or "")

    def login_token(self, nonce: str) -> str:
        return self._sign(f"login.{nonce}")

    def check_login(self, nonce: str | None, token: str | None) -> bool:
        return bool(nonce and token) and hmac.compare_digest(
            self.login_token(nonce or ""), token or ""
        )
