"""Credit notes and refunds (Stripe's model), as pure rules: no database, no provider.

A credit note lowers what an invoice bills, by an amount or by line, with one of Stripe's
reasons. On a paid invoice its total is split, as Stripe's is, into

* ``refund_amount_minor``: money sent back to the card through the provider's Refunds API;
* ``credit_amount_minor``: credit to the customer's balance (``billing.balance``), used by
  their next invoices;
* ``out_of_band_amount_minor``: settled outside (a bank transfer, cash): recorded only.

Caps, decided here from the facts a repository reads under the customer's lock:

* every credit note of an invoice together credits at most the invoice's total (the sum of its
  lines; Stripe's ``total``), and each line at most its own amount;
* refunds of a payment never exceed what was captured minus what was already refunded (ours,
  and refunds made elsewhere, pending ones included) minus what is disputed.

Amounts are integer minor units; no rounding happens here (every amount is given, or is the
remainder of another).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from billing.errors import ChangeRefused, InvalidInput
from billing.invoices import InvoiceStatus

#: Longest memo on a credit note (its column).
MEMO_MAX_LENGTH = 500

#: Lines of one credit note, at most (a request is bounded; invoices have a few lines).
MAX_CREDIT_NOTE_LINES = 100


class CreditNoteReason(StrEnum):
    """Stripe's credit note reasons (https://docs.stripe.com/api/credit_notes/create)."""

    DUPLICATE = "duplicate"
    FRAUDULENT = "fraudulent"
    ORDER_CHANGE = "order_change"
    PRODUCT_UNSATISFACTORY = "product_unsatisfactory"


class RefundReason(StrEnum):
    """Stripe's refund reasons (https://docs.stripe.com/api/refunds/create)."""

    DUPLICATE = "duplicate"
    FRAUDULENT = "fraudulent"
    REQUESTED_BY_CUSTOMER = "requested_by_customer"


def refund_reason_for(reason: CreditNoteReason | None) -> RefundReason:
    """The refund reason Stripe takes for a credit note's reason (Stripe's refunds know three;
    a changed order or an unsatisfactory product is the customer's request)."""
    if reason == CreditNoteReason.DUPLICATE:
        return RefundReason.DUPLICATE
    if reason == CreditNoteReason.FRAUDULENT:
        return RefundReason.FRAUDULENT
    return RefundReason.REQUESTED_BY_CUSTOMER


class RefundStatus(StrEnum):
    """Stripe's refund statuses, plus ``pending`` before the provider answered at all.

    ``pending`` means either "recorded, not yet answered" (no provider id) or Stripe's own
    pending (an asynchronous refund); both are followed to their end."""

    PENDING = "pending"
    REQUIRES_ACTION = "requires_action"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def final(self) -> bool:
        return self in (RefundStatus.SUCCEEDED, RefundStatus.FAILED, RefundStatus.CANCELED)

    @property
    def holds_money(self) -> bool:
        """Whether the refund counts against the payment's refundable amount: everything but
        a refund that failed or was canceled (its money stays with us)."""
        return self not in (RefundStatus.FAILED, RefundStatus.CANCELED)


class RefundSource(StrEnum):
    #: Issued by a credit note of ours.
    CREDIT_NOTE = "credit_note"
    #: Made elsewhere (Stripe's dashboard, another integration) and learnt from the provider.
    PROVIDER = "provider"


def refund_idempotency_key(credit_note_id: str, refund_number: int) -> str:
    """The provider idempotency key of a credit note's refund: (credit note, refund number).
    Every retry of the same refund sends the same key, so Stripe answers with the first
    result instead of refunding twice."""
    if refund_number < 1:
        raise ValueError(f"refund numbers start at 1; got {refund_number}")
    return f"{credit_note_id}-refund-{refund_number}"


def refund_workflow_id_for(refund_id: str) -> str:
    """One workflow per refund; a second start joins the first."""
    return f"refund-{refund_id}"


