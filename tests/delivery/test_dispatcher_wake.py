"""A commit that writes a notice or an event wakes the delivery dispatcher: the mail and the
event leave within a moment, not at the next poll (here an hour: the poll never comes)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy.orm import Session, sessionmaker
from temporalio.testing import WorkflowEnvironment

from billing.api.app import create_app, wake_dispatcher_on_commits
from billing.clock import SystemClock
from billing.delivery import DispatcherInput
from billing.ids import new_id
from billing.records import EventEndpointRecord
from billing.settings import ApiKey, Settings
from billing.testing.event_receiver import event_receiver
from billing.testing.mail_sink import RecordingHandler, smtp_server
from billing.worker import Dependencies
from db.engine import make_engine, make_session_factory, unit_of_work
from db.repositories import events as events_repo
from tests.conftest import BOTH_BACKENDS
from tests.delivery.support import (
    T0,
    delivery_activities,
    delivery_stack,
    enqueue,
    make_book,
    notice_payloads,
    wait_until,
)

ADMIN_KEY = "test-admin-key-0123456789abcdef"


@pytest.fixture
def session_factory(database_url: str) -> sessionmaker[Session]:
    return make_session_factory(make_engine(database_url))


@BOTH_BACKENDS
async def test_a_written_notice_and_event_wake_the_dispatcher(
    temporal_env: WorkflowEnvironment, session_factory: sessionmaker[Session]
) -> None:
    handler = RecordingHandler()
    with smtp_server(handler) as port, event_receiver() as receiver:
        with unit_of_work(session_factory) as session:
            url = receiver.url
            events_repo.insert_endpoint(
                session,
                EventEndpointRecord(
                    id=new_id("we"),
                    url=url,
                    url_digest=hashlib.sha256(url.encode()).hexdigest(),
                    event_types=["*"],
                    secret="bwhsec_wake",
                    created_at=T0,
                    updated_at=T0,
                ),
            )
            book = make_book(session)
        activities = delivery_activities(session_factory, port)
        async with delivery_stack(
            temporal_env.client, activities, interval_s=3600, wake_on_commit=True
        ):
            await asyncio.sleep(1.5)  # the dispatcher's first look found nothing: it sleeps
            started = time.monotonic()
            with unit_of_work(session_factory) as session:
                payload, _ = notice_payloads(book)["payment_failed"]
                enqueue(session, book, "payment_failed", payload, with_invoice=True)
                events_repo.record_event(
                    session,
                    type="invoice.payment_failed",
                    subscription_id=book.subscription.id,
                    object_id=book.invoice.id,
                    object={"id": book.invoice.id},
                    dedupe_key=f"{book.invoice.id}:wake",
                    created_at=T0,
                )
            await wait_until(lambda: len(handler.received) == 1, timeout_s=15, what="the mail")
            await wait_until(lambda: len(receiver.accepted()) == 1, timeout_s=15, what="event")
            first_latency = time.monotonic() - started

            # A burst of commits from 20 threads at once: every one arrives, once.
            def write(n: int) -> None:
                with unit_of_work(session_factory) as session:
                    payload, _ = notice_payloads(book)["receipt"]
                    enqueue(session, book, "receipt", payload, with_invoice=True)
                    events_repo.record_event(
                        session,
                        type="invoice.paid",
                        subscription_id=book.subscription.id,
                        object_id=book.invoice.id,
                        object={"n": n},
                        dedupe_key=f"{book.invoice.id}:burst:{n}",
                        created_at=T0 + timedelta(seconds=n),
                    )

            with ThreadPoolExecutor(max_workers=20) as pool:
                list(pool.map(write, range(20)))
            await wait_until(lambda: len(handler.received) == 21, timeout_s=30, what="burst")
            await wait_until(lambda: len(receiver.accepted()) == 21, timeout_s=30, what="events")
    assert first_latency < 10, first_latency
    ids = [str(m.message()["Message-ID"]) for m in handler.received]
    assert len(set(ids)) == 21
    sequences = [e["sequence"] for e in receiver.accepted()]
    assert sequences == list(range(1, 22)), "in order per subscription"


async def test_a_burst_larger_than_a_batch_does_not_wait_for_the_poll(
    temporal_env: WorkflowEnvironment, session_factory: sessionmaker[Session]
) -> None:
    """12 mails, batches of 5: the dispatcher looks again at once after a full batch, so all
    12 leave now, not 5 now and the rest an interval (here an hour) later per batch."""
    handler = RecordingHandler()
    with unit_of_work(session_factory) as session:
        book = make_book(session)
        for _ in range(12):
            payload, _ = notice_payloads(book)["receipt"]
            enqueue(session, book, "receipt", payload, with_invoice=True)
    with smtp_server(handler) as port:
        activities = delivery_activities(session_factory, port)
        async with delivery_stack(temporal_env.client, activities, interval_s=3600, batch=5):
            await wait_until(lambda: len(handler.received) == 12, timeout_s=20, what="12 mails")


@BOTH_BACKENDS
async def test_a_manual_redelivery_through_the_api_wakes_the_dispatcher(
    temporal_env: WorkflowEnvironment, session_factory: sessionmaker[Session]
) -> None:
    """``POST /v1/events/{id}/redeliver`` commits in the API's process: as ``billing api``
    serves it (``wake_dispatcher_on_commits``), that commit wakes the dispatcher, so the event
    leaves within a moment instead of at the next poll (here an hour: it never comes)."""
    with event_receiver() as receiver:
        with unit_of_work(session_factory) as session:
            url = receiver.url
            endpoint, _ = events_repo.insert_endpoint(
                session,
                EventEndpointRecord(
                    id=new_id("we"),
                    url=url,
                    url_digest=hashlib.sha256(url.encode()).hexdigest(),
                    event_types=["*"],
                    secret="bwhsec_redeliver",
                    created_at=T0,
                    updated_at=T0,
                ),
            )
            book = make_book(session)
            event = events_repo.record_event(
                session,
                type="invoice.paid",
                subscription_id=book.subscription.id,
                object_id=book.invoice.id,
                object={"id": book.invoice.id},
                dedupe_key=f"{book.invoice.id}:redeliver",
                created_at=T0,
            )
        assert event is not None
        settings = Settings(
            _env_file=None,
            environment="test",
            database_url="sqlite://",
            api_keys=[ApiKey(name="admin-key", scope="admin", key=SecretStr(ADMIN_KEY))],
        )
        deps = Dependencies(session_factory=session_factory, gateway=None, clock=SystemClock())  # type: ignore[arg-type]
        app = create_app(settings, deps=deps, temporal=temporal_env.client)
        activities = delivery_activities(session_factory, None)
        async with delivery_stack(temporal_env.client, activities, interval_s=3600) as queue:
            # The dispatcher's first look (at its start) delivers it; then it sleeps an hour.
            await wait_until(lambda: len(receiver.accepted()) == 1, timeout_s=15, what="first")
            await asyncio.sleep(1.0)
            waker = wake_dispatcher_on_commits(app, DispatcherInput(task_queue=queue))
            try:
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                    started = time.monotonic()
                    answer = await http.post(
                        f"/v1/events/{event.id}/redeliver",
                        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                        json={"endpoint_id": endpoint.id},
                    )
                    assert answer.status_code == 200, answer.text
                    await wait_until(
                        lambda: len(receiver.accepted()) == 2, timeout_s=15, what="redelivered"
                    )
                    latency = time.monotonic() - started
            finally:
                waker.detach()
    assert [e["id"] for e in receiver.accepted()] == [event.id, event.id]
    print(f"redelivery: request to the endpoint's 200 in {latency:.2f} s")
    assert latency < 10, latency
