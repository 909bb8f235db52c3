"""The one rule for text that comes from outside (API bodies, query strings, headers, CLI
arguments, workflow updates and signals, the payment provider's messages).

Whatever passes ``check_text`` can be written to SQLite and to PostgreSQL alike, and means the
same in both. What the two databases would otherwise disagree on:

- NUL (U+0000): PostgreSQL's text types cannot hold it (SQLite stores it), so a NUL that got
  past the edge failed in the database, or, once inside a workflow, failed its activity forever.
- Lone surrogates (U+D800-U+DFFF, which JSON's ``"\\ud800"`` escapes and undecodable command-line
  bytes produce): no UTF-8 encoding exists, so neither driver can send them.
- Length: PostgreSQL's ``VARCHAR(n)`` refuses a longer value, SQLite keeps it. The bound here is
  the column's, counted in code points (as PostgreSQL counts characters).

And what no business text should carry:

- other control characters (C0: U+0001-U+001F, and DEL U+007F). They break logs, CSV exports
  and terminals. Free text (``multiline=True``: reasons) keeps tab, line feed and carriage
  return, which a text area sends; one-line values (names, ids, keys) keep none.
- card numbers (``billing.card_data``): the service only ever handles the provider's ids.

Everything else is accepted and stored exactly as sent: emoji, right-to-left text, combining
marks, other scripts. Nothing is trimmed or normalised, so what is read back equals what was
sent. Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from billing.card_data import contains_card_number, redact_card_numbers
from billing.errors import InvalidInput

#: Characters a one-line value may not hold: C0 controls (NUL included), DEL, surrogates.
_FORBIDDEN_ONE_LINE = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")
#: The same for free text, which keeps tab, line feed and carriage return.
_FORBIDDEN_MULTILINE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


def _describe_character(char: str) -> str:
    code = ord(char)
    if code == 0:
        return "a NUL character (U+0000), which the database cannot store"
    if 0xD800 <= code <= 0xDFFF:
        return (
            f"a lone surrogate (U+{code:04X}), which is not a character and has no UTF-8 "
            "encoding; send the character itself (a surrogate pair in JSON escapes)"
        )
    return f"a control character (U+{code:04X})"


def text_problem(value: object, *, max_length: int, multiline: bool = False) -> str | None:
    """What is wrong with ``value`` as text of at most ``max_length`` characters (code points),
    or None if it is acceptable. The message never quotes the value (it may be a card number)."""
    if not isinstance(value, str):
        return f"must be text, got {type(value).__name__}"
    if len(value) > max_length:
        return f"is {len(value)} characters long; at most {max_length} are allowed"
    forbidden = (_FORBIDDEN_MULTILINE if multiline else _FORBIDDEN_ONE_LINE).search(value)
    if forbidden is not None:
        allowed = (
            "; only tab and line breaks are allowed among control characters"
            if multiline
            else "; it must be a single line of printable text"
        )
        return (
            f"contains {_describe_character(forbidden.group())} at position "
            f"{forbidden.start()}{allowed}"
        )
    if contains_card_number(value):
        return (
            "looks like it contains a card number; card details must never be sent here "
            "(send the provider's payment method id, 'pm_...', for a card)"
        )
    return None


def check_text(value: str, *, field: str, max_length: int, multiline: bool = False) -> str:
    """``value`` unchanged if it is acceptable text (see the module docstring); otherwise
    ``InvalidInput`` naming ``field`` and what was wrong."""
    problem = text_problem(value, max_length=max_length, multiline=multiline)
    if problem is not None:
        raise InvalidInput(f"{field} {problem}", field=field)
    return value


def check_optional_text(
    value: str | None, *, field: str, max_length: int, multiline: bool = False
) -> str | None:
    return (
        None
        if value is None
        else check_text(value, field=field, max_length=max_length, multiline=multiline)
    )


@dataclass(frozen=True)
class TextRule:
    """The bound and the kind of one text field: its database column's length, and whether it
    is free text (tab and line breaks allowed)."""

    max_length: int
    multiline: bool = False

    def check(self, value: str, *, field: str) -> str:
        return check_text(value, field=field, max_length=self.max_length, multiline=self.multiline)

    def check_optional(self, value: str | None, *, field: str) -> str | None:
        return None if value is None else self.check(value, field=field)


# The fields, each bounded by the column that stores it (db/models.py).
#: customers.external_id: the business's own reference.
EXTERNAL_ID = TextRule(200)
#: customers.name.
CUSTOMER_NAME = TextRule(200)
#: customers.email.
EMAIL = TextRule(320)
#: customers.timezone / subscriptions.timezone: an IANA zone name.
TIMEZONE = TextRule(64)
#: customers.locale: a BCP 47 tag (``billing.locales``).
LOCALE = TextRule(35)
#: plans.code.
PLAN_CODE = TextRule(63)
#: plans.name (also each invoice's description and line text).
PLAN_NAME = TextRule(200)
#: Our ids (customers.id, subscriptions.id, invoices.id ...).
OUR_ID = TextRule(40)
#: A provider payment method id (customers.default_payment_method_id, payment_attempts).
PAYMENT_METHOD_ID = TextRule(100)
#: Other provider object ids a webhook or a result names (payment intents, charges).
PROVIDER_ID = TextRule(100)
#: subscriptions.signup_idempotency_key.
IDEMPOTENCY_KEY = TextRule(200)
#: subscriptions.cancel_reason, subscription_status_changes.reason, invoices.status_reason:
#: free text from an operator or the customer.
REASON = TextRule(500, multiline=True)
#: reconciliation_findings.resolution_note: why finance resolved a finding.
RESOLUTION_NOTE = TextRule(2000, multiline=True)
#: reconciliation_findings.resolved_by: who resolved it (an API key's name, an operator).
RESOLVED_BY = TextRule(200)
#: payment_attempts.failure_message: the provider's decline message.
FAILURE_MESSAGE = TextRule(500, multiline=True)
#: payment_attempts.decline_code.
DECLINE_CODE = TextRule(64)
#: A card's brand and last four digits, as the provider reports them (shown, not stored).
CARD_BRAND = TextRule(32)
CARD_LAST4 = TextRule(4)

_CONTROL_OR_SURROGATE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


def clean_provider_text(value: str | None, rule: TextRule) -> str | None:
    """Text the payment provider sent (a decline message, a code), made storable rather than
    refused: the provider's answer must be recorded whatever it holds. Control characters and
    surrogates become U+FFFD, line breaks a space unless the rule allows them, a card number is
    redacted, and the result is cut to the rule's length. None (or nothing left) is None."""
    if value is None:
        return None
    cleaned = redact_card_numbers(_CONTROL_OR_SURROGATE.sub("\ufffd", value))
    if not rule.multiline:
        cleaned = re.sub("[\t\n\r]", " ", cleaned)
    cleaned = cleaned[: rule.max_length]
    return cleaned or None
