"""Customer mails through a real SMTP server (aiosmtpd), delivered by the real delivery
workflows on the time-skipping Temporal server from a real database's outbox."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from email.message import EmailMessage

import pytest
from sqlalchemy.orm import Session, sessionmaker
from temporalio.testing import WorkflowEnvironment

from activities.smtp_mailer import SmtpConfig, SmtpMailer
from billing.delivery import NotificationDeliveryInput
from billing.notices import NoticeStatus
from billing.testing.mail_sink import RecordingHandler, smtp_server
from db.engine import make_engine, make_session_factory, unit_of_work
from tests.conftest import BOTH_BACKENDS
from tests.delivery.support import (
    delivery_activities,
    delivery_stack,
    enqueue,
    make_book,
    notice_payloads,
    notices_of,
    wait_until,
)


@pytest.fixture
def session_factory(database_url: str) -> sessionmaker[Session]:
    return make_session_factory(make_engine(database_url))


def parts(message: EmailMessage) -> tuple[str, str]:
    text = message.get_body(preferencelist=("plain",))
    html = message.get_body(preferencelist=("html",))
    assert text is not None and html is not None, "every mail has a text and an HTML part"
    return str(text.get_content()), str(html.get_content())


#: How each currency's amount must appear (English locale): exponent from CLDR.
EXPECTED_AMOUNT = {("USD", 2900): "$29.00", ("JPY", 1200): "¥1,200", ("KWD", 12345): "KWD12.345"}


@BOTH_BACKENDS
async def test_every_kind_renders_in_usd_jpy_kwd_and_arrives_once(
    temporal_env: WorkflowEnvironment, session_factory: sessionmaker[Session]
) -> None:
    handler = RecordingHandler()
    expected: dict[str, tuple[str, str]] = {}  # notice id -> (kind, amount text)
    with unit_of_work(session_factory) as session:
        for (currency, amount), shown in EXPECTED_AMOUNT.items():
            book = make_book(session, currency=currency, amount_minor=amount, timezone="Asia/Tokyo")
            for kind, (payload, about_invoice) in notice_payloads(book).items():
                notice = enqueue(session, book, kind, payload, with_invoice=about_invoice)
                expected[notice.id] = (kind, shown)
    with smtp_server(handler) as port:
        activities = delivery_activities(session_factory, port)
        async with delivery_stack(temporal_env.client, activities):
            await wait_until(
                lambda: all(n.status != "pending" for n in notices_of(session_factory)),
                what="every notice delivered",
            )
    stored = {n.id: n for n in notices_of(session_factory)}
    assert {n.status for n in stored.values()} == {NoticeStatus.SENT}
    assert all(n.sent_at is not None and n.attempts == 1 for n in stored.values())
    assert len(handler.received) == len(expected) == 24
    by_message_id = Counter(str(m.message()["Message-ID"]) for m in handler.received)
    assert set(by_message_id.values()) == {1}, "each notice arrives exactly once"
    for mail in handler.received:
        message = mail.message()
        notice_id = str(message["X-Billing-Notice"]).split()[1]
        kind, shown = expected[notice_id]
        assert message["Message-ID"] == stored[notice_id].message_id
        assert mail.rcpt_tos == ["ada@example.com"]
        text, html = parts(message)
        assert "Ada Lovelace" in text and "Ada Lovelace" in html
        if kind != "subscription_canceled":
            assert shown in text, (kind, text)
            assert shown in html, (kind, html)
            assert shown in str(message["Subject"]) or kind in (
                "subscription_unpaid",
                "trial_ending",
            )
        if kind == "payment_failed":
            # The next try in the customer's zone (Tokyo is UTC+9: 12:00 UTC is 21:00 JST).
            assert "March 4, 2026" in text and "9:00:00\u202fPM" in text, text
            assert "https://shop.example/billing/card" in text
        if kind == "action_required":
            assert "https://shop.example/pay/pi_456" in text and "pi_456" in html
        if kind == "trial_ending":
            assert "March 4, 2026" in str(message["Subject"])


async def test_a_german_customer_reads_german_number_and_date_formats(
    temporal_env: WorkflowEnvironment, session_factory: sessionmaker[Session]
) -> None:
    handler = RecordingHandler()
    with unit_of_work(session_factory) as session:
        book = make_book(
            session, currency="KWD", amount_minor=12345, timezone="Europe/Berlin", locale="de-DE"
        )
        payload, _ = notice_payloads(book)["payment_failed"]
        enqueue(session, book, "payment_failed", payload, with_invoice=True)
    with smtp_server(handler) as port:
        async with delivery_stack(temporal_env.client, delivery_activities(session_factory, port)):
            await wait_until(lambda: len(handler.received) == 1, what="the mail")
    text, html = parts(handler.received[0].message())
    assert "12,345\xa0KWD" in text and "12,345\xa0KWD" in html
    assert "4. März 2026" in text and "13:00:00 MEZ" in text


async def test_opt_out_skips_receipts_and_reminders_never_dunning(
    temporal_env: WorkflowEnvironment, session_factory: sessionmaker[Session]
) -> None:
    handler = RecordingHandler()
    with unit_of_work(session_factory) as session:
        book = make_book(session, opt_out=True)
        for kind, (payload, about_invoice) in notice_payloads(book).items():
            enqueue(session, book, kind, payload, with_invoice=about_invoice)
        nobody = make_book(session, email=None)
        enqueue(session, nobody, "payment_failed", {}, with_invoice=True)
    with smtp_server(handler) as port:
        async with delivery_stack(temporal_env.client, delivery_activities(session_factory, port)):
            await wait_until(
                lambda: all(n.status != "pending" for n in notices_of(session_factory)),
                what="every notice handled",
            )
    status = {(n.customer_id, n.kind): n for n in notices_of(session_factory)}
    skipped = {k for (c, k), n in status.items() if c == book.customer.id and n.status == "skipped"}
    assert skipped == {"receipt", "trial_ending"}
    assert status[(book.customer.id, "receipt")].last_error == (
        "the customer opted out of non-essential mails"
    )
    received = Counter(str(m.message()["X-Billing-Notice"]).split()[0] for m in handler.received)
    assert received == Counter(
        {
            "payment_failed": 1,
            "action_required": 1,
            "payment_recovered": 1,
            "subscription_unpaid": 1,
            "subscription_canceled": 1,
            "upcoming_renewal": 1,
        }
    )
    no_email = status[(nobody.customer.id, "payment_failed")]
    assert no_email.status == "skipped" and no_email.last_error == (
        "the customer has no e-mail address"
    )


async def test_server_refusing_4xx_is_retried_then_5xx_fails_with_the_reason(
    temporal_env: WorkflowEnvironment, session_factory: sessionmaker[Session]
) -> None:
    handler = RecordingHandler(
        replies=["451 4.3.0 mailbox busy, try later", "550 5.1.1 no such user"]
    )
    with unit_of_work(session_factory) as session:
        book = make_book(session)
        payload, _ = notice_payloads(book)["payment_failed"]
        notice = enqueue(session, book, "payment_failed", payload, with_invoice=True)
    with smtp_server(handler) as port:
        async with delivery_stack(temporal_env.client, delivery_activities(session_factory, port)):
            await wait_until(
                lambda: notices_of(session_factory)[0].attempts == 1, what="the first attempt"
            )
            first = notices_of(session_factory)[0]
            assert first.status == "pending"
            assert first.last_error is not None and "451" in first.last_error
            # The retry waits for the backoff (30 s): skip it.
            await temporal_env.sleep(timedelta(minutes=2))
            await wait_until(
                lambda: notices_of(session_factory)[0].status != "pending", what="the 5xx"
            )
    final = notices_of(session_factory)[0]
    assert final.id == notice.id
    assert final.status == "failed" and final.failed_at is not None and final.sent_at is None
    assert final.attempts == 2
    assert final.last_error == "the mail server refused it: 550 5.1.1 no such user"
    assert handler.refused == ["451 4.3.0 mailbox busy, try later", "550 5.1.1 no such user"]
    assert handler.received == []


class CrashAfterSend(SmtpMailer):
    """The server accepts the mail, then the worker dies before recording it (the first
    time only)."""

    crashed = False

    def send(self, message: EmailMessage) -> None:
        super().send(message)
        if not CrashAfterSend.crashed:
            CrashAfterSend.crashed = True
            raise SystemExit("worker killed after the server accepted the mail")


async def test_worker_killed_between_send_and_mark_resends_with_the_same_message_id(
    session_factory: sessionmaker[Session],
) -> None:
    """At most one duplicate, which the receiver can drop by its Message-ID: SMTP has no
    idempotency key, so exactly-once ends at the server's acceptance."""
    handler = RecordingHandler()
    with unit_of_work(session_factory) as session:
        book = make_book(session)
        payload, _ = notice_payloads(book)["receipt"]
        notice = enqueue(session, book, "receipt", payload, with_invoice=True)
    with smtp_server(handler) as port:
        mailer = CrashAfterSend(SmtpConfig(host="127.0.0.1", port=port, timeout_s=5))
        activities = delivery_activities(session_factory, None, mailer=mailer)
        with pytest.raises(SystemExit):
            activities.deliver_notification(NotificationDeliveryInput(notice.id))
        assert notices_of(session_factory)[0].status == "pending"
        # Temporal runs the activity again after its timeout.
        result = activities.deliver_notification(NotificationDeliveryInput(notice.id))
        assert result.status == "sent"
        # A third run (a retry after a lost result) sends nothing.
        assert (
            activities.deliver_notification(NotificationDeliveryInput(notice.id)).status == "sent"
        )
    ids = [str(m.message()["Message-ID"]) for m in handler.received]
    assert len(ids) == 2 and len(set(ids)) == 1
    stored = notices_of(session_factory)[0]
    assert stored.status == "sent" and stored.message_id == ids[0]


