"""Attack on a credit note's free text (its memo, the reason finance writes) on both
databases: NUL, a control character, one character over the column, 10,000 characters and a
card number are refused naming the field and write nothing; 500 emoji (the column's bound,
four UTF-8 bytes each) and right-to-left text are stored and read back exactly, in the API and
the CSV. The same request twice under one key is one credit note."""

from __future__ import annotations

import csv
import io

import pytest

from tests.api.support import Api
from tests.api.test_credit_notes_api import issue, paid_invoice, settlement_counts
from tests.conftest import BOTH_BACKENDS

pytestmark = BOTH_BACKENDS


@pytest.mark.parametrize(
    ("memo", "status"),
    [
        ("a\x00b", 422),
        ("bell \x07", 422),
        ("x" * 501, 422),
        ("x" * 10_000, 413),  # over the API's body limit before any field is read
        ("card 4242 4242 4242 4242", 422),
    ],
    ids=["nul", "control", "501", "10k", "card"],
)
async def test_a_bad_memo_is_refused_and_writes_nothing(api: Api, memo: str, status: int) -> None:
    invoice = await paid_invoice(api)
    before = settlement_counts(api)
    response = await issue(api, invoice["id"], {"amount_minor": 100, "memo": memo})
    assert response.status_code == status, response.text
    assert "4242" not in response.text
    if status == 422:
        assert response.json()["error"]["field"] == "memo"
    assert settlement_counts(api) == before


@pytest.mark.parametrize(
    "memo",
    ["🧾" * 500, "שלום عليكم — refund for the outage", "tab\tand\nnew line"],
    ids=["500-emoji", "rtl", "multiline"],
)
async def test_any_printable_memo_is_stored_exactly_and_a_repeat_is_one_note(
    api: Api, memo: str
) -> None:
    invoice = await paid_invoice(api)
    body = {"amount_minor": 100, "memo": memo}
    first = await issue(api, invoice["id"], body, key="memo-attack-1")
    assert first.status_code == 201, first.text
    again = await issue(api, invoice["id"], body, key="memo-attack-1")
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    note = await api.request("GET", f"/v1/credit-notes/{first.json()['id']}", scope="finance")
    assert note.json()["memo"] == memo
    exported = await api.request("GET", "/v1/credit-notes.csv", scope="finance")
    [row] = [
        r
        for r in csv.DictReader(io.StringIO(exported.text))
        if r["credit_note_id"] == note.json()["id"]
    ]
    assert row["memo"] == memo
    listed = await api.request(
        "GET", "/v1/credit-notes", scope="finance", params={"invoice_id": invoice["id"]}
    )
    assert [n["id"] for n in listed.json()["data"]] == [first.json()["id"]]
