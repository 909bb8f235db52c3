"""Card numbers never reach the HTTP access log.

The API refuses card data in bodies, but a request line is logged as sent: a card number typed
into a query string (``/v1/invoices?customer_id=4242...``) would be written to uvicorn's access
log (when a deployment turns it on, at INFO) before anything could refuse it. This filter
rewrites every access-log record with such numbers removed.
"""

from __future__ import annotations

import logging
from urllib.parse import unquote_plus

from billing.card_data import contains_card_number, redact_card_numbers

#: uvicorn's access logger.
ACCESS_LOGGER = "uvicorn.access"


def _clean(value: object) -> object:
    """``value`` with card numbers removed; a URL is checked percent-decoded too (a number
    sent as ``4242%204242...`` or ``4242+4242...``) and then logged decoded, without them."""
    if not isinstance(value, str):
        return value
    decoded = unquote_plus(value)
    if decoded != value and contains_card_number(decoded):
        return redact_card_numbers(decoded)
    return redact_card_numbers(value)


class RedactCardNumbers(logging.Filter):
    """Remove PAN-looking values from a record's message and arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = _clean(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_clean(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _clean(v) for k, v in record.args.items()}
        return True


def install() -> None:
    """Add the filter to uvicorn's access logger, once per process."""
    logger = logging.getLogger(ACCESS_LOGGER)
    if not any(isinstance(f, RedactCardNumbers) for f in logger.filters):
        logger.addFilter(RedactCardNumbers())
