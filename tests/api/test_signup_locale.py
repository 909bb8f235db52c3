"""POST /v1/subscriptions takes the customer's locale: a BCP 47 tag CLDR has data for, stored
on the customer as its canonical tag and used by their mails and invoice documents. A bad one
(NUL, 10,000 characters, not a tag, unknown to CLDR) is a 422 naming customer.locale, and
nothing is written: no customer, no subscription, no workflow, no Stripe customer."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from activities.delivery import DeliveryActivities, MailSettings
from billing.clock import SystemClock
from billing.errors import InvalidInput
from billing.signup import CustomerDetails, SignupRequest
from billing.testing.cards import SUCCEEDS
from db.engine import unit_of_work
from db.repositories import customers as customers_repo
from db.repositories import notifications as notifications_repo
from tests.api.support import Api, eventually, row_counts
from tests.conftest import BOTH_BACKENDS


def pdf_text(pdf: bytes, tmp_path: Path) -> str:
    assert shutil.which("pdftotext"), "pdftotext is missing: apt-get install poppler-utils"
    path = tmp_path / "invoice.pdf"
    path.write_bytes(pdf)
    text = subprocess.run(
        ["pdftotext", str(path), "-"], check=True, capture_output=True, text=True
    ).stdout
    return " ".join(text.replace("\u202f", " ").replace("\xa0", " ").split())


@BOTH_BACKENDS
async def test_the_signup_locale_is_stored_and_used_by_documents_and_mails(
    api: Api, tmp_path: Path
) -> None:
    sub = await api.signed_up(
        card=SUCCEEDS,
        customer={"external_id": "fr-1", "email": "zoe@example.com", "name": "Zoé",
                  "timezone": "Europe/Paris", "locale": "fr_fr"},
    )  # fmt: skip
    customer_id = sub["customer_id"]
    shown = await api.request("GET", f"/v1/customers/{customer_id}", scope="finance")
    # Stored as its canonical BCP 47 tag.
    assert shown.json()["locale"] == "fr-FR"
    await api.harness.wait_for(sub["id"], lambda v: v.invoices_issued == 1 and not v.open_invoice)
    listed = await api.request("GET", f"/v1/invoices?subscription_id={sub['id']}", scope="finance")
    [invoice] = listed.json()["data"]

    # The document: French words, 9,00 $US (basic-monthly is USD 9.00), French dates.
    pdf = await api.request("GET", f"/v1/invoices/{invoice['id']}.pdf", scope="finance")
    text = pdf_text(pdf.content, tmp_path)
    assert "Facture" in text and "Montant payé 9,00 $US" in text, text

    # The receipt mail the payment queued, rendered as the delivery activity sends it.
    def receipt() -> object:
        with unit_of_work(api.harness.session_factory) as session:
            found = notifications_repo.list_notifications(session, subscription_id=sub["id"])
        return next((n for n in found if n.kind == "receipt"), None)

    await eventually(receipt)
    delivery = DeliveryActivities(
        api.harness.session_factory,
        SystemClock(),
        mailer=None,
        mail=MailSettings(from_address="Billing <billing@shop.example>"),
    )
    with unit_of_work(api.harness.session_factory) as session:
        message = delivery._message(session, receipt())  # type: ignore[arg-type]
    body = message.get_body(preferencelist=("plain",))
    assert body is not None
    mail = str(body.get_content())
    assert "9,00\xa0$US" in mail and "$9.00" not in mail, mail

    # A later signup of the same customer with another locale replaces it.
    again = await api.signed_up(
        card=SUCCEEDS,
        customer={"external_id": "fr-1", "email": "zoe@example.com", "locale": "de-CH"},
    )
    assert again["customer_id"] == customer_id
    with unit_of_work(api.harness.session_factory) as session:
        stored = customers_repo.get_customer(session, customer_id)
    assert stored is not None and stored.locale == "de-CH"


@BOTH_BACKENDS
@pytest.mark.parametrize(
    ("locale", "says"),
    [
        ("de\x00CH", "NUL"),
        ("d" * 3_000, "at most 35"),
        ("x" * 36, "at most 35"),
        ("", "at least 2"),
        ("english please", "BCP 47"),
        ("de--CH", "BCP 47"),
        ("zz-ZZ", "not a locale CLDR has data for"),
        ("xx", "not a locale CLDR has data for"),
        ("de-QQ", "not a locale CLDR has data for"),
        ("\U0001f600", "at least 2"),
        ("\U0001f600\U0001f600", "BCP 47"),
        (42, "string"),
    ],
)
async def test_a_bad_locale_is_refused_naming_the_field_and_writes_nothing(
    api: Api, locale: object, says: str
) -> None:
    before = row_counts(api.harness)
    response = await api.signup(
        card=SUCCEEDS,
        customer={"external_id": "bad-locale", "email": "x@example.com", "locale": locale},
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == "customer.locale", error
    assert says in error["message"], error["message"]
    assert len(error["message"]) < 400  # 10,000 characters are not echoed back
    assert row_counts(api.harness) == before


@BOTH_BACKENDS
async def test_ten_thousand_characters_are_refused_whatever_the_way_in(api: Api) -> None:
    """Through the API the body limit answers first (413); the signup service itself (the CLI,
    the simulator) refuses the locale by the same rule, naming it and not echoing it."""
    before = row_counts(api.harness)
    response = await api.signup(
        card=SUCCEEDS, customer={"email": "x@example.com", "locale": "d" * 10_000}
    )
    assert response.status_code == 413
    pm = await api.harness.to_thread_card(SUCCEEDS)
    with pytest.raises(InvalidInput) as refused:
        await api.harness.signups.start_subscription(
            SignupRequest(
                plan_code="basic-monthly",
                customer=CustomerDetails(email="x@example.com", locale="d" * 10_000),
                payment_method_id=pm,
            )
        )
    assert refused.value.field == "customer.locale"
    assert "at most 35" in refused.value.message and len(refused.value.message) < 200
    for bad in ("de\x00CH", "zz-ZZ", "de CH"):
        with pytest.raises(InvalidInput) as refused:
            await api.harness.signups.start_subscription(
                SignupRequest(
                    plan_code="basic-monthly",
                    customer=CustomerDetails(email="x@example.com", locale=bad),
                    payment_method_id=pm,
                )
            )
        assert refused.value.field == "customer.locale"
    assert row_counts(api.harness) == before


async def test_a_bad_time_zone_is_refused_too(api: Api) -> None:
    before = row_counts(api.harness)
    for zone, says in (("Mars/Olympus", "unknown time zone"), ("Europe/Paris\x00", "NUL")):
        response = await api.signup(
            card=SUCCEEDS, customer={"email": "x@example.com", "timezone": zone, "locale": "fr"}
        )
        assert response.status_code == 422, response.text
        assert response.json()["error"]["field"] == "customer.timezone"
        assert says in response.json()["error"]["message"]
    assert row_counts(api.harness) == before


async def test_the_same_signup_with_the_locale_spelt_two_ways_is_one_request(api: Api) -> None:
    """The locale is canonicalised before the request's fingerprint: ``de_ch`` and ``de-CH``
    under one Idempotency-Key are the same signup (200 replayed), not a conflict."""
    first = await api.signup(
        card=SUCCEEDS,
        idempotency_key="locale-twice",
        customer={"external_id": "twice", "email": "t@example.com", "locale": "de_ch"},
    )
    assert first.status_code == 201, first.text
    card = first.request.content
    assert b"de_ch" in card
    second = await api.request(
        "POST",
        "/v1/subscriptions",
        scope="signup",
        headers={"Idempotency-Key": "locale-twice", "Content-Type": "application/json"},
        content=card.replace(b"de_ch", b"de-CH"),
    )
    assert second.status_code == 200, second.text
    assert second.headers["Idempotent-Replayed"] == "true"
    assert second.json()["id"] == first.json()["id"]