def format_credit_note_number(invoice_prefix: str, sequence: int) -> str:
    """``ABCD2345-CN-0003``: the customer's invoice prefix and their credit note sequence
    (1-based, gap-free per customer)."""
    if sequence < 1:
        raise ValueError(f"credit note sequence starts at 1; got {sequence}")
    return f"{invoice_prefix}-CN-{sequence:04d}"


def refundable_minor(captured_minor: int, refunded_minor: int, disputed_minor: int) -> int:
    """What may still be refunded of a payment: captured - refunded - disputed, never less
    than 0 (minor units)."""
    return max(captured_minor - refunded_minor - disputed_minor, 0)


@dataclass(frozen=True, slots=True)
class InvoiceLineFacts:
    """One line of the invoice and how much of it credit notes already credited."""

    line_id: str
    position: int
    description: str
    amount_minor: int
    credited_minor: int = 0

    @property
    def creditable_minor(self) -> int:
        return max(self.amount_minor, 0) - self.credited_minor


@dataclass(frozen=True, slots=True)
class InvoiceFacts:
    """What the caps depend on, read in one transaction under the customer's lock."""

    invoice_id: str
    number: str
    status: InvoiceStatus
    currency: str
    #: The invoice's total: the sum of its lines (Stripe's ``total``).
    total_minor: int
    #: Already credited by earlier credit notes of this invoice.
    credited_minor: int
    lines: tuple[InvoiceLineFacts, ...]
    #: The settled payment: captured, refunded (any refund still holding money), disputed.
    captured_minor: int = 0
    refunded_minor: int = 0
    disputed_minor: int = 0
    #: Whether the invoice has a settled card payment (a refund needs one).
    has_payment: bool = False

    @property
    def creditable_minor(self) -> int:
        return max(self.total_minor, 0) - self.credited_minor

    @property
    def refundable_minor(self) -> int:
        if not self.has_payment:
            return 0
        return refundable_minor(self.captured_minor, self.refunded_minor, self.disputed_minor)


@dataclass(frozen=True, slots=True)
class LineRequest:
    invoice_line_id: str
    #: None: all that is left to credit on the line.
    amount_minor: int | None = None


@dataclass(frozen=True, slots=True)
class CreditNoteRequest:
    """What the caller asks for. ``amount_minor`` (the invoice as a whole) or ``lines``; with
    neither, the parts given (refund, credit, out of band) add up to the credit note, and with
    no part either, it is the whole rest of the invoice. No part given: everything goes to the
    customer's balance (Stripe's default for a paid invoice); otherwise the parts given must
    add up to the total."""

    reason: CreditNoteReason | None = None
    amount_minor: int | None = None
    lines: tuple[LineRequest, ...] = ()
    refund_amount_minor: int | None = None
    credit_amount_minor: int | None = None
    out_of_band_amount_minor: int | None = None
    memo: str | None = None


@dataclass(frozen=True, slots=True)
class PlannedLine:
    invoice_line_id: str | None
    description: str
    amount_minor: int


@dataclass(frozen=True, slots=True)
class CreditNotePlan:
    """The credit note to write: its total, its lines and its split (minor units)."""

    amount_minor: int
    lines: tuple[PlannedLine, ...]
    refund_amount_minor: int
    credit_amount_minor: int
    out_of_band_amount_minor: int
    #: Open invoice: how much the amount due goes down (the whole total).
    amount_due_reduction_minor: int = 0


def _whole_minor(value: object, field: str, *, allow_zero: bool) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{field} must be a whole number of minor units", field=field)
    if value < 0 or (value == 0 and not allow_zero):
        bound = "0 or more" if allow_zero else "more than 0"
        raise InvalidInput(f"{field} must be {bound} minor units; got {value}", field=field)
    return value


