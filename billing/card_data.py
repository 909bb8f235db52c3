"""Recognising card numbers (PANs) where none may be: the service only ever handles the
provider's ids (``pm_...``), never card details, so a PAN-looking value in a request is
refused and never stored, logged or echoed back.

A PAN here is 13 to 19 digits, optionally grouped with single spaces or dashes, that passes
the Luhn check (ISO/IEC 7812). Pure: no I/O.
"""

from __future__ import annotations

import re

#: Runs of 13-19 digits, each optionally followed by one space or dash, standing on their own:
#: not inside a longer run of digits, nor glued to letters or underscores. The latter keeps
#: opaque ids (a hex UUID such as ``bench-0123456789012f...``, ``cus_...``) from being taken
#: for cards now and then.
_CANDIDATE = re.compile(r"(?<![0-9A-Za-z_])(?:[0-9][ -]?){12,18}[0-9](?![0-9A-Za-z_])")
REDACTED = "[card number removed]"


def luhn_valid(digits: str) -> bool:
    """Whether ``digits`` (only 0-9) passes the Luhn check."""
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _is_pan(candidate: str) -> bool:
    digits = re.sub(r"[ -]", "", candidate)
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


def find_card_numbers(text: str) -> list[str]:
    """The PAN-looking substrings of ``text``, as written."""
    return [m.group(0) for m in _CANDIDATE.finditer(text) if _is_pan(m.group(0))]


def contains_card_number(text: str) -> bool:
    return bool(find_card_numbers(text))


def redact_card_numbers(text: str) -> str:
    """``text`` with every PAN-looking substring replaced by ``[card number removed]``."""
    return _CANDIDATE.sub(lambda m: REDACTED if _is_pan(m.group(0)) else m.group(0), text)
