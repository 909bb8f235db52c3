"""Identifiers: random ids sort by creation time; derived ids are the same on every retry."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from freezegun import freeze_time

from billing.clock import FixedClock, SystemClock
from billing.errors import InvalidInput
from billing.ids import invoice_id_for, new_id, subscription_id_for_signup

CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"


def millis_of(identifier: str) -> int:
    """The creation time encoded in the first 10 characters after the prefix."""
    body = identifier.split("_", 1)[1]
    value = 0
    for char in body[:10]:
        value = value * 32 + CROCKFORD.index(char)
    return value


def test_new_id_has_the_prefix_and_26_base32_characters() -> None:
    identifier = new_id("sub")

    prefix, body = identifier.split("_")
    assert prefix == "sub"
    assert len(body) == 26
    assert set(body) <= set(CROCKFORD)


def test_new_id_encodes_the_creation_time() -> None:
    before = time.time_ns() // 1_000_000
    identifier = new_id("cus")
    after = time.time_ns() // 1_000_000

    assert before <= millis_of(identifier) <= after


def test_many_ids_are_unique_and_sort_in_creation_order() -> None:
    ids = [new_id("in") for _ in range(20_000)]

    assert len(set(ids)) == len(ids)
    # Many of these share a millisecond; they must still sort in the order they were made.
    assert ids == sorted(ids)


def test_ids_under_a_frozen_clock_stay_unique_ordered_and_show_the_frozen_time() -> None:
    with freeze_time("2024-01-31 14:00:00"):
        ids = [new_id("pay") for _ in range(1000)]

    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    frozen_ms = int(datetime(2024, 1, 31, 14, tzinfo=UTC).timestamp() * 1000)
    assert {millis_of(i) for i in ids} == {frozen_ms}


def test_ids_made_later_sort_later() -> None:
    with freeze_time("2024-01-31 14:00:00") as frozen:
        first = new_id("in")
        frozen.tick(timedelta(milliseconds=1))
        second = new_id("in")
        frozen.tick(timedelta(days=365))
        third = new_id("in")

    assert first < second < third


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_worker_does_not_repeat_its_parents_next_id() -> None:
    with freeze_time("2024-01-31 14:00:00"):
        new_id("in")
        read_end, write_end = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the child process
            try:
                os.write(write_end, new_id("in").encode())
            finally:
                os._exit(0)
        os.close(write_end)
        parent_next = new_id("in")
        os.waitpid(child, 0)
        with os.fdopen(read_end) as pipe:
            child_next = pipe.read()

    assert child_next.startswith("in_")
    assert child_next != parent_next


PERIOD_START = datetime(2024, 1, 31, 14, 0, tzinfo=UTC)


def test_invoice_id_is_the_same_for_the_same_subscription_and_period() -> None:
    # Pinned: activities retried across releases must keep naming the same invoice.
    assert invoice_id_for("sub_1", PERIOD_START) == "in_5ecac27ed81885db6393728c"
    assert invoice_id_for("sub_1", PERIOD_START) == invoice_id_for("sub_1", PERIOD_START)


def test_invoice_id_differs_across_periods_and_subscriptions() -> None:
    ids = {
        invoice_id_for(sub, PERIOD_START + timedelta(days=31 * k))
        for sub in ("sub_1", "sub_2", "sub_10")
        for k in range(24)
    }
    ids.add(invoice_id_for("sub_1", PERIOD_START + timedelta(microseconds=1)))

    assert len(ids) == 3 * 24 + 1
    assert all(i.startswith("in_") and len(i) == 27 for i in ids)


def test_invoice_id_depends_on_the_instant_not_on_how_it_is_written() -> None:
    same_instant = [
        PERIOD_START,
        PERIOD_START.replace(tzinfo=timezone.utc),  # noqa: UP017 - a different tzinfo object
        PERIOD_START.replace(tzinfo=ZoneInfo("UTC")),
        PERIOD_START.astimezone(ZoneInfo("America/New_York")),
        PERIOD_START.astimezone(timezone(timedelta(hours=9))),
    ]

    assert {invoice_id_for("sub_1", d) for d in same_instant} == {"in_5ecac27ed81885db6393728c"}


def test_invoice_id_refuses_a_naive_period_start() -> None:
    with pytest.raises(InvalidInput, match="has no time zone"):
        invoice_id_for("sub_1", datetime(2024, 1, 31, 14, 0))


def test_signup_retried_with_the_same_key_names_the_same_subscription() -> None:
    assert subscription_id_for_signup("key-1") == subscription_id_for_signup("key-1")
    assert subscription_id_for_signup("key-1") != subscription_id_for_signup("key-2")
    assert subscription_id_for_signup("signup-key-1") == "sub_4cda12d16b23ce551e5c3389"


def test_clocks_give_aware_utc_instants() -> None:
    at = datetime(2024, 1, 31, 14, tzinfo=UTC)

    assert FixedClock(at).now() == at
    with freeze_time("2024-01-31 14:00:00"):
        assert SystemClock().now() == at
    assert SystemClock().now().utcoffset() == timedelta(0)
