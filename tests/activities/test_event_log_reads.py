"""An issued invoice's events (created, finalized) carry the same invoice, read and shown once:
the issue writes them in one transaction, so a second read could only repeat the first."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event, select

from db.engine import unit_of_work
from db.repositories.events import EVENTS
from tests.activities.test_billing_activities import (  # noqa: F401  (fixtures)
    Stack,
    invoice_input,
    seed_subscription,
    stack,
)


def test_issuing_an_invoice_reads_its_lines_once_for_both_events(stack: Stack) -> None:  # noqa: F811
    seeded = seed_subscription(stack, stripe_customer=False)
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    event.listen(stack.engine, "before_cursor_execute", seen)
    try:
        created = stack.activities.create_invoice(invoice_input(seeded))
    finally:
        event.remove(stack.engine, "before_cursor_execute", seen)

    line_reads = [
        s for s in statements if s.lstrip().startswith("SELECT") and "FROM invoice_lines" in s
    ]
    assert len(line_reads) == 1, line_reads
    with unit_of_work(stack.session_factory) as session:
        rows = session.execute(
            select(EVENTS.c.type, EVENTS.c.object)
            .where(EVENTS.c.object_id == created.invoice_id)
            .order_by(EVENTS.c.sequence)
        ).all()
    assert [r.type for r in rows] == ["invoice.created", "invoice.finalized"]
    assert rows[0].object == rows[1].object
    assert rows[0].object["id"] == created.invoice_id
    assert len(rows[0].object["lines"]) == 1
