"""Invoice lifecycle (draft -> open -> paid | void | uncollectible) and invoice numbers."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.errors import ChangeRefused
from billing.invoices import (
    InvoiceStatus,
    can_transition,
    check_transition,
    credit_notes_carried_over,
    format_invoice_number,
    invoice_prefix_for,
)

DRAFT, OPEN, PAID, VOID, UNCOLLECTIBLE = (
    InvoiceStatus.DRAFT,
    InvoiceStatus.OPEN,
    InvoiceStatus.PAID,
    InvoiceStatus.VOID,
    InvoiceStatus.UNCOLLECTIBLE,
)

ALLOWED = {
    (DRAFT, OPEN),
    (DRAFT, VOID),
    (OPEN, PAID),
    (OPEN, VOID),
    (OPEN, UNCOLLECTIBLE),
    (UNCOLLECTIBLE, PAID),  # a late payment still settles a written-off invoice
    (UNCOLLECTIBLE, VOID),
    (VOID, PAID),  # money the provider took for a voided invoice is recorded, never ignored
}
SAME = {(s, s) for s in InvoiceStatus}
FORBIDDEN = sorted(set(itertools.product(InvoiceStatus, repeat=2)) - ALLOWED - SAME)


@pytest.mark.parametrize(("current", "target"), sorted(ALLOWED))
def test_allowed_transitions(current: InvoiceStatus, target: InvoiceStatus) -> None:
    assert can_transition(current, target)
    check_transition("in_1", current, target)


@pytest.mark.parametrize("status", list(InvoiceStatus))
def test_repeating_the_current_status_is_allowed_so_retries_are_idempotent(
    status: InvoiceStatus,
) -> None:
    assert can_transition(status, status)
    check_transition("in_1", status, status)


@pytest.mark.parametrize(("current", "target"), FORBIDDEN)
def test_forbidden_transitions_are_refused_naming_invoice_and_statuses(
    current: InvoiceStatus, target: InvoiceStatus
) -> None:
    assert not can_transition(current, target)
    with pytest.raises(ChangeRefused) as caught:
        check_transition("in_42", current, target)
    assert caught.value.message == f"invoice in_42 is {current} and cannot become {target}"
    assert caught.value.code == "change_refused"


def test_a_paid_invoice_cannot_be_voided() -> None:
    with pytest.raises(ChangeRefused, match=r"^invoice in_7 is paid and cannot become void$"):
        check_transition("in_7", PAID, VOID)


def test_paid_is_final_and_void_can_only_become_paid() -> None:
    assert [t for t in InvoiceStatus if t not in (PAID,) and can_transition(PAID, t)] == []
    assert [t for t in InvoiceStatus if t not in (VOID,) and can_transition(VOID, t)] == [PAID]


@pytest.mark.parametrize(
    ("sequence", "number"),
    [
        (1, "CULB92RG-0001"),
        (7, "CULB92RG-0007"),
        (9999, "CULB92RG-9999"),
        (12345, "CULB92RG-12345"),
    ],
)
def test_invoice_number_is_prefix_and_zero_padded_sequence(sequence: int, number: str) -> None:
    assert format_invoice_number("CULB92RG", sequence) == number


@pytest.mark.parametrize("sequence", [0, -1])
def test_invoice_sequence_starts_at_one(sequence: int) -> None:
    with pytest.raises(ValueError, match=f"starts at 1; got {sequence}"):
        format_invoice_number("CULB92RG", sequence)


PREFIX_ALPHABET = set("ABCDEFGHJKLMNPQRSTUVWXYZ23456789")


def test_prefix_is_stable_for_a_customer() -> None:
    # Pinned: changing the derivation would renumber every existing customer's invoices.
    assert invoice_prefix_for("cus_123") == "CULB92RG"
    assert invoice_prefix_for("cus_124") == "MQ7MRY38"
    assert invoice_prefix_for("cus_123") == invoice_prefix_for("cus_123")


def test_prefixes_are_eight_unambiguous_characters_and_differ_between_customers() -> None:
    prefixes = [invoice_prefix_for(f"cus_{n}") for n in range(2000)]

    assert all(len(p) == 8 and set(p) <= PREFIX_ALPHABET for p in prefixes)
    assert not set("".join(prefixes)) & set("IO01")
    assert len(set(prefixes)) == len(prefixes)
    # Every letter of the alphabet gets used: the mapping is not lopsided.
    assert set("".join(prefixes)) == PREFIX_ALPHABET


@given(
    credited=st.integers(min_value=0, max_value=10**9),
    rebilled=st.integers(min_value=-(10**9), max_value=10**9),
)
def test_credit_notes_carried_to_a_replacing_invoice_never_make_it_a_credit(
    credited: int, rebilled: int
) -> None:
    """A plan change during dunning bills the voided renewal's lines again: its credit notes
    come along in full when they fit (never charged for what was credited), and never push the
    new invoice below zero (an unpaid period never becomes balance credit)."""
    carried = credit_notes_carried_over(credited, rebilled)
    assert 0 <= carried <= credited
    assert rebilled - carried >= min(rebilled, 0)
    if rebilled >= credited:
        assert carried == credited
    with pytest.raises(ValueError, match="credited_minor"):
        credit_notes_carried_over(-1, rebilled)
