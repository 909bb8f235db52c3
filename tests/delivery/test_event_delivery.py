"""Events for the business, delivered by the real stream workflows on the time-skipping server
to real HTTP receivers: signed, in order per subscription, through a day-long outage, without
a slow endpoint holding up others, and with an endpoint that fails for 3 days disabled."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import timedelta

import pytest
from sqlalchemy.orm import Session, sessionmaker
from temporalio.testing import WorkflowEnvironment

from billing.business_events import ACCOUNT_STREAM, SignatureError, verify_signature
from billing.ids import new_id
from billing.records import EventEndpointRecord
from billing.testing.event_receiver import EventReceiver, event_receiver
from billing.testing.mail_sink import RecordingHandler, smtp_server
from db.engine import make_engine, make_session_factory, unit_of_work
from db.repositories import events as events_repo
from tests.conftest import BOTH_BACKENDS
from tests.delivery.support import (
    T0,
    delivery_activities,
    delivery_stack,
    make_book,
    notices_of,
    wait_until,
)


@pytest.fixture
def session_factory(database_url: str) -> sessionmaker[Session]:
    return make_session_factory(make_engine(database_url))


def add_endpoint(
    session: Session, url: str, secret: str = "bwhsec_test", contact_email: str | None = None
) -> EventEndpointRecord:
    stored, created = events_repo.insert_endpoint(
        session,
        EventEndpointRecord(
            id=new_id("we"),
            url=url,
            url_digest=hashlib.sha256(url.encode()).hexdigest(),
            event_types=["*"],
            secret=secret,
            created_at=T0,
            updated_at=T0,
            contact_email=contact_email,
        ),
    )
    assert created
    return stored


def write_events(session: Session, count: int) -> list[str]:
    """``count`` events for each of two subscriptions; their subscription ids."""
    subs = []
    for _ in range(2):
        book = make_book(session)
        for n in range(count):
            events_repo.record_event(
                session,
                type="subscription.updated",
                subscription_id=book.subscription.id,
                object_id=book.subscription.id,
                object={"id": book.subscription.id, "n": n},
                dedupe_key=f"{book.subscription.id}:{n}",
                created_at=T0 + timedelta(seconds=n),
            )
        subs.append(book.subscription.id)
    return subs


def in_order_once(receiver: EventReceiver, subs: list[str], count: int) -> None:
    accepted = receiver.accepted()
    assert len(accepted) == len(subs) * count
    assert len({e["id"] for e in accepted}) == len(accepted), "each event accepted once"
    for sub in subs:
        assert [e["sequence"] for e in accepted if e["subscription_id"] == sub] == list(
            range(1, count + 1)
        )


@BOTH_BACKENDS
async def test_signed_events_arrive_once_in_order_after_a_day_long_outage(
    temporal_env: WorkflowEnvironment, session_factory: sessionmaker[Session]
) -> None:
    with event_receiver(status=503) as down, event_receiver() as up:
        with unit_of_work(session_factory) as session:
            subs = write_events(session, 3)
            down_endpoint = add_endpoint(session, down.url, secret="bwhsec_down")
            add_endpoint(session, up.url, secret="bwhsec_up")
        with unit_of_work(session_factory) as session:
            for sub in subs:
                for n in range(3, 5):
                    events_repo.record_event(
                        session,
                        type="invoice.paid",
                        subscription_id=sub,
                        object_id=sub,
                        object={"n": n},
                        dedupe_key=f"{sub}:late:{n}",
                        created_at=T0 + timedelta(minutes=n),
                    )
        activities = delivery_activities(session_factory, None)
        async with delivery_stack(temporal_env.client, activities, interval_s=3600):
            # The healthy endpoint gets everything while the other is down.
            await wait_until(lambda: len(up.accepted()) == 4, what="the healthy endpoint")
            await wait_until(lambda: len(down.requests) >= 2, what="first tries at the down one")
            # A day passes (skipped); the down endpoint is retried with backoff meanwhile.
            await temporal_env.sleep(timedelta(days=1))
            tries = len(down.requests)
            assert tries >= 2 * 10, tries
            # Never the next event before the previous one was accepted.
            assert {e["sequence"] for e in down.all_events()} == {4}
            down.status = 200
            await temporal_env.sleep(timedelta(hours=3))  # the next retry (at most 2 h apart)
            await wait_until(lambda: len(down.accepted()) == 4, what="the endpoint back up")
    # Events 1-3 were written before the endpoints existed: an endpoint gets what happens
    # after it is registered (GET /v1/events has the rest).
    for receiver in (down, up):
        accepted = receiver.accepted()
        for sub in subs:
            assert [e["sequence"] for e in accepted if e["subscription_id"] == sub] == [4, 5]
        assert len({e["id"] for e in accepted}) == 4
    for request in down.requests:
        verify_signature(request.body, request.headers["Billing-Signature"], "bwhsec_down")
        with pytest.raises(SignatureError, match="no signature matches"):
            verify_signature(request.body, request.headers["Billing-Signature"], "bwhsec_up")
        with pytest.raises(SignatureError, match="no signature matches"):
            verify_signature(
                request.body.replace(b'"n":', b'"n": '),
                request.headers["Billing-Signature"],
                "bwhsec_down",
            )
    with unit_of_work(session_factory) as session:
        first = down.accepted()[0]
        deliveries = events_repo.list_deliveries(session, first["id"])
        mine = [d for d in deliveries if d.endpoint_id == down_endpoint.id]
        attempts = events_repo.list_delivery_attempts(session, [mine[0].id])
    assert mine[0].status == "delivered"
    assert [a.status_code for a in attempts][-1] == 200
    assert set(a.status_code for a in attempts[:-1]) == {503}


async def test_a_slow_endpoint_does_not_hold_up_another(
    temporal_env: WorkflowEnvironment, session_factory: sessionmaker[Session]
) -> None:
    with event_receiver(delay_s=2.0) as slow, event_receiver() as fast:
        with unit_of_work(session_factory) as session:
            add_endpoint(session, slow.url)
            add_endpoint(session, fast.url)
            subs = write_events(session, 3)
        async with delivery_stack(
            temporal_env.client, delivery_activities(session_factory, None), interval_s=3600
        ):
            await wait_until(lambda: len(fast.accepted()) == 6, timeout_s=8, what="fast endpoint")
            assert len(slow.requests) <= 2, "the slow one is still busy with its first events"
            await wait_until(lambda: len(slow.accepted()) == 6, timeout_s=30, what="slow endpoint")
    in_order_once(fast, subs, 3)
    in_order_once(slow, subs, 3)


@BOTH_BACKENDS
async def test_an_endpoint_failing_for_three_days_is_disabled_and_the_business_told_once(
    temporal_env: WorkflowEnvironment, session_factory: sessionmaker[Session]
) -> None:
    """Two dead endpoints, each with two streams: each is disabled once and its business
    mailed once (through the outbox and the real SMTP server): the endpoint's own
    contact_email, else the BILLING_EVENTS_CONTACT_EMAIL address."""
    handler = RecordingHandler()
    with event_receiver(status=500) as dead, event_receiver(status=502) as other:
        with unit_of_work(session_factory) as session:
            endpoint = add_endpoint(session, dead.url, contact_email="hooks-owner@shop.example")
            fallback = add_endpoint(session, other.url)
            write_events(session, 2)
        with smtp_server(handler) as port:
            activities = delivery_activities(
                session_factory, port, business_contact="ops@shop.example"
            )
            async with delivery_stack(
                temporal_env.client, activities, interval_s=3600, wake_on_commit=True
            ):
                await wait_until(lambda: len(dead.requests) >= 2, what="first tries")
                # 3 days and 3 hours, skipped a quarter of a day at a time (one long skip
                # with four streams retrying outlasts the test server's call timeout).
                for _ in range(13):
                    await temporal_env.sleep(timedelta(hours=6))

                def disabled() -> bool:
                    with unit_of_work(session_factory) as session:
                        found = [
                            events_repo.get_endpoint(session, e.id) for e in (endpoint, fallback)
                        ]
                    return all(f is not None and not f.enabled for f in found)

                await wait_until(disabled, what="the endpoints disabled")
                await wait_until(lambda: len(handler.received) >= 2, what="the business's mails")
                # Nothing more comes: the endpoints' other streams stop without a mail.
                await temporal_env.sleep(timedelta(hours=3))
                await asyncio.sleep(1.0)
    with unit_of_work(session_factory) as session:
        found = events_repo.get_endpoint(session, endpoint.id)
        counts = events_repo.delivery_counts(session)
    assert found is not None and found.disabled_reason is not None
    assert found.disabled_reason.startswith("deliveries failed for 3 days: event not accepted")
    assert "500" in found.disabled_reason
    # The first stream to give up failed its head and disabled the endpoint; the other
    # stream stops at its next try (the endpoint is disabled), and everything behind waits
    # for the endpoint to be enabled again.
    assert 2 <= counts["failed"] <= 4 and counts["failed"] + counts["pending"] == 8
    assert {e["sequence"] for e in dead.all_events()} == {1}
    mails = {m.rcpt_tos[0]: m.message() for m in handler.received}
    assert len(handler.received) == 2, [m.rcpt_tos for m in handler.received]
    assert set(mails) == {"hooks-owner@shop.example", "ops@shop.example"}
    stored = {n.recipient: n for n in notices_of(session_factory, kind="endpoint_disabled")}
    for address, target, code in (
        ("hooks-owner@shop.example", endpoint, "500"),
        ("ops@shop.example", fallback, "502"),
    ):
        message = mails[address]
        notice = stored[address]
        assert notice.status == "sent" and notice.customer_id is None
        assert message["Message-ID"] == notice.message_id
        assert target.id in str(message["Subject"])
        text = str(message.get_body(preferencelist=("plain",)).get_content())  # type: ignore[union-attr]
        html = str(message.get_body(preferencelist=("html",)).get_content())  # type: ignore[union-attr]
        for body in (text, html):
            assert target.id in body and target.url in body
            assert f"the endpoint answered {code}" in body
            assert "bwhsec_" not in body, "the signing secret is never mailed"
        assert f"billing event-endpoints enable {target.id}" in text


@BOTH_BACKENDS
async def test_account_level_events_are_their_own_stream_delivered_in_order(
    temporal_env: WorkflowEnvironment, session_factory: sessionmaker[Session]
) -> None:
    """Payouts are the account's, not a subscription's: their stream (``account``) is numbered
    and delivered in order like a subscription's, beside it, through an outage."""
    with event_receiver(status=503) as receiver:
        with unit_of_work(session_factory) as session:
            add_endpoint(session, receiver.url, secret="bwhsec_account")
            book = make_book(session)
            sub = book.subscription.id
            written = [
                (sub, "invoice.paid"),
                (ACCOUNT_STREAM, "payout.paid"),
                (sub, "credit_note.created"),
                (ACCOUNT_STREAM, "payout.reconciliation_completed"),
                (sub, "refund.created"),
                (sub, "refund.succeeded"),
                (ACCOUNT_STREAM, "payout.failed"),
            ]
            for n, (stream, event_type) in enumerate(written):
                events_repo.record_event(
                    session,
                    type=event_type,
                    subscription_id=stream,
                    object_id=f"obj_{n}",
                    object={"n": n},
                    dedupe_key=f"{stream}:{event_type}:{n}:{sub}",
                    created_at=T0 + timedelta(seconds=n),
                )
        activities = delivery_activities(session_factory, None)
        async with delivery_stack(temporal_env.client, activities, interval_s=3600):
            await wait_until(lambda: len(receiver.requests) >= 2, what="first tries")
            await temporal_env.sleep(timedelta(hours=1))  # retried with backoff meanwhile
            assert len(receiver.requests) >= 2 * 5, len(receiver.requests)
            # Each stream's head only, retried: never a later event before it.
            heads = {(e["stream"], e["sequence"]) for e in receiver.all_events()}
            assert heads == {(sub, 1), (ACCOUNT_STREAM, 1)}, heads
            receiver.status = 200
            await temporal_env.sleep(timedelta(hours=3))
            await wait_until(lambda: len(receiver.accepted()) == 7, what="every event")
    accepted = receiver.accepted()
    assert len({e["id"] for e in accepted}) == 7
    account = [e for e in accepted if e["stream"] == ACCOUNT_STREAM]
    assert [(e["type"], e["sequence"], e["subscription_id"]) for e in account] == [
        ("payout.paid", 1, None),
        ("payout.reconciliation_completed", 2, None),
        ("payout.failed", 3, None),
    ]
    ours = [e for e in accepted if e["stream"] == sub]
    assert [(e["type"], e["sequence"], e["subscription_id"]) for e in ours] == [
        ("invoice.paid", 1, sub),
        ("credit_note.created", 2, sub),
        ("refund.created", 3, sub),
        ("refund.succeeded", 4, sub),
    ]
    for request in receiver.requests:
        verify_signature(request.body, request.headers["Billing-Signature"], "bwhsec_account")
