"""billing.text: the one rule for outside text, and the update/signal inputs that use it.

Properties: whatever the rule accepts can be encoded as UTF-8 and holds no NUL, so both
databases store it as sent; whatever it refuses is refused with InvalidInput naming the field
and never quoting the value; provider text is always made acceptable rather than refused.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.contracts import (
    CancelInput,
    PauseInput,
    PaymentAuthenticatedInput,
    PaymentMethodChangedInput,
    ResumeInput,
    UpdatePaymentMethodInput,
)
from billing.errors import InvalidInput
from billing.text import (
    CARD_BRAND,
    DECLINE_CODE,
    FAILURE_MESSAGE,
    REASON,
    TextRule,
    check_text,
    clean_provider_text,
)

ANY_TEXT = st.text(st.one_of(st.characters(), st.characters(categories=["Cc", "Cs"])), max_size=600)
RULES = st.sampled_from(
    [REASON, DECLINE_CODE, CARD_BRAND, TextRule(40), TextRule(500, multiline=True)]
)


@given(ANY_TEXT, RULES)
def test_accepted_text_is_storable_as_sent_and_refused_text_names_the_field(
    value: str, rule: TextRule
) -> None:
    try:
        checked = rule.check(value, field="reason")
    except InvalidInput as refused:
        assert refused.field == "reason"
        assert refused.message.startswith("reason ")
        if len(value) >= 13:
            assert value not in refused.message  # never echoed (it may be a card number)
        return
    assert checked is value
    assert len(value) <= rule.max_length
    assert "\x00" not in value
    value.encode("utf-8")  # no lone surrogate
    allowed = {"\t", "\n", "\r"} if rule.multiline else set()
    assert not any((ord(c) < 0x20 or ord(c) == 0x7F) and c not in allowed for c in value)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("fraud\x00", "NUL character (U+0000)"),
        ("\ud800", "lone surrogate (U+D800)"),
        ("x" * 501, "501 characters long; at most 500"),
        ("red\x1b[31m", "control character (U+001B)"),
        ("card 4242 4242 4242 4242", "card number"),
    ],
)
def test_each_refusal_says_what_was_wrong(value: str, words: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        check_text(value, field="reason", max_length=500, multiline=True)
    assert words in refused.value.message
    assert refused.value.field == "reason"


@pytest.mark.parametrize(
    "value",
    ["", "Ŝtopiĝu 👋🏾", "مرحبا بالعالم", "\u202eevil", "👨‍👩‍👧" * 71, "two\nlines\ttab\r\n"],
)
def test_free_text_keeps_emoji_rtl_and_line_breaks(value: str) -> None:
    assert REASON.check(value, field="reason") == value


def test_one_line_values_refuse_line_breaks() -> None:
    with pytest.raises(InvalidInput, match="single line"):
        TextRule(200).check("Ada\nLovelace", field="customer.name")


@given(st.one_of(st.none(), ANY_TEXT), RULES)
def test_provider_text_is_always_made_storable(value: str | None, rule: TextRule) -> None:
    cleaned = clean_provider_text(value, rule)
    if cleaned is not None:
        assert rule.check(cleaned, field="failure_message") == cleaned


def test_provider_text_keeps_what_it_can() -> None:
    assert clean_provider_text("Your card was declined.", FAILURE_MESSAGE) == (
        "Your card was declined."
    )
    assert clean_provider_text("bad\x00code", DECLINE_CODE) == "bad\ufffdcode"
    assert clean_provider_text("x" * 900, FAILURE_MESSAGE) == "x" * 500
    assert clean_provider_text("", DECLINE_CODE) is None


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (CancelInput(reason="fraud\x00"), "reason"),
        (CancelInput(reason="x" * 501), "reason"),
        (PauseInput(reason="\ud800"), "reason"),
        (ResumeInput(reason="\x1b"), "reason"),
        (UpdatePaymentMethodInput(payment_method_id="pm_\x00"), "payment_method_id"),
        (UpdatePaymentMethodInput(payment_method_id="  "), "payment_method_id"),
        (UpdatePaymentMethodInput(payment_method_id="4242424242424242"), "payment_method_id"),
        (PaymentMethodChangedInput(payment_method_id="pm_" + "x" * 100), "payment_method_id"),
        (PaymentAuthenticatedInput(payment_intent_id="pi_\x00"), "payment_intent_id"),
        (PaymentAuthenticatedInput(payment_intent_id="pi_1", invoice_id="in\n"), "invoice_id"),
    ],
)
def test_update_and_signal_inputs_refuse_what_their_activities_cannot_write(
    message: CancelInput
    | PauseInput
    | ResumeInput
    | UpdatePaymentMethodInput
    | PaymentMethodChangedInput
    | PaymentAuthenticatedInput,
    field: str,
) -> None:
    with pytest.raises(InvalidInput) as refused:
        message.check()
    assert refused.value.field == field


def test_valid_update_and_signal_inputs_pass() -> None:
    CancelInput(at_period_end=False, reason="moved to a competitor 🙁\nsee ticket").check()
    PauseInput().check()
    ResumeInput(reason="back").check()
    UpdatePaymentMethodInput(payment_method_id="pm_card_visa").check()
    PaymentMethodChangedInput(payment_method_id="pm_1").check()
    PaymentAuthenticatedInput(payment_intent_id="pi_1", invoice_id="in_1").check()
