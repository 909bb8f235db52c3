"""Delivery figures: customer mails and events per second through the real delivery
workflows, and the first-delivery latency (from the commit that writes a notice and an event
to the mail server's acceptance and the endpoint's 200), with the dispatcher only polling
(every 5 s, the default) and then also woken by each commit, back to back in one run.

A fresh SQLite (or --database-url) database, one endpoint, N/10 subscriptions; the delivery
worker and its dispatcher run on the time-skipping Temporal server (its clock is not skipped
here: the poll's timer runs in real time) against a local aiosmtpd server and a local HTTP
receiver.

    PYTHONPATH=$PWD .venv/bin/python scripts/delivery_rate.py --mails 200 --events 200

Timings are noisy on a shared machine: compare runs made at the same time.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy.orm import Session, sessionmaker

from billing.ids import new_id
from billing.records import EventEndpointRecord
from billing.testing.database import temporary_database
from billing.testing.event_receiver import EventReceiver, event_receiver
from billing.testing.harness import start_time_skipping_environment
from billing.testing.mail_sink import RecordingHandler, smtp_server
from db.engine import make_engine, make_session_factory, unit_of_work
from db.repositories import events as events_repo
from tests.delivery.support import (
    T0,
    Book,
    delivery_activities,
    delivery_stack,
    enqueue,
    make_book,
    notice_payloads,
)

POLL_S = 5.0


def write(
    session_factory: sessionmaker[Session], books: list[Book], mails: int, events: int
) -> None:
    """``mails`` notices and ``events`` events, in one commit."""
    with unit_of_work(session_factory) as session:
        for n in range(mails):
            book = books[n % len(books)]
            payload, about_invoice = notice_payloads(book)["payment_failed"]
            enqueue(session, book, "payment_failed", payload, with_invoice=about_invoice)
        for n in range(events):
            book = books[n % len(books)]
            events_repo.record_event(
                session,
                type="subscription.updated",
                subscription_id=book.subscription.id,
                object_id=book.subscription.id,
                object={"n": n},
                dedupe_key=f"bench:{new_id('k')}",
                created_at=T0,
            )


async def until(check: object, what: str, limit_s: float = 600) -> float:
    started = time.perf_counter()
    while not check():  # type: ignore[operator]
        if time.perf_counter() - started > limit_s:
            raise SystemExit(f"{what}: not delivered within {limit_s:.0f} s")
        await asyncio.sleep(0.01)
    return time.perf_counter() - started


async def measure(
    mode: str,
    wake: bool,
    session_factory: sessionmaker[Session],
    books: list[Book],
    mails: int,
    events: int,
    samples: int,
    env_client: object,
    port: int,
    handler: RecordingHandler,
    receiver: EventReceiver,
) -> None:
    # An endpoint of its own per run: a stream workflow (events-<endpoint>-<subscription>)
    # of the previous run may still be open on that run's task queue, whose worker is gone.
    url = f"{receiver.url}?run={new_id('r')}"
    with unit_of_work(session_factory) as session:
        endpoint, _ = events_repo.insert_endpoint(
            session,
            EventEndpointRecord(
                id=new_id("we"),
                url=url,
                url_digest=hashlib.sha256(url.encode()).hexdigest(),
                event_types=["*"],
                secret="bwhsec_bench",
                created_at=T0,
                updated_at=T0,
            ),
        )
    activities = delivery_activities(session_factory, port)
    async with delivery_stack(
        env_client,  # type: ignore[arg-type]
        activities,
        interval_s=POLL_S,
        wake_on_commit=wake,
    ):
        await asyncio.sleep(1.0)  # the first look (nothing to do) is over
        latencies = []
        rng = random.Random(14)
        for _ in range(samples):
            await asyncio.sleep(rng.uniform(0, POLL_S))  # any phase of the poll
            seen = (len(handler.received), len(receiver.accepted()))
            started = time.perf_counter()
            await asyncio.to_thread(write, session_factory, books, 1, 1)
            await until(lambda seen=seen: len(handler.received) > seen[0], "a mail")
            await until(lambda seen=seen: len(receiver.accepted()) > seen[1], "an event")
            latencies.append(time.perf_counter() - started)
        mails_before, events_before = len(handler.received), len(receiver.accepted())
        started = time.perf_counter()
        await asyncio.to_thread(write, session_factory, books, mails, events)
        mail_s = event_s = None
        while mail_s is None or event_s is None:
            now = time.perf_counter() - started
            if mail_s is None and len(handler.received) >= mails_before + mails:
                mail_s = now
            if event_s is None and len(receiver.accepted()) >= events_before + events:
                event_s = now
            if now > 600:
                raise SystemExit("not delivered within 10 minutes")
            await asyncio.sleep(0.02)
    with unit_of_work(session_factory) as session:
        events_repo.update_endpoint(session, endpoint.id, now=T0, enabled=False)
    print(f"{mode}:")
    print(
        f"  first delivery (mail and event both there), {samples} samples: median "
        f"{statistics.median(latencies):.2f} s, max {max(latencies):.2f} s"
    )
    print(f"  mails:  {mails} in {mail_s:.2f} s = {mails / mail_s:.1f} mails/s")
    print(
        f"  events: {events} in {event_s:.2f} s = {events / event_s:.1f} events/s "
        f"({len(books)} subscriptions, 1 endpoint; in order per subscription)"
    )


async def run(mails: int, events: int, samples: int, database_url: str | None) -> None:
    with temporary_database("sqlite") as temp_url:
        url = database_url or temp_url
        session_factory = make_session_factory(make_engine(url))
        handler = RecordingHandler()
        with smtp_server(handler) as port, event_receiver() as receiver:
            with unit_of_work(session_factory) as session:
                books = [make_book(session) for _ in range(max(1, max(mails, events) // 10))]
            env = await start_time_skipping_environment()
            try:
                for mode, wake in (
                    (f"before: poll every {POLL_S:g} s only", False),
                    (f"after: woken by each commit (poll every {POLL_S:g} s kept)", True),
                ):
                    await measure(
                        mode,
                        wake,
                        session_factory,
                        books,
                        mails,
                        events,
                        samples,
                        env.client,
                        port,
                        handler,
                        receiver,
                    )
            finally:
                await env.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mails", type=int, default=200)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--samples", type=int, default=8, help="first-delivery latency samples")
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    asyncio.run(run(args.mails, args.events, args.samples, args.database_url))


if __name__ == "__main__":
    main()
