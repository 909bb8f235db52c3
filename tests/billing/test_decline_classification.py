"""Which declines dunning retries on schedule (soft), stops on (hard) or waits on the customer
to authenticate."""

from __future__ import annotations

import pytest

from billing.payments import (
    AUTHENTICATION_CODES,
    HARD_DECLINE_CODES,
    ChargeOutcomeKind,
    classify_decline,
)

HARD = ChargeOutcomeKind.HARD_DECLINE
SOFT = ChargeOutcomeKind.SOFT_DECLINE
AUTH = ChargeOutcomeKind.AUTHENTICATION_REQUIRED


@pytest.mark.parametrize(
    "decline_code", ["lost_card", "stolen_card", "pickup_card", "fraudulent", "expired_card"]
)
def test_hard_decline_codes_stop_retrying(decline_code: str) -> None:
    assert classify_decline("card_declined", decline_code) is HARD
    assert classify_decline(None, decline_code) is HARD


@pytest.mark.parametrize("error_code", ["expired_card", "incorrect_number", "invalid_number"])
def test_hard_error_code_without_a_decline_code(error_code: str) -> None:
    assert classify_decline(error_code, None) is HARD


@pytest.mark.parametrize(
    ("error_code", "decline_code"),
    [
        ("authentication_required", "authentication_required"),
        ("authentication_required", None),
        ("card_declined", "authentication_required"),
        ("card_declined", "card_authentication_required"),
        (None, "authentication_required"),
    ],
)
def test_authentication_codes_wait_for_the_customer(
    error_code: str | None, decline_code: str | None
) -> None:
    assert classify_decline(error_code, decline_code) is AUTH


@pytest.mark.parametrize(
    ("error_code", "decline_code"),
    [
        ("card_declined", "insufficient_funds"),
        ("card_declined", "generic_decline"),
        ("card_declined", "do_not_honor"),
        ("card_declined", "try_again_later"),
        ("card_declined", "a_code_stripe_adds_next_year"),
        ("card_declined", None),
        ("processing_error", None),
        ("card_declined", ""),
        (None, None),
    ],
)
def test_soft_and_unknown_declines_are_retried(
    error_code: str | None, decline_code: str | None
) -> None:
    assert classify_decline(error_code, decline_code) is SOFT


@pytest.mark.parametrize(
    ("error_code", "decline_code", "kind"),
    [
        ("expired_card", "insufficient_funds", SOFT),
        ("expired_card", "generic_decline", SOFT),
        ("authentication_required", "lost_card", HARD),
        ("expired_card", "authentication_required", AUTH),
        ("expired_card", "", HARD),  # an empty decline code is no decline code
    ],
)
def test_decline_code_wins_over_error_code(
    error_code: str, decline_code: str, kind: ChargeOutcomeKind
) -> None:
    assert classify_decline(error_code, decline_code) is kind


def test_no_code_is_both_hard_and_authentication() -> None:
    assert not HARD_DECLINE_CODES & AUTHENTICATION_CODES
