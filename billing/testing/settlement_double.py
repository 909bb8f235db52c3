"""The test routes of the settlement double (``billing.testing.localstripe_settlement``), for
tests and chaos runs: what Stripe does on its own (a refund that fails later, one kept pending)
asked for over HTTP, as localstripe's own ``/_config`` routes are."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from typing import Any


def _post(base_url: str, path: str, fields: dict[str, str]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{base_url.rstrip('/')}{path}",
        data=urllib.parse.urlencode(fields).encode(),
        method="POST",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        loaded: dict[str, Any] = json.loads(answer.read())
        return loaded


def set_new_refund_status(base_url: str, status: str) -> None:
    """Refunds made from now on start ``status`` (``succeeded``, or ``pending`` as Stripe's
    asynchronous refunds)."""
    _post(base_url, "/_config/settlement", {"refund_status": status})


def move_refund(
    base_url: str, refund_id: str, status: str, failure_reason: str | None = None
) -> dict[str, Any]:
    """Stripe moves the refund to ``status`` on its own (sends ``charge.refund.updated`` and
    ``refund.updated``)."""
    fields = {"status": status}
    if failure_reason is not None:
        fields["failure_reason"] = failure_reason
    return _post(base_url, f"/_config/settlement/refunds/{refund_id}/status", fields)
