"""A card number typed into a URL never reaches the HTTP access log: uvicorn logs the request
line as sent, at INFO, when a deployment turns its access log on."""

from __future__ import annotations

import logging
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import uvicorn
from fastapi import FastAPI
from uvicorn.logging import AccessFormatter

from billing.api.access_log import ACCESS_LOGGER
from billing.card_data import REDACTED
from tests.api.support import auth

CARD = "4242 4242 4242 4242"  # Luhn-valid: Stripe's test Visa


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s'))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.mark.parametrize("card", [CARD, CARD.replace(" ", ""), CARD.replace(" ", "-")])
def test_a_card_number_in_a_query_string_is_removed_from_the_access_log(
    app: FastAPI, card: str
) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # As a deployment that wants access logs would run it: INFO, uvicorn's own log config.
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", lifespan="off", access_log=True))
    lines = Lines()
    logging.getLogger(ACCESS_LOGGER).addHandler(lines)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        query = urllib.parse.quote(card)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/invoices?customer_id={query}", headers=auth("finance")
        )
        try:
            urllib.request.urlopen(request, timeout=10).read()
        except urllib.error.HTTPError as error:  # a refusal is fine; the log is the point
            error.read()
        deadline = time.monotonic() + 5
        while not lines.lines and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        logging.getLogger(ACCESS_LOGGER).removeHandler(lines)
    [line] = lines.lines
    assert "/v1/invoices?customer_id=" in line
    assert REDACTED in line
    for form in (card, query, CARD.replace(" ", "")):
        assert form not in line