def lf_parts(message: EmailMessage) -> tuple[str, str]:
    text, html = parts(message)
    return text.replace("\r\n", "\n"), html.replace("\r\n", "\n")


#: A French customer's amounts (CLDR fr: comma decimals, narrow no-break space groups, the
#: symbol after a no-break space), with each currency's own decimals.
FRENCH_AMOUNT = {
    ("EUR", 2900): "29,00\xa0€",
    ("JPY", 120000): "120\u202f000\xa0JPY",
    ("KWD", 12345): "12,345\xa0KWD",
}


@BOTH_BACKENDS
async def test_a_french_customers_mails_are_in_french_with_french_amounts(
    temporal_env: WorkflowEnvironment, session_factory: sessionmaker[Session]
) -> None:
    """customers.locale picks the catalog: every kind in French for fr-FR, with the amount
    formatted for France in EUR, JPY and KWD; a locale without a catalog (ja) reads English;
    German words for de-AT."""
    handler = RecordingHandler()
    books = {}
    with unit_of_work(session_factory) as session:
        for (currency, amount), _shown in FRENCH_AMOUNT.items():
            book = make_book(
                session,
                currency=currency,
                amount_minor=amount,
                timezone="Europe/Paris",
                locale="fr-FR",
                name="Zoë \U0001f600 <Dupont> & fils",
                email="zoe@example.fr",
            )
            books[currency] = book
            for kind, (payload, about_invoice) in notice_payloads(book).items():
                enqueue(session, book, kind, payload, with_invoice=about_invoice)
        english = make_book(session, currency="EUR", locale="ja-JP", email="ken@example.jp")
        payload, _ = notice_payloads(english)["payment_failed"]
        enqueue(session, english, "payment_failed", payload, with_invoice=True)
        german = make_book(
            session, currency="EUR", locale="de-AT", timezone="Europe/Vienna", email="k@example.at"
        )
        enqueue(session, german, "payment_failed", payload, with_invoice=True)
    with smtp_server(handler) as port:
        async with delivery_stack(temporal_env.client, delivery_activities(session_factory, port)):
            await wait_until(
                lambda: all(n.status != "pending" for n in notices_of(session_factory)),
                what="every notice delivered",
            )
    assert len(handler.received) == 3 * 8 + 2
    for (currency, _amount), shown in FRENCH_AMOUNT.items():
        failed = next(
            m.message()
            for m in handler.received
            if str(m.message()["X-Billing-Notice"]).startswith("payment_failed")
            and shown in str(m.message()["Subject"])
        )
        text, html = lf_parts(failed)
        assert str(failed["Subject"]) == f"Votre paiement de {shown} a échoué"
        assert text.startswith("Bonjour Zoë \U0001f600 <Dupont> & fils,\n")
        assert "Bonjour Zoë \U0001f600 &lt;Dupont&gt; &amp; fils," in html
        failed_line = f"Nous n\u2019avons pas pu encaisser votre paiement de {shown} pour"
        assert failed_line in text
        assert f"de {shown} pour la facture" in html
        # The next try, in French, in the customer's zone (12:00 UTC is 13:00 in Paris).
        assert "Nous réessaierons le 4 mars 2026" in text and "13:00:00" in text
        assert "Mettez à jour votre carte : https://shop.example/billing/card" in text
        assert '<html lang="fr">' in html
        for english_word in ("We could not", "Hello", "Update your card", "automatic message"):
            assert english_word not in text + html, (currency, english_word)

    def to(address: str) -> list[EmailMessage]:
        return [m.message() for m in handler.received if m.rcpt_tos == [address]]

    assert len(to("zoe@example.fr")) == 24
    for message in to("zoe@example.fr"):
        text, html = lf_parts(message)
        assert text.startswith("Bonjour "), text
        assert "Ceci est un message automatique concernant votre abonnement." in html
    (japanese,) = to("ken@example.jp")
    assert lf_parts(japanese)[0].startswith("Hello Ada Lovelace,\n")
    assert "We could not take your payment of" in lf_parts(japanese)[0]
    (austrian,) = to("k@example.at")
    # Austrian German writes the symbol first.
    assert str(austrian["Subject"]) == "Ihre Zahlung von €\xa029,00 ist fehlgeschlagen"
    assert "Wir konnten Ihre Zahlung von €\xa029,00 für Rechnung" in lf_parts(austrian)[0]
