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


@BOTH_BACKENDS
def test_a_credit_note_on_an_open_invoice_lowers_its_amount_due_and_at_0_pays_it(
    stack: Stack,
) -> None:
    seeded = seed_subscription(stack)
    invoice = open_invoice(stack, seeded)

    split = run(stack, "credit-notes", "create", invoice.invoice_id, "--refund", "100")
    assert split.returncode == 2 and "refund_amount_minor" in split.stderr, split.stderr
    lowered = run(stack, "credit-notes", "create", invoice.invoice_id, "--amount", "1000")
    assert lowered.returncode == 0, lowered.stderr
    assert f"invoice {invoice.number} is now due 1500 USD (open)" in lowered.stdout
    # Nothing listens at the Temporal address: the subscription is not told, and says so; its
    # next charge attempt reads the invoice.
    assert "next charge attempt reads the invoice's amount due" in lowered.stderr
    rest = run(stack, "credit-notes", "create", invoice.invoice_id, "--amount", "1500")
    assert rest.returncode == 0, rest.stderr
    assert f"invoice {invoice.number} is now due 0 USD (paid)" in rest.stdout
    with unit_of_work(stack.session_factory) as session:
        notes = credit_notes_repo.list_credit_notes(session, invoice_id=invoice.invoice_id)
    assert [(n.type, n.amount_due_reduction_minor) for n in notes] == [
        ("pre_payment", 1000),
        ("pre_payment", 1500),
    ]


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


def test_finance_reconciles_payouts_from_the_command_line(stack: Stack) -> None:
    import httpx

    from activities.ledger import LedgerActivities
    from billing.settlement import ImportPayoutInput

    stack.localstripe.flush()  # the payout batches the whole account's available balance
    paid(stack)

    def run_payouts() -> str:
        answer = httpx.post(f"{stack.localstripe.url}/_config/settlement/payouts/run", timeout=10)
        answer.raise_for_status()
        [payout] = answer.json()["data"]
        LedgerActivities(stack.session_factory, stack.gateway, stack.clock).import_payout(
            ImportPayoutInput(payout["id"])
        )
        return str(payout["id"])

    clean = run_payouts()
    listed = run(stack, "payouts", "list")
    assert listed.returncode == 0 and clean in listed.stdout, listed.stderr
    ok = run(stack, "payouts", "reconcile", clean)
    assert ok.returncode == 0 and "0 differences" in ok.stdout, (ok.stdout, ok.stderr)

    httpx.post(
        f"{stack.localstripe.url}/_config/settlement/balance_transactions",
        data={"amount": "5000", "currency": "usd"},
        timeout=10,
    ).raise_for_status()
    foreign = run_payouts()
    found = run(stack, "payouts", "reconcile", foreign, "--csv")
    assert found.returncode == 1, (found.stdout, found.stderr)
    [row] = list(csv.DictReader(io.StringIO(found.stdout)))
    assert (row["stripe_payout_id"], row["kind"], row["severity"]) == (
        foreign,
        "unknown_at_stripe",
        "error",
    )
    period = run(stack, "payouts", "reconcile", "--until", "2100-01-01T00:00:00Z")
    assert period.returncode == 1 and "1 differences" in period.stdout, period.stdout
    bad = run(stack, "payouts", "reconcile", "--since", "yesterday")
    assert bad.returncode == 2 and "since" in bad.stderr, bad.stderr
    assert run(stack, "reconciliation", "findings", "--severity", "fatal").returncode == 2
    assert run(stack, "reconciliation", "findings").returncode == 0
