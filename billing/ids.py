"""Identifiers. Random ids are time-ordered (sortable, good for keyset pagination); ids that
must be the same on every retry are derived from the workflow state that defines them."""

from __future__ import annotations

import hashlib
import os
import time
from datetime import datetime

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower-case


def _b32(value: int, length: int) -> str:
    out = []
    for _ in range(length):
        value, rem = divmod(value, 32)
        out.append(_ALPHABET[rem])
    return "".join(reversed(out))


def new_id(prefix: str) -> str:
    """``prefix_`` + 26 chars: 48-bit millisecond time then 80 random bits (ULID layout)."""
    millis = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    return f"{prefix}_{_b32(millis, 10)}{_b32(rand, 16)}"


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:24]


def invoice_id_for(subscription_id: str, period_start: datetime) -> str:
    """The same (subscription, period) always names the same invoice."""
    return f"in_{_digest(subscription_id, period_start.isoformat())}"


def subscription_id_for_signup(idempotency_key: str) -> str:
    """A signup retried with the same idempotency key names the same subscription."""
    return f"sub_{_digest('signup', idempotency_key)}"
