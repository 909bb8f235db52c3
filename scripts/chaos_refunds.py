"""Refunds in the chaos run (``scripts/chaos.py``): credit notes issued through the API while
the faults are injected, and the audit of our refunds against localstripe's own.

Once a paying customer's first invoice is paid, finance issues credit notes on it, each in one
of these ways (picked at random):

* ``one``: one credit note refunding a third of the invoice;
* ``twice_same_key``: the same request sent twice at once under one Idempotency-Key (one
  credit note, one refund);
* ``two_notes``: two credit notes a moment apart, each refunding a third;
* ``over_cap``: one refunding one cent more than the invoice (refused 422, nothing written).

A request the API answers 5xx, or whose answer is lost, is sent again with the same key. The
refunds themselves run in their workflows on the worker, whose Stripe calls go through the fault
proxy, and which SIGKILLs itself after Stripe made a picked share of them
(``--crash-after-charge-percent`` covers refunds too).

The audit (faults off, straight against localstripe): ``refunds`` (our credit notes' refunds
that succeeded), ``double_refunds`` (a key that made more than one refund at Stripe, or a
charge refunded at Stripe beyond what our credit notes refund) and ``lost_refunds`` (a refund
of ours still unfinished, or succeeded here without its refund at Stripe, or the other way
round). The last two must be 0.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
from sqlalchemy import Engine, select

from db.models import CreditNoteRow, InvoiceRow, PaymentRow, RefundRow

#: Customer kinds whose first invoice is simply paid: the ones finance refunds.
REFUNDABLE_KINDS = ("pays", "multi_pays")
WAYS = ("one", "twice_same_key", "two_notes", "over_cap")
FINAL = ("succeeded", "failed", "canceled")


@dataclass
class Planned:
    subscription_id: str
    way: str
    issued: bool = False
    acting: bool = False
    answers: list[int] = field(default_factory=list)


class ChaosRefunds:
    def __init__(
        self, customers: list[Any], rng: Any, base_url: str, admin_key: str, share: float
    ) -> None:
        self.base_url = base_url
        self.admin_key = admin_key
        self.planned = {
            c.subscription_id: Planned(c.subscription_id, rng.choice(WAYS))
            for c in customers
            if c.kind in REFUNDABLE_KINDS and rng.random() < share
        }
        self.pool = ThreadPoolExecutor(max_workers=4)
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.notes: list[str] = []

    # -- acting --------------------------------------------------------------------------------

    def act(self, engine: Engine) -> None:
        """Issue the credit notes of every planned customer whose first invoice is now paid."""
        waiting = [p for p in self.planned.values() if not p.acting]
        if not waiting:
            return
        with engine.connect() as connection:
            paid = {
                row.subscription_id: (row.id, row.amount_due_minor)
                for row in connection.execute(
                    select(InvoiceRow.id, InvoiceRow.subscription_id, InvoiceRow.amount_due_minor)
                    .join(PaymentRow, PaymentRow.invoice_id == InvoiceRow.id)
                    .where(
                        InvoiceRow.subscription_id.in_([p.subscription_id for p in waiting]),
                        InvoiceRow.period_index == 0,
                        InvoiceRow.status == "paid",
                    )
                )
            }
        for plan in waiting:
            if plan.subscription_id in paid:
                plan.acting = True
                invoice_id, amount = paid[plan.subscription_id]
                self.pool.submit(self._issue, plan, invoice_id, amount)

    def _issue(self, plan: Planned, invoice_id: str, amount: int) -> None:
        try:
            third = max(amount // 3, 1)
            if plan.way == "one":
                self._send(plan, invoice_id, {"refund_amount_minor": third}, uuid.uuid4().hex)
            elif plan.way == "twice_same_key":
                key = uuid.uuid4().hex
                body = {"refund_amount_minor": third, "reason": "duplicate"}
                threads = [
                    threading.Thread(target=self._send, args=(plan, invoice_id, body, key))
                    for _ in range(2)
                ]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
            elif plan.way == "two_notes":
                self._send(plan, invoice_id, {"refund_amount_minor": third}, uuid.uuid4().hex)
                time.sleep(0.3)
                self._send(
                    plan,
                    invoice_id,
                    {"refund_amount_minor": third, "reason": "order_change"},
                    uuid.uuid4().hex,
                )
            else:  # over_cap
                self._send(plan, invoice_id, {"refund_amount_minor": amount + 1}, uuid.uuid4().hex)
            plan.issued = True
        except Exception as error:
            with self.lock:
                self.notes.append(f"credit note on {invoice_id} ({plan.way}) failed: {error}")

    def _send(self, plan: Planned, invoice_id: str, body: dict[str, Any], key: str) -> None:
        deadline = time.monotonic() + 180
        while True:
            try:
                with httpx.Client(base_url=self.base_url, timeout=60) as http:
                    answer = http.post(
                        f"/v1/invoices/{invoice_id}/credit-notes",
                        json=body,
                        headers={
                            "Authorization": f"Bearer {self.admin_key}",
                            "Idempotency-Key": key,
                        },
                    )
            except (httpx.HTTPError, OSError):
                status = 0
            else:
                status = answer.status_code
            if status and status < 500:
                with self.lock:
                    plan.answers.append(status)
                    self.counts[f"credit_note_{status}"] += 1
                expected = (422,) if plan.way == "over_cap" else (200, 201)
                if status not in expected:
                    with self.lock:
                        self.notes.append(
                            f"credit note on {invoice_id} ({plan.way}) answered {status}: "
                            f"{answer.text[:200]}"
                        )
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the API kept failing ({status})")
            time.sleep(2)

    def outstanding(self, engine: Engine) -> int:
        """Planned credit notes not issued yet, plus refunds not at a final status."""
        unissued = sum(1 for p in self.planned.values() if not p.issued)
        with engine.connect() as connection:
            unfinished = len(
                connection.execute(select(RefundRow.id).where(RefundRow.status.not_in(FINAL))).all()
            )
        return unissued + unfinished

    def unfinished(self, engine: Engine) -> list[str]:
        """What `outstanding` counts, one line each, for the run's notes when time runs out."""
        items = [
            f"credit note planned for {subscription_id} ({plan.way}) not issued "
            f"(answers {plan.answers})"
            for subscription_id, plan in self.planned.items()
            if not plan.issued
        ]
        with engine.connect() as connection:
            rows = connection.execute(
                select(RefundRow.id, RefundRow.status, RefundRow.stripe_refund_id).where(
                    RefundRow.status.not_in(FINAL)
                )
            ).all()
        items += [f"refund {r.id} {r.status} (Stripe {r.stripe_refund_id})" for r in rows]
        return items

    def stop(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


# -- the audit ---------------------------------------------------------------------------------


def audit_refunds(refunds: ChaosRefunds, engine: Engine, stripe_direct: Any) -> dict[str, Any]:
    """Our credit notes' refunds against localstripe's refunds (see the module docstring)."""
    with engine.connect() as connection:
        ours = connection.execute(
            select(
                RefundRow.id,
                RefundRow.idempotency_key,
                RefundRow.status,
                RefundRow.stripe_refund_id,
                RefundRow.stripe_charge_id,
                RefundRow.amount_minor,
                RefundRow.source,
            )
        ).all()
        notes = connection.execute(
            select(CreditNoteRow.invoice_id, CreditNoteRow.refund_amount_minor)
        ).all()
        charge_of_invoice = dict(
            connection.execute(select(PaymentRow.invoice_id, PaymentRow.stripe_charge_id)).all()
        )
    provider: list[Any] = []
    params: dict[str, Any] = {"limit": 100}
    while True:
        page = stripe_direct.v1.refunds.list(params=params)
        provider.extend(page.data)
        if not page.has_more or not page.data:
            break
        params["starting_after"] = page.data[-1].id

    def key_of(refund: Any) -> str | None:
        metadata = refund.metadata.to_dict() if refund.metadata else {}
        key = metadata.get("idempotency_key")
        return key if isinstance(key, str) else None

    problems: list[str] = []
    by_key: dict[str, list[Any]] = defaultdict(list)
    for refund in provider:
        key = key_of(refund)
        if key is not None:
            by_key[key].append(refund)
    double = 0
    for key, made in by_key.items():
        if len(made) > 1:
            double += len(made) - 1
            problems.append(f"key {key} made {len(made)} refunds at Stripe")
    # Per charge: Stripe refunded no more than our credit notes asked.
    asked: Counter[str] = Counter()
    for invoice_id, amount in notes:
        charge = charge_of_invoice.get(invoice_id)
        if charge:
            asked[charge] += amount
    refunded_at_stripe: Counter[str] = Counter()
    for refund in provider:
        if refund.status == "succeeded":
            charge = refund.charge if isinstance(refund.charge, str) else refund.charge.id
            refunded_at_stripe[charge] += refund.amount
    for charge, amount in refunded_at_stripe.items():
        if amount > asked.get(charge, 0):
            double += 1
            problems.append(f"charge {charge}: {amount} refunded at Stripe, {asked[charge]} asked")
    lost = 0
    provider_by_id = {refund.id: refund for refund in provider}
    for row in ours:
        if row.source != "credit_note":
            continue
        made = by_key.get(row.idempotency_key or "", [])
        if row.status not in FINAL:
            lost += 1
            problems.append(f"refund {row.id} still {row.status}")
        elif row.status == "succeeded":
            there = provider_by_id.get(row.stripe_refund_id or "")
            if (
                there is None
                or there.amount != row.amount_minor
                or key_of(there) != row.idempotency_key
            ):
                lost += 1
                problems.append(f"refund {row.id} succeeded here, not at Stripe")
        elif any(r.status == "succeeded" for r in made):
            lost += 1
            problems.append(f"refund {row.id} is {row.status} here but Stripe refunded it")
    recorded_ids = {row.stripe_refund_id for row in ours}
    for key, made in by_key.items():
        for refund in made:
            if refund.id not in recorded_ids:
                lost += 1
                problems.append(f"Stripe refund {refund.id} ({key}) is not recorded")
    statuses = Counter(row.status for row in ours if row.source == "credit_note")
    return {
        "refunds": statuses.get("succeeded", 0),
        "double_refunds": double,
        "lost_refunds": lost,
        "refunds_by_status": dict(statuses),
        "credit_notes_by_way": dict(Counter(p.way for p in refunds.planned.values())),
        "credit_note_answers": dict(refunds.counts),
        "refund_problems": problems[:50],
        "refund_notes": refunds.notes[:50],
    }
