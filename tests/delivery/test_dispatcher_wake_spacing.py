"""The dispatcher's wake-ups are spaced: on billing day every paid cycle commits a receipt, and
a wake-up per commit was a signal, a workflow task and a delivery run each (0.8 per paid
cycle in the burst benchmark, a third of Temporal's workflow tasks). A lone commit still
wakes the dispatcher at once; a stream of commits wakes it at most once per
``min_interval_s``, and always once more after the last commit, so nothing waits for the
poll (here an hour: it never comes)."""

from __future__ import annotations

import asyncio
import itertools
import time
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy.orm import Session, sessionmaker
from temporalio.api.enums.v1 import EventType
from temporalio.testing import WorkflowEnvironment

from billing.delivery import DispatcherInput, dispatcher_workflow_id
from billing.testing.mail_sink import RecordingHandler, smtp_server
from billing.worker import wake_dispatcher_on_commit
from db.engine import make_engine, make_session_factory, unit_of_work
from tests.delivery.support import (
    delivery_activities,
    delivery_stack,
    enqueue,
    make_book,
    notice_payloads,
    wait_until,
)

INTERVAL_S = 0.5


async def wake_signal_instants(env: WorkflowEnvironment, task_queue: str) -> list[float]:
    """When each ``wake`` signal reached the dispatcher (Unix seconds), from its history."""
    handle = env.client.get_workflow_handle(dispatcher_workflow_id(task_queue))
    instants = []
    async for event in handle.fetch_history_events():
        signaled = event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
        if signaled and event.workflow_execution_signaled_event_attributes.signal_name == "wake":
            instants.append(event.event_time.ToDatetime().timestamp())
    return instants


async def test_a_stream_of_commits_wakes_the_dispatcher_once_per_interval_and_after_the_last(
    temporal_env: WorkflowEnvironment, database_url: str
) -> None:
    session_factory: sessionmaker[Session] = make_session_factory(make_engine(database_url))
    handler = RecordingHandler()
    with unit_of_work(session_factory) as session:
        book = make_book(session)
    with smtp_server(handler) as port:
        activities = delivery_activities(session_factory, port)
        async with delivery_stack(temporal_env.client, activities, interval_s=3600) as queue:
            await asyncio.sleep(1.0)  # the dispatcher's first look found nothing: it sleeps
            waker = wake_dispatcher_on_commit(
                session_factory,
                temporal_env.client,
                dispatcher=DispatcherInput(task_queue=queue, interval_s=3600),
                min_interval_s=INTERVAL_S,
            )
            try:
                # A lone commit after a quiet spell: woken at once.
                started = time.monotonic()
                with unit_of_work(session_factory) as session:
                    payload, _ = notice_payloads(book)["receipt"]
                    enqueue(session, book, "receipt", payload, with_invoice=True)
                await wait_until(lambda: len(handler.received) == 1, timeout_s=10, what="mail")
                lone_latency = time.monotonic() - started

                # Then 20 threads commit a receipt each, 60 in all over about 1.5 s.
                def write(n: int) -> None:
                    time.sleep(n * 0.025)
                    with unit_of_work(session_factory) as session:
                        payload, _ = notice_payloads(book)["receipt"]
                        enqueue(session, book, "receipt", payload, with_invoice=True)

                stream_started = time.time()
                with ThreadPoolExecutor(max_workers=20) as pool:
                    await asyncio.to_thread(lambda: list(pool.map(write, range(60))))
                last_commit = time.time()
                await wait_until(lambda: len(handler.received) == 61, timeout_s=15, what="61")
                await asyncio.sleep(INTERVAL_S * 2)  # any late wake-up would show
            finally:
                waker.detach()
            signals = await wake_signal_instants(temporal_env, queue)
    assert lone_latency < 5, lone_latency
    in_stream = [t for t in signals if t >= stream_started - 0.05]
    stream_s = last_commit - stream_started
    # One at most per interval (and the one the stream's first commit may send at once),
    # where a wake-up per commit (or per signal round trip) would have been dozens.
    assert 1 <= len(in_stream) <= stream_s / INTERVAL_S + 2, (len(in_stream), stream_s)
    gaps = [b - a for a, b in itertools.pairwise(signals)]
    assert all(gap >= INTERVAL_S - 0.05 for gap in gaps), gaps
    # The last commit is followed by a wake-up sent after it (the mails all left above,
    # with the poll an hour away).
    assert signals[-1] >= last_commit - 0.05, (signals[-1], last_commit)
    assert waker.sent == len(signals), (waker.sent, signals)
