"""Delivery rate: customer mails and events per second through the real delivery workflows.

A fresh SQLite (or --database-url) database gets N notices and N events (over N/10
subscriptions, one endpoint); the delivery worker and its dispatcher run on the time-skipping
Temporal server against a local aiosmtpd server and a local HTTP receiver. Prints how long
each took to be fully delivered and the rate.

    .venv/bin/python scripts/delivery_rate.py --mails 200 --events 200

Timings are noisy on a shared machine: compare runs made at the same time.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from billing.ids import new_id
from billing.records import EventEndpointRecord
from billing.testing.database import temporary_database
from billing.testing.event_receiver import event_receiver
from billing.testing.harness import start_time_skipping_environment
from billing.testing.mail_sink import RecordingHandler, smtp_server
from db.engine import make_engine, make_session_factory, unit_of_work
from db.repositories import events as events_repo
from tests.delivery.support import (
    T0,
    delivery_activities,
    delivery_stack,
    enqueue,
    make_book,
    notice_payloads,
)


async def run(mails: int, events: int, database_url: str | None) -> None:
    with temporary_database("sqlite") as temp_url:
        url = database_url or temp_url
        session_factory = make_session_factory(make_engine(url))
        handler = RecordingHandler()
        with smtp_server(handler) as port, event_receiver() as receiver:
            with unit_of_work(session_factory) as session:
                events_repo.insert_endpoint(
                    session,
                    EventEndpointRecord(
                        id=new_id("we"),
                        url=receiver.url,
                        url_digest=hashlib.sha256(receiver.url.encode()).hexdigest(),
                        event_types=["*"],
                        secret="bwhsec_bench",
                        created_at=T0,
                        updated_at=T0,
                    ),
                )
                books = [make_book(session) for _ in range(max(1, max(mails, events) // 10))]
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
                        dedupe_key=f"bench:{n}",
                        created_at=T0,
                    )
            env = await start_time_skipping_environment()
            try:
                activities = delivery_activities(session_factory, port)
                started = time.perf_counter()
                mail_done = event_done = None
                async with delivery_stack(env.client, activities, interval_s=0.5):
                    while mail_done is None or event_done is None:
                        now = time.perf_counter() - started
                        if mail_done is None and len(handler.received) >= mails:
                            mail_done = now
                        if event_done is None and len(receiver.accepted()) >= events:
                            event_done = now
                        if now > 600:
                            raise SystemExit("not delivered within 10 minutes")
                        await asyncio.sleep(0.05)
            finally:
                await env.shutdown()
        print(f"mails:  {mails} in {mail_done:.2f} s = {mails / mail_done:.1f} mails/s")
        print(
            f"events: {events} in {event_done:.2f} s = {events / event_done:.1f} events/s "
            f"({len(books)} subscriptions, 1 endpoint; in order per subscription)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mails", type=int, default=200)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    asyncio.run(run(args.mails, args.events, args.database_url))


if __name__ == "__main__":
    main()