def plan_credit_note(facts: InvoiceFacts, request: CreditNoteRequest) -> CreditNotePlan:
    """The credit note ``request`` makes on the invoice ``facts`` describe, or InvalidInput
    (a value is wrong or over a cap; the field is named) / ChangeRefused (the invoice's
    status allows none). Nothing is written here."""
    if facts.status not in (InvoiceStatus.PAID, InvoiceStatus.OPEN):
        raise ChangeRefused(
            f"invoice {facts.number} is {facts.status.value}; credit notes are issued on "
            "paid or open invoices only"
        )
    if request.amount_minor is not None and request.lines:
        raise InvalidInput(
            "give either amount_minor (the invoice as a whole) or lines, not both",
            field="lines",
        )
    if len(request.lines) > MAX_CREDIT_NOTE_LINES:
        raise InvalidInput(
            f"a credit note has at most {MAX_CREDIT_NOTE_LINES} lines; got {len(request.lines)}",
            field="lines",
        )
    if facts.creditable_minor <= 0:
        raise ChangeRefused(
            f"invoice {facts.number} is fully credited already ({facts.credited_minor} of "
            f"{facts.total_minor} {facts.currency} minor units)"
        )
    lines = _planned_lines(facts, request)
    amount = sum(line.amount_minor for line in lines)
    if amount > facts.creditable_minor:
        raise InvalidInput(
            f"invoice {facts.number} can be credited {facts.creditable_minor} more "
            f"{facts.currency} minor units (total {facts.total_minor}, credited "
            f"{facts.credited_minor}); {amount} is too much",
            field=_amount_field(request),
        )
    parts = (
        request.refund_amount_minor,
        request.credit_amount_minor,
        request.out_of_band_amount_minor,
    )
    if facts.status == InvoiceStatus.OPEN:
        if any(part is not None for part in parts):
            raise InvalidInput(
                f"invoice {facts.number} is open: a credit note lowers its amount due, and "
                "refund_amount_minor, credit_amount_minor and out_of_band_amount_minor apply "
                "to paid invoices only",
                field=next(
                    name
                    for name, part in zip(
                        ("refund_amount_minor", "credit_amount_minor", "out_of_band_amount_minor"),
                        parts,
                        strict=True,
                    )
                    if part is not None
                ),
            )
        return CreditNotePlan(
            amount_minor=amount,
            lines=lines,
            refund_amount_minor=0,
            credit_amount_minor=0,
            out_of_band_amount_minor=0,
            amount_due_reduction_minor=amount,
        )
    refund, credit, out_of_band = _split(amount, request)
    if refund > facts.refundable_minor:
        captured = facts.captured_minor if facts.has_payment else 0
        raise InvalidInput(
            f"at most {facts.refundable_minor} {facts.currency} minor units of invoice "
            f"{facts.number} can be refunded (captured {captured}, "
            f"refunded {facts.refunded_minor}, disputed {facts.disputed_minor}); "
            f"{refund} is too much: credit the rest to the balance or settle it outside",
            field="refund_amount_minor",
        )
    return CreditNotePlan(
        amount_minor=amount,
        lines=lines,
        refund_amount_minor=refund,
        credit_amount_minor=credit,
        out_of_band_amount_minor=out_of_band,
    )


def _amount_field(request: CreditNoteRequest) -> str:
    """The request field the credit note's total came from."""
    if request.lines:
        return "lines"
    if request.amount_minor is None:
        for name in ("refund_amount_minor", "credit_amount_minor", "out_of_band_amount_minor"):
            if getattr(request, name) is not None:
                return name
    return "amount_minor"


