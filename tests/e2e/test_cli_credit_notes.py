"""``billing credit-notes create|list|show`` on a real database with a paid invoice (charged on
localstripe), as finance would run them; bad arguments are refused before anything is written."""

# The `stack` fixture is imported from the charge tests, and so is redefined by every use.
# ruff: noqa: F811

from __future__ import annotations

import csv
import io
import json
import subprocess

import pytest

from db.engine import unit_of_work
from db.repositories import balances as balances_repo
from db.repositories import credit_notes as credit_notes_repo
from tests.activities.test_billing_activities import (  # noqa: F401  (the stack fixture)
    Stack,
    charge,
    open_invoice,
    seed_subscription,
    stack,
)
from tests.conftest import BOTH_BACKENDS
from tests.e2e.test_cli_start_up import BILLING, environment, free_port


def run(stack: Stack, *args: str | bytes) -> subprocess.CompletedProcess[str]:
    # Nothing listens at this Temporal address: a credit note without a refund needs none.
    env = environment(
        f"127.0.0.1:{free_port()}", stack.engine.url.render_as_string(hide_password=False)
    )
    return subprocess.run(
        [BILLING.encode(), *(a if isinstance(a, bytes) else a.encode() for a in args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def paid(stack: Stack) -> tuple[str, str]:
    seeded = seed_subscription(stack)
    invoice = open_invoice(stack, seeded)
    assert charge(stack, invoice.invoice_id, 1).payment_id is not None
    return invoice.invoice_id, seeded.customer_id


@BOTH_BACKENDS
def test_finance_issues_lists_and_shows_a_credit_note_from_the_command_line(stack: Stack) -> None:
    invoice_id, customer_id = paid(stack)

    done = run(
        stack,
        "credit-notes",
        "create",
        invoice_id,
        "--credit",
        "300",
        "--out-of-band",
        "200",
        "--reason",
        "order_change",
        "--memo",
        "Downgraded mid-month ✂️",
        "--idempotency-key",
        "k1",
    )
    assert done.returncode == 0, done.stderr
    assert "issued: 500 USD (refund 0, credit 300, outside 200)" in done.stdout
    again = run(
        stack,
        "credit-notes",
        "create",
        invoice_id,
        "--credit",
        "300",
        "--out-of-band",
        "200",
        "--reason",
        "order_change",
        "--memo",
        "Downgraded mid-month ✂️",
        "--idempotency-key",
        "k1",
    )
    assert again.returncode == 0 and "already issued" in again.stdout, again.stderr
    with unit_of_work(stack.session_factory) as session:
        [note] = credit_notes_repo.list_credit_notes(session, invoice_id=invoice_id)
        assert balances_repo.credit_balance(session, customer_id, "USD") == 300

    listed = run(stack, "credit-notes", "list", "--invoice-id", invoice_id, "--csv")
    assert listed.returncode == 0, listed.stderr
    [row] = list(csv.DictReader(io.StringIO(listed.stdout)))
    assert (row["number"], row["credit_amount_minor"], row["memo"]) == (
        note.number,
        "300",
        "Downgraded mid-month ✂️",
    )
    shown = run(stack, "credit-notes", "show", note.id)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["out_of_band_amount_minor"] == 200


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--credit", "300", "--memo", b"\x1b[2J"), "control character (U+001B)"),
        (("--credit", "300", "--memo", b"x" * 10_000), "at most 500"),
        (("--credit", "300", "--reason", "because"), "--reason 'because' is not one of"),
        (("--amount", "100", "--refund", "90"), "must add up to the credit note's total, 100"),
        (("--line", "il_nope"), "has no line 'il_nope'"),
        (("--credit", "2501"), "can be credited 2500 more"),
    ],
)
def test_bad_arguments_are_refused_and_nothing_is_written(
    stack: Stack, args: tuple[str | bytes, ...], words: str
) -> None:
    invoice_id, _ = paid(stack)
    done = run(stack, "credit-notes", "create", invoice_id, *args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert words in done.stderr.replace("\n", " "), done.stderr
    assert "Traceback" not in done.stderr
    with unit_of_work(stack.session_factory) as session:
        assert credit_notes_repo.list_credit_notes(session, invoice_id=invoice_id) == []
