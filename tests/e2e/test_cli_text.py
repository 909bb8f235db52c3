"""Command-line arguments go through the same text rule as the API, before anything is sent or
queried. An argument with bytes that are not UTF-8 reaches Python as lone surrogates (which no
database driver can send); a reason may be ten thousand characters or carry a card number."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from billing.testing.database import temporary_database
from tests.e2e.test_cli_start_up import BILLING, environment, free_port


@pytest.fixture
def env() -> Iterator[dict[str, str]]:
    with temporary_database("sqlite") as url:
        # Nothing listens at this address: a command that got past its checks would say so.
        yield environment(f"127.0.0.1:{free_port()}", url)


def run(env: dict[str, str], *args: str | bytes) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BILLING.encode(), *(a if isinstance(a, bytes) else a.encode() for a in args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("reason", "words"),
    [
        (b"not utf-8 \xff", "lone surrogate"),
        (b"x" * 10_000, "10000 characters long; at most 500"),
        (b"card 4242 4242 4242 4242", "card number"),
        (b"\x1b[2J", "control character (U+001B)"),
    ],
)
def test_a_cancel_reason_the_database_cannot_store_is_refused_before_anything_is_sent(
    env: dict[str, str], reason: bytes, words: str
) -> None:
    done = run(env, "subscriptions", "cancel", "sub_123", "--reason", reason)
    assert done.returncode == 2, done.stderr
    assert "--reason" in done.stderr and words in done.stderr, done.stderr
    assert "Temporal" not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("subscriptions", "cancel", b"sub_\xff"),
        ("subscriptions", "show", b"sub_\xff"),
        ("invoices", "show", b"in_\xff"),
        ("invoices", "list", "--customer-id", b"cus_\xff"),
    ],
)
def test_ids_with_bytes_that_are_not_text_are_refused_with_a_message(
    env: dict[str, str], args: tuple[str | bytes, ...]
) -> None:
    done = run(env, *args)
    assert done.returncode == 2, done.stderr
    assert "lone surrogate" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