def _planned_lines(facts: InvoiceFacts, request: CreditNoteRequest) -> tuple[PlannedLine, ...]:
    if request.lines:
        by_id = {line.line_id: line for line in facts.lines}
        seen: set[str] = set()
        planned = []
        for index, wanted in enumerate(request.lines):
            field = f"lines[{index}]"
            line = by_id.get(wanted.invoice_line_id)
            if line is None:
                known = ", ".join(sorted(by_id)) or "none"
                raise InvalidInput(
                    f"{field}: invoice {facts.number} has no line {wanted.invoice_line_id!r}; "
                    f"its lines: {known}",
                    field=f"{field}.invoice_line_id",
                )
            if line.line_id in seen:
                raise InvalidInput(
                    f"{field}: line {line.line_id} is named twice", field=f"{field}.invoice_line_id"
                )
            seen.add(line.line_id)
            if line.creditable_minor <= 0:
                raise InvalidInput(
                    f"{field}: line {line.line_id} ({line.amount_minor} minor units) has nothing "
                    f"left to credit (credited {line.credited_minor})",
                    field=f"{field}.invoice_line_id",
                )
            amount = (
                line.creditable_minor
                if wanted.amount_minor is None
                else _whole_minor(wanted.amount_minor, f"{field}.amount_minor", allow_zero=False)
            )
            if amount > line.creditable_minor:
                raise InvalidInput(
                    f"{field}: line {line.line_id} can be credited {line.creditable_minor} more "
                    f"minor units (amount {line.amount_minor}, credited {line.credited_minor}); "
                    f"{amount} is too much",
                    field=f"{field}.amount_minor",
                )
            planned.append(PlannedLine(line.line_id, line.description, amount))
        return tuple(planned)
    parts = [
        part
        for part in (
            request.refund_amount_minor,
            request.credit_amount_minor,
            request.out_of_band_amount_minor,
        )
        if part is not None
    ]
    if request.amount_minor is None and parts and facts.status == InvoiceStatus.PAID:
        # Only the split is given: the credit note is what it adds up to.
        names = ("refund_amount_minor", "credit_amount_minor", "out_of_band_amount_minor")
        amount = sum(
            _whole_minor(part, name, allow_zero=True)
            for part, name in zip(
                (
                    request.refund_amount_minor,
                    request.credit_amount_minor,
                    request.out_of_band_amount_minor,
                ),
                names,
                strict=True,
            )
            if part is not None
        )
        if amount == 0:
            raise InvalidInput(
                "the credit note adds up to 0; give a refund, credit or out-of-band amount of "
                "more than 0",
                field="refund_amount_minor",
            )
    elif request.amount_minor is None:
        amount = facts.creditable_minor
    else:
        amount = _whole_minor(request.amount_minor, "amount_minor", allow_zero=False)
    return (PlannedLine(None, f"credit on invoice {facts.number}", amount),)


def _split(amount: int, request: CreditNoteRequest) -> tuple[int, int, int]:
    names = ("refund_amount_minor", "credit_amount_minor", "out_of_band_amount_minor")
    given = (
        request.refund_amount_minor,
        request.credit_amount_minor,
        request.out_of_band_amount_minor,
    )
    if all(part is None for part in given):
        return 0, amount, 0
    refund, credit, out_of_band = (
        0 if part is None else _whole_minor(part, name, allow_zero=True)
        for part, name in zip(given, names, strict=True)
    )
    if refund + credit + out_of_band != amount:
        raise InvalidInput(
            f"refund_amount_minor ({refund}) + credit_amount_minor ({credit}) + "
            f"out_of_band_amount_minor ({out_of_band}) must add up to the credit note's total, "
            f"{amount}",
            field=next(name for name, part in zip(names, given, strict=True) if part is not None),
        )
    return refund, credit, out_of_band


def refund_status_after(current: RefundStatus, reported: RefundStatus) -> RefundStatus:
    """The status to record when the provider reports ``reported`` for a refund we hold as
    ``current``. The provider's word is read fresh (never an event's snapshot), but reads and
    deliveries race: a final status is never taken back to pending. A succeeded refund may
    still fail later (Stripe documents it: the card was closed), so failed wins over it."""
    if current.final and not reported.final:
        return current
    if (
        current in (RefundStatus.FAILED, RefundStatus.CANCELED)
        and reported == RefundStatus.SUCCEEDED
    ):
        # Stripe never revives a failed refund; a stale read cannot either.
        return current
    return reported
