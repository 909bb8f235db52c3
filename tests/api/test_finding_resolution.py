"""Finance resolves a reconciliation finding with a note (who, when, why): through the API
(scope admin) and listed open or resolved in the API and its CSV; the metric's count is of open
findings only; a finding found again after its resolution stays one row, resolved. Bad input
and repeats, on both databases."""

from __future__ import annotations

import asyncio
import csv
import io
from datetime import UTC, datetime

import pytest

from billing.records import ReconciliationFindingRecord
from billing.worker import _count_findings
from db.engine import unit_of_work
from db.repositories import ledger as ledger_repo
from tests.api.support import Api
from tests.conftest import BOTH_BACKENDS

pytestmark = BOTH_BACKENDS

FOUND_AT = datetime(2026, 1, 5, 6, 0, tzinfo=UTC)


def _finding(n: int, severity: str = "error") -> ReconciliationFindingRecord:
    return ReconciliationFindingRecord(
        id=f"rcf_test{n}",
        kind="charge_without_attempt",
        severity=severity,
        subject_key=f"ch_test{n}",
        detail=f"charge ch_test{n} of 500 usd has no attempt of ours",
        found_at=FOUND_AT,
        run_id="settlement-daily-test",
        charge_id=f"ch_test{n}",
        amount_minor=500,
        currency="usd",
    )


def _record(api: Api, *findings: ReconciliationFindingRecord) -> list[bool]:
    with unit_of_work(api.harness.deps.session_factory) as session:
        return [ledger_repo.record_finding(session, f)[1] for f in findings]


def _stored(api: Api, finding_id: str) -> ReconciliationFindingRecord:
    with unit_of_work(api.harness.deps.session_factory) as session:
        found = ledger_repo.get_finding(session, finding_id)
    assert found is not None
    return found


async def test_finance_resolves_a_finding_with_a_note_and_lists_open_and_resolved(
    api: Api,
) -> None:
    assert _record(api, _finding(1), _finding(2, "warning")) == [True, True]
    assert _count_findings(api.harness.deps.session_factory) == {"error": 1, "warning": 1}

    # Finance reads; only admin resolves (nothing written on a refusal).
    path = "/v1/reconciliation/findings/rcf_test1/resolve"
    body = {"note": "refunded by hand, ticket FIN-7 🧾"}
    assert (await api.request("POST", path, scope="finance", json=body)).status_code == 403
    assert _stored(api, "rcf_test1").resolved_at is None
    resolved = await api.request("POST", path, scope="admin", json=body)
    assert resolved.status_code == 200, resolved.text
    answer = resolved.json()
    assert answer["status"] == "resolved"
    assert answer["resolution"]["resolved_by"] == "admin-key"
    assert answer["resolution"]["note"] == body["note"]
    stored = _stored(api, "rcf_test1")
    assert stored.resolution_note == body["note"] and stored.resolved_by == "admin-key"
    assert stored.resolved_at is not None

    # The same resolution again: answered unchanged. Another one: 409 naming who and when.
    again = await api.request("POST", path, scope="admin", json=body)
    assert again.status_code == 200 and again.json() == answer
    other = await api.request("POST", path, scope="admin", json={"note": "something else"})
    assert other.status_code == 409 and "admin-key" in other.text
    assert _stored(api, "rcf_test1") == stored

    async def listed(status: str | None) -> list[str]:
        params = {} if status is None else {"status": status}
        got = await api.request(
            "GET", "/v1/reconciliation/findings", scope="finance", params=params
        )
        assert got.status_code == 200, got.text
        # Only what is still open counts, in the API as in the metric.
        assert got.json()["by_severity"] == {"warning": 1}
        return [f["id"] for f in got.json()["data"]]

    assert await listed("open") == ["rcf_test2"]
    assert await listed("resolved") == ["rcf_test1"]
    assert await listed(None) == ["rcf_test1", "rcf_test2"]
    assert _count_findings(api.harness.deps.session_factory) == {"warning": 1}

    exported = await api.request(
        "GET", "/v1/reconciliation/findings.csv", scope="finance", params={"status": "resolved"}
    )
    assert exported.status_code == 200
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert [(r["id"], r["status"], r["resolved_by"], r["resolution_note"]) for r in rows] == [
        ("rcf_test1", "resolved", "admin-key", body["note"])
    ]

    # The next daily run finds the same difference: one row still, and still resolved.
    assert _record(api, _finding(1)) == [False]
    assert _stored(api, "rcf_test1") == stored
    assert await listed("open") == ["rcf_test2"]


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"note": "nul \x00 inside"}, 422, "note"),
        ({"note": "x" * 2001}, 422, "note"),
        # Over the API's body limit before any field is read.
        ({"note": "x" * 10_000}, 413, "body"),
        ({"note": ""}, 422, "note"),
        ({"note": 42}, 422, "note"),
        ({}, 422, "note"),
        ({"note": "fine", "extra": 1}, 422, "extra"),
        ({"note": "card 4242 4242 4242 4242"}, 422, "note"),
    ],
    ids=["nul", "2001", "10k", "empty", "number", "missing", "unknown", "card"],
)
async def test_a_bad_resolution_is_refused_naming_the_field_and_writes_nothing(
    api: Api, body: dict[str, object], status: int, field: str
) -> None:
    _record(api, _finding(1))
    path = "/v1/reconciliation/findings/rcf_test1/resolve"
    refused = await api.request("POST", path, scope="admin", json=body)
    assert refused.status_code == status, refused.text
    assert field in refused.text
    assert _stored(api, "rcf_test1").resolved_at is None


async def test_unknown_findings_and_bad_filters_are_refused(api: Api) -> None:
    missing = await api.request(
        "POST", "/v1/reconciliation/findings/rcf_nope/resolve", scope="admin", json={"note": "x"}
    )
    assert missing.status_code == 404
    for params in ({"status": "closed"}, {"status": "open", "state": "x"}):
        for path in ("/v1/reconciliation/findings", "/v1/reconciliation/findings.csv"):
            got = await api.request("GET", path, scope="finance", params=params)
            assert got.status_code == 422, (path, params, got.text)


async def test_twenty_parallel_resolutions_record_one(api: Api) -> None:
    _record(api, _finding(1))
    path = "/v1/reconciliation/findings/rcf_test1/resolve"
    answers = await asyncio.gather(
        *(
            api.request("POST", path, scope="admin", json={"note": f"resolution {n}"})
            for n in range(20)
        )
    )
    codes = sorted(a.status_code for a in answers)
    assert codes == [200] + [409] * 19, codes
    winner = next(a for a in answers if a.status_code == 200).json()["resolution"]["note"]
    assert _stored(api, "rcf_test1").resolution_note == winner
