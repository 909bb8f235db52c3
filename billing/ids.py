"""Identifiers. Random ids are time-ordered (sortable, good for keyset pagination); ids that
must be the same on every retry are derived from the workflow state that defines them."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from datetime import datetime

from billing.calendar import ensure_utc

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower-case
_RANDOM_BITS = 80

# The (millisecond, random) pair of the last id this process made. Ids made in the same
# millisecond (many per ms, or a clock frozen by a test) count up from it, so ids from one process
# sort in creation order (ULID monotonic mode). The time part always shows the clock's own time.
_last: tuple[int, int] = (0, 0)
_lock = threading.Lock()


def _forget_last_id() -> None:
    # A forked child must not count up from its parent's last id: both would make the same ids.
    global _last
    _last = (0, 0)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_last_id)


def _b32(value: int, length: int) -> str:
    out = []
    for _ in range(length):
        value, rem = divmod(value, 32)
        out.append(_ALPHABET[rem])
    return "".join(reversed(out))


def new_id(prefix: str) -> str:
    """``prefix_`` + 26 chars: 48-bit millisecond time then 80 random bits (ULID layout).

    Strictly increasing within one process while the clock does not go back, even when many ids
    share a millisecond.
    """
    global _last
    with _lock:
        millis = time.time_ns() // 1_000_000
        last_millis, last_rand = _last
        if millis == last_millis:
            rand = last_rand + 1
            if rand >= 1 << _RANDOM_BITS:
                millis, rand = millis + 1, 0
        else:
            rand = int.from_bytes(os.urandom(_RANDOM_BITS // 8), "big")
        _last = (millis, rand)
    return f"{prefix}_{_b32(millis, 10)}{_b32(rand, 16)}"


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:24]


def invoice_id_for(subscription_id: str, period_start: datetime, revision: int = 0) -> str:
    """The same (subscription, period) always names the same invoice.

    ``period_start`` must be aware; it is read in UTC, so the same instant given in another zone
    (or as a value read back from the database) names the same invoice. Naive values are refused.

    ``revision``: how many renewals of the period were voided as superseded before this one
    (``create_invoice``); 0, the first, keeps the id every earlier invoice was given.
    """
    if isinstance(revision, bool) or revision < 0:
        raise ValueError(f"revision must be a whole number >= 0; got {revision!r}")
    parts = [subscription_id, ensure_utc(period_start).isoformat()]
    if revision:
        parts.append(f"r{revision}")
    return f"in_{_digest(*parts)}"


def change_invoice_id_for(subscription_id: str, change_id: str) -> str:
    """The invoice of one plan change (its prorations): the same change always names the same
    invoice, never a renewal's (whose id derives from the period)."""
    return f"in_{_digest('change', subscription_id, change_id)}"


def subscription_id_for_signup(idempotency_key: str, scope: str = "") -> str:
    """A signup retried with the same idempotency key by the same sender (``scope``, a digest
    of its API key; "" in-process) names the same subscription; another sender's same key
    names another."""
    if not scope:
        return f"sub_{_digest('signup', idempotency_key)}"
    return f"sub_{_digest('signup', scope, idempotency_key)}"


def invoice_line_id_for(invoice_id: str, position: int) -> str:
    """The invoice's line at ``position`` (1-based) always has the same id, so a retried issue
    writes it once. Line 1 of ``in_X`` is ``il_X`` (as revision 0010 named existing lines)."""
    base = f"il_{invoice_id.removeprefix('in_')}"
    return base if position == 1 else f"{base}_{position}"
