"""``LocalStripe(log_arrivals=True)``: the benchmark's record of when each request reached the
fake Stripe, to the microsecond (its access log has whole seconds only)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import stripe

from activities.stripe_gateway import make_stripe_client
from billing.testing.cards import SUCCEEDS, create_card_payment_method
from billing.testing.localstripe import LOCALSTRIPE_API_KEY, LocalStripe
from billing.testing.localstripe_server import ARRIVAL_PREFIX


def arrivals(log: Path) -> list[tuple[float, str, str, str]]:
    found = []
    for line in log.read_text().splitlines():
        if line.startswith(ARRIVAL_PREFIX):
            at, method, path, status = line.removeprefix(ARRIVAL_PREFIX).split()
            found.append((float(at), method, path, status))
    return found


def test_each_request_logs_its_arrival_method_path_and_status(tmp_path: Path) -> None:
    log = tmp_path / "localstripe.log"
    with LocalStripe(log_path=log, log_arrivals=True) as server:
        client = make_stripe_client(
            api_key=LOCALSTRIPE_API_KEY, api_base=server.url, max_network_retries=0
        )
        before = time.time()
        card = create_card_payment_method(client, SUCCEEDS)
        with pytest.raises(stripe.InvalidRequestError):
            client.v1.customers.retrieve("cus_missing")
        after = time.time()
    seen = [a for a in arrivals(log) if a[0] >= before]
    assert [(m, p, s) for _, m, p, s in seen] == [
        ("POST", "/v1/payment_methods", "200"),
        ("GET", "/v1/customers/cus_missing", "404"),
    ]
    assert all(before <= at <= after for at, *_ in seen)
    assert seen[0][0] < seen[1][0]  # finer than the access log's whole seconds
    assert card.startswith("pm_")


def test_without_the_option_nothing_extra_is_logged(tmp_path: Path) -> None:
    log = tmp_path / "localstripe.log"
    with LocalStripe(log_path=log) as server:
        client = make_stripe_client(api_key=LOCALSTRIPE_API_KEY, api_base=server.url)
        create_card_payment_method(client, SUCCEEDS)
    assert arrivals(log) == []
    assert "/v1/payment_methods" in log.read_text()  # the access log still has it
