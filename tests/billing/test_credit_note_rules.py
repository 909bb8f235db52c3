"""The credit note rules (``billing.credit_notes``), without a database: the split, the caps,
the by-line credits and the refund status order."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.credit_notes import (
    CreditNoteReason,
    CreditNoteRequest,
    InvoiceFacts,
    InvoiceLineFacts,
    LineRequest,
    RefundReason,
    RefundStatus,
    format_credit_note_number,
    plan_credit_note,
    refund_idempotency_key,
    refund_reason_for,
    refund_status_after,
)
from billing.errors import ChangeRefused, InvalidInput
from billing.invoices import InvoiceStatus


def paid(
    total: int = 2500,
    *,
    credited: int = 0,
    refunded: int = 0,
    disputed: int = 0,
    lines: tuple[InvoiceLineFacts, ...] | None = None,
) -> InvoiceFacts:
    return InvoiceFacts(
        invoice_id="in_1",
        number="ABCD2345-0001",
        status=InvoiceStatus.PAID,
        currency="USD",
        total_minor=total,
        credited_minor=credited,
        lines=lines or (InvoiceLineFacts("il_1", 1, "Pro monthly", total),),
        captured_minor=total,
        refunded_minor=refunded,
        disputed_minor=disputed,
        has_payment=True,
    )


def test_with_no_amount_and_no_split_the_whole_invoice_goes_to_the_balance() -> None:
    plan = plan_credit_note(paid(), CreditNoteRequest(reason=CreditNoteReason.ORDER_CHANGE))
    assert (plan.amount_minor, plan.refund_amount_minor, plan.credit_amount_minor) == (
        2500,
        0,
        2500,
    )


def test_the_split_given_alone_is_the_credit_note() -> None:
    plan = plan_credit_note(
        paid(), CreditNoteRequest(refund_amount_minor=700, out_of_band_amount_minor=300)
    )
    assert (plan.amount_minor, plan.refund_amount_minor, plan.out_of_band_amount_minor) == (
        1000,
        700,
        300,
    )


def test_parts_that_do_not_add_up_to_the_amount_are_refused_naming_a_part() -> None:
    with pytest.raises(InvalidInput) as refused:
        plan_credit_note(paid(), CreditNoteRequest(amount_minor=1000, refund_amount_minor=999))
    assert refused.value.field == "refund_amount_minor"
    assert "must add up to the credit note's total, 1000" in refused.value.message


def test_refunds_are_capped_by_captured_minus_refunded_minus_disputed() -> None:
    facts = paid(refunded=1000, disputed=500)
    assert (
        plan_credit_note(facts, CreditNoteRequest(refund_amount_minor=1000)).refund_amount_minor
        == 1000
    )
    with pytest.raises(InvalidInput) as refused:
        plan_credit_note(facts, CreditNoteRequest(refund_amount_minor=1001))
    assert refused.value.field == "refund_amount_minor"
    assert "captured 2500, refunded 1000, disputed 500" in refused.value.message


def test_credits_are_capped_by_the_invoice_total() -> None:
    with pytest.raises(InvalidInput) as refused:
        plan_credit_note(paid(credited=2000), CreditNoteRequest(amount_minor=501))
    assert refused.value.field == "amount_minor"
    with pytest.raises(ChangeRefused, match="fully credited already"):
        plan_credit_note(paid(credited=2500), CreditNoteRequest())


def test_by_line_each_line_is_capped_and_must_exist() -> None:
    lines = (
        InvoiceLineFacts("il_1", 1, "Pro monthly", 2000, credited_minor=500),
        InvoiceLineFacts("il_1_2", 2, "Proration", -300),
        InvoiceLineFacts("il_1_3", 3, "Seats", 800),
    )
    facts = paid(1700 + 800, credited=500, lines=lines)
    plan = plan_credit_note(
        facts, CreditNoteRequest(lines=(LineRequest("il_1"), LineRequest("il_1_3", 100)))
    )
    assert [(line.invoice_line_id, line.amount_minor) for line in plan.lines] == [
        ("il_1", 1500),
        ("il_1_3", 100),
    ]
    with pytest.raises(InvalidInput) as over:
        plan_credit_note(facts, CreditNoteRequest(lines=(LineRequest("il_1", 1501),)))
    assert over.value.field == "lines[0].amount_minor"
    with pytest.raises(InvalidInput) as negative:
        plan_credit_note(facts, CreditNoteRequest(lines=(LineRequest("il_1_2"),)))
    assert negative.value.field == "lines[0].invoice_line_id"
    with pytest.raises(InvalidInput) as unknown:
        plan_credit_note(facts, CreditNoteRequest(lines=(LineRequest("il_nope"),)))
    assert "its lines: il_1, il_1_2, il_1_3" in unknown.value.message
    with pytest.raises(InvalidInput, match="named twice"):
        plan_credit_note(
            facts, CreditNoteRequest(lines=(LineRequest("il_1", 1), LineRequest("il_1", 1)))
        )


def test_an_open_invoice_lowers_its_amount_due_and_takes_no_split() -> None:
    facts = InvoiceFacts("in_1", "A-0001", InvoiceStatus.OPEN, "USD", 2500, 0, ())
    plan = plan_credit_note(facts, CreditNoteRequest(amount_minor=400))
    assert (plan.amount_due_reduction_minor, plan.refund_amount_minor) == (400, 0)
    with pytest.raises(InvalidInput) as refused:
        plan_credit_note(facts, CreditNoteRequest(amount_minor=400, refund_amount_minor=400))
    assert refused.value.field == "refund_amount_minor"


@pytest.mark.parametrize(
    "status", [InvoiceStatus.VOID, InvoiceStatus.UNCOLLECTIBLE, InvoiceStatus.DRAFT]
)
def test_closed_and_draft_invoices_take_no_credit_note(status: InvoiceStatus) -> None:
    facts = InvoiceFacts("in_1", "A-0001", status, "USD", 2500, 0, ())
    with pytest.raises(ChangeRefused, match=f"is {status.value}"):
        plan_credit_note(facts, CreditNoteRequest())


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "10"])
def test_amounts_are_whole_positive_minor_units(bad: object) -> None:
    with pytest.raises(InvalidInput) as refused:
        plan_credit_note(paid(), CreditNoteRequest(amount_minor=bad))  # type: ignore[arg-type]
    assert refused.value.field == "amount_minor"


@given(
    total=st.integers(1, 10**9),
    credited=st.integers(0, 10**9),
    refunded=st.integers(0, 10**9),
    disputed=st.integers(0, 10**9),
    refund=st.integers(0, 10**9),
    credit=st.integers(0, 10**9),
)
def test_an_accepted_credit_note_never_exceeds_a_cap(
    total: int, credited: int, refunded: int, disputed: int, refund: int, credit: int
) -> None:
    facts = paid(total, credited=min(credited, total), refunded=refunded, disputed=disputed)
    try:
        plan = plan_credit_note(
            facts, CreditNoteRequest(refund_amount_minor=refund, credit_amount_minor=credit)
        )
    except (InvalidInput, ChangeRefused):
        return
    assert plan.amount_minor == plan.refund_amount_minor + plan.credit_amount_minor > 0
    assert facts.credited_minor + plan.amount_minor <= total
    assert plan.refund_amount_minor <= max(total - refunded - disputed, 0)


def test_refund_statuses_never_go_back_from_final() -> None:
    assert (
        refund_status_after(RefundStatus.SUCCEEDED, RefundStatus.PENDING) == RefundStatus.SUCCEEDED
    )
    assert refund_status_after(RefundStatus.SUCCEEDED, RefundStatus.FAILED) == RefundStatus.FAILED
    assert refund_status_after(RefundStatus.FAILED, RefundStatus.SUCCEEDED) == RefundStatus.FAILED
    assert (
        refund_status_after(RefundStatus.PENDING, RefundStatus.SUCCEEDED) == RefundStatus.SUCCEEDED
    )


def test_names_keys_and_reasons() -> None:
    assert format_credit_note_number("ABCD2345", 3) == "ABCD2345-CN-0003"
    assert refund_idempotency_key("cn_1", 2) == "cn_1-refund-2"
    assert refund_reason_for(CreditNoteReason.FRAUDULENT) == RefundReason.FRAUDULENT
    assert refund_reason_for(CreditNoteReason.ORDER_CHANGE) == RefundReason.REQUESTED_BY_CUSTOMER
    assert refund_reason_for(None) == RefundReason.REQUESTED_BY_CUSTOMER
