"""``billing reconciliation resolve`` and ``findings --status``: finance resolves a finding
with a note from the command line (who, when, why), lists open or resolved ones, as a table or
CSV. Bad input exits 2 and writes nothing; another resolution of a resolved finding exits 1."""

# The `stack` fixture is imported from the charge tests, and so is redefined by every use.
# ruff: noqa: F811
from __future__ import annotations

import csv
import io
from datetime import UTC, datetime

from billing.records import ReconciliationFindingRecord
from db.engine import unit_of_work
from db.repositories import ledger as ledger_repo
from tests.activities.test_billing_activities import (  # noqa: F401  (the stack fixture)
    Stack,
    stack,
)
from tests.conftest import BOTH_BACKENDS
from tests.e2e.test_cli_credit_notes import run


def _finding(n: int) -> ReconciliationFindingRecord:
    return ReconciliationFindingRecord(
        id=f"rcf_cli{n}",
        kind="late_success",
        severity="warning",
        subject_key=f"pi_cli{n}",
        detail=f"payment intent pi_cli{n} succeeded after its attempt was recorded failed",
        found_at=datetime(2026, 1, 5, 6, 0, tzinfo=UTC),
        run_id="settlement-daily-test",
        payment_intent_id=f"pi_cli{n}",
    )


@BOTH_BACKENDS
def test_finance_resolves_a_finding_from_the_command_line(stack: Stack) -> None:
    with unit_of_work(stack.session_factory) as session:
        for n in (1, 2):
            ledger_repo.record_finding(session, _finding(n))

    def stored() -> ReconciliationFindingRecord:
        with unit_of_work(stack.session_factory) as session:
            found = ledger_repo.get_finding(session, "rcf_cli1")
        assert found is not None
        return found

    note = "booked by hand 🧾 (FIN-12)"
    for args in (
        ["rcf_cli1", "--note", "nul\x01x", "--by", "pat"],
        ["rcf_cli1", "--note", "x" * 10_000, "--by", "pat"],
        ["rcf_cli1", "--note", note, "--by", ""],
        ["rcf_cli1", "--by", "pat"],
    ):
        bad = run(stack, "reconciliation", "resolve", *args)
        assert bad.returncode == 2, (args[1:3], bad.stdout, bad.stderr)
        assert "Traceback" not in bad.stderr
    assert stored().resolved_at is None
    missing = run(stack, "reconciliation", "resolve", "rcf_nope", "--note", note, "--by", "pat")
    assert missing.returncode == 1 and "not found" in missing.stderr, missing.stderr

    done = run(stack, "reconciliation", "resolve", "rcf_cli1", "--note", note, "--by", "pat")
    assert done.returncode == 0 and "resolved by pat" in done.stdout, (done.stdout, done.stderr)
    first = stored()
    assert (first.resolved_by, first.resolution_note) == ("pat", note)
    again = run(stack, "reconciliation", "resolve", "rcf_cli1", "--note", note, "--by", "pat")
    assert again.returncode == 0 and "already resolved" in again.stdout
    other = run(stack, "reconciliation", "resolve", "rcf_cli1", "--note", "other", "--by", "kim")
    assert other.returncode == 1 and "pat" in other.stderr, other.stderr
    assert stored() == first

    def listed(status: str) -> list[dict[str, str]]:
        out = run(stack, "reconciliation", "findings", "--status", status, "--csv")
        assert out.returncode == 0, out.stderr
        return list(csv.DictReader(io.StringIO(out.stdout)))

    assert [r["id"] for r in listed("open")] == ["rcf_cli2"]
    [row] = listed("resolved")
    assert (row["id"], row["resolved_by"], row["resolution_note"]) == ("rcf_cli1", "pat", note)
    table = run(stack, "reconciliation", "findings", "--status", "resolved")
    assert table.returncode == 0 and "rcf_cli1" in table.stdout
    assert run(stack, "reconciliation", "findings", "--status", "closed").returncode == 2
