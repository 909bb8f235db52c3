"""No secret and no card data leaves the service or stays in it.

A full run (signups charged, a declined card replaced, Stripe webhooks signed and forged,
finance reads, every kind of refusal) is made with every logger at DEBUG. Then:

* no Stripe key, webhook signing secret or API key appears in any log line, in the process's
  stdout/stderr, or in any answer (status, headers, body);
* no card number appears in any log line or answer, nor in any text column of any table:
  only the provider's ids are kept. Card details sent to the API are refused with 422,
  without the value being echoed.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from sqlalchemy import inspect, select

from billing.card_data import contains_card_number, find_card_numbers, redact_card_numbers
from billing.testing.cards import (
    DECLINED_AT_ATTACH,
    DECLINES_AFTER_ATTACH,
    REQUIRES_AUTHENTICATION,
    SUCCEEDS,
)
from billing.testing.harness import LOCALSTRIPE_API_KEY
from db import models
from db.base import Base
from tests.api.support import API_KEYS, Api, auth, row_counts
from tests.api.webhook_fixtures import WEBHOOK_SECRET
from tests.conftest import BOTH_BACKENDS
from tests.security.run import every_log_record, full_run, make_cards

TEST_CARDS = (SUCCEEDS, DECLINES_AFTER_ATTACH, DECLINED_AT_ATTACH, REQUIRES_AUTHENTICATION)


def secrets_in(text: str) -> list[str]:
    """Which configured secrets ``text`` contains: whole, or a 16-character piece of one."""
    secrets = {
        "Stripe API key": LOCALSTRIPE_API_KEY,
        "webhook signing secret": WEBHOOK_SECRET,
        **{f"API key '{scope}'": key for scope, key in API_KEYS.items()},
    }
    found = []
    for name, value in secrets.items():
        pieces = {value} | {value[i : i + 16] for i in range(0, len(value) - 15, 4)}
        if any(piece in text for piece in pieces):
            found.append(name)
    return found


def cards_in(text: str) -> list[str]:
    grouped = {c: f"{c[:4]} {c[4:8]} {c[8:12]} {c[12:]}" for c in TEST_CARDS}
    known = [c for c, g in grouped.items() if c in text or g in text]
    return known + find_card_numbers(text)


def stored_text(api: Api) -> list[tuple[str, str]]:
    """(table.column, text) for every string or JSON value stored in any table."""
    values: list[tuple[str, str]] = []
    with api.harness.session_factory() as session:
        for table in Base.metadata.sorted_tables:
            for row in session.execute(select(table)).mappings():
                for column, value in row.items():
                    if isinstance(value, str):
                        values.append((f"{table.name}.{column}", value))
                    elif isinstance(value, dict | list):
                        values.append((f"{table.name}.{column}", json.dumps(value)))
    return values


@BOTH_BACKENDS
async def test_no_secret_or_card_number_in_logs_answers_or_the_database(
    api: Api, capfd: pytest.CaptureFixture[str]
) -> None:
    cards = await make_cards(api)
    capfd.readouterr()  # what came before the run is not the run's
    with every_log_record() as lines:
        run = await full_run(api, cards)
        # Card details offered to the API: refused, not echoed, not stored, not logged.
        for body in (
            {"plan": "basic-monthly", "card": {"number": SUCCEEDS, "cvc": "987"}},
            {"plan": "basic-monthly", "payment_method_id": SUCCEEDS},
            {"plan": "basic-monthly", "customer": {"name": "4242 4242 4242 4242"}},
        ):
            refused = await api.request("POST", "/v1/subscriptions", scope="signup", json=body)
            run.responses.append(refused)
            assert refused.status_code == 422, refused.text
            assert "looks like card details" in refused.json()["error"]["message"]
    out, err = capfd.readouterr()

    logs = "\n".join(lines)
    assert "POST /v1/subscriptions" in logs or "subscription" in logs  # the capture worked
    assert len(lines) > 50, "too few log lines: is DEBUG logging captured?"
    for where, text in (("logs", logs), ("stdout/stderr", out + err), ("answers", run.text())):
        assert secrets_in(text) == [], f"secret in {where}"
        assert cards_in(text) == [], f"card number in {where}"
    # The word, not three letters inside a random id (pa_01m98ak0cvcv6kz... is an id).
    assert re.search(r"(?<![a-z0-9])cvc(?![a-z0-9])", logs.lower()) is None

    stored = stored_text(api)
    assert any(column == "customers.default_payment_method_id" for column, _ in stored)
    leaks = [(column, value) for column, value in stored if cards_in(value)]
    assert leaks == []
    # What is stored about cards is the provider's ids, never numbers.
    methods = {v for c, v in stored if c.endswith("payment_method_id")}
    assert methods and all(v.startswith("pm_") for v in methods)
    card_columns = [
        column.name
        for mapper in Base.registry.mappers
        for column in inspect(mapper.class_).columns
        if names_card_data(column.name)
    ]
    assert card_columns == []
    assert models.CustomerRow.__tablename__ == "customers"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"plan": "basic-monthly", "card_number": SUCCEEDS}, "card_number"),
        ({"plan": "basic-monthly", "cvc": "123"}, "cvc"),
        (
            {"plan": "basic-monthly", "payment_method_id": "4000-0000-0000-0341"},
            "payment_method_id",
        ),
        ({"plan": "basic-monthly", "customer": {"external_id": SUCCEEDS}}, "customer.external_id"),
        ({"plan": "basic-monthly", "trial_days": int(SUCCEEDS)}, "trial_days"),
    ],
)
async def test_card_details_are_refused_by_name_without_echoing_them(
    api: Api, body: dict[str, Any], field: str
) -> None:
    rows = row_counts(api.harness)
    response = await api.request("POST", "/v1/subscriptions", scope="signup", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "invalid_input"
    assert f"field '{field}' looks like card details" in error["message"]
    assert "pm_" in error["message"]  # says what to send instead
    assert cards_in(response.text) == [] and "0341" not in response.text
    assert row_counts(api.harness) == rows


async def test_a_card_number_in_a_path_header_or_change_is_not_echoed(api: Api) -> None:
    missing = await api.request("GET", f"/v1/invoices/{SUCCEEDS}", scope="finance")
    assert missing.status_code == 404
    assert "[card number removed]" in missing.json()["error"]["message"]
    keyed = await api.request(
        "POST",
        "/v1/subscriptions",
        scope="signup",
        json={"plan": "basic-monthly"},
        headers={"Idempotency-Key": SUCCEEDS},
    )
    assert keyed.status_code == 422
    assert keyed.json()["error"]["field"] == "Idempotency-Key"
    change = await api.request(
        "POST",
        "/v1/subscriptions/sub_x/payment-method",
        scope="admin",
        json={"payment_method_id": SUCCEEDS},
    )
    assert change.status_code == 422
    for response in (missing, keyed, change):
        assert cards_in(response.text) == []
    assert auth("finance")


def names_card_data(column: str) -> bool:
    """A column named for card data: a card number, a PAN, a CVC/CVV or an expiry, as a whole
    word of its snake_case name (``expansion_minor`` is not a PAN)."""
    words = column.lower().split("_")
    return "card_number" in column.lower() or any(
        word in ("pan", "cvc", "cvv", "cvc2", "exp", "expiry") for word in words
    )


def test_card_data_column_names_are_recognised_by_word() -> None:
    for name in ("card_number", "pan", "card_pan", "cvc", "cvv", "exp_month", "card_exp_year"):
        assert names_card_data(name), name
    for name in ("expansion_minor", "span", "company", "expires_at_hint", "expected"):
        assert not names_card_data(name), name


def test_card_numbers_are_recognised_and_other_numbers_are_not() -> None:
    for card in TEST_CARDS:
        assert contains_card_number(card)
        assert contains_card_number(f"{card[:4]} {card[4:8]} {card[8:12]} {card[12:]}")
        assert contains_card_number(f"{card[:4]}-{card[4:8]}-{card[8:12]}-{card[12:]}")
    assert contains_card_number("378282246310005")  # Amex, 15 digits
    assert not contains_card_number("4242424242424241")  # fails Luhn
    assert not contains_card_number("424242424242")  # 12 digits
    assert not contains_card_number("1735689600")  # a Unix time
    assert not contains_card_number("2026-01-31 09:30:00.000000")
    assert not contains_card_number("42424242424242424242")  # 20 digits: no PAN
    assert redact_card_numbers(f"pay {SUCCEEDS} now") == "pay [card number removed] now"
