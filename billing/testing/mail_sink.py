"""Real SMTP servers (aiosmtpd) for tests and ``billing dev``: one that keeps what it
received in memory (and can be told to refuse), and one that writes each mail as an ``.eml``
file into a folder."""

from __future__ import annotations

import email
import email.policy
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller


@dataclass
class ReceivedMail:
    mail_from: str
    rcpt_tos: list[str]
    raw: bytes

    def message(self) -> EmailMessage:
        parsed = email.message_from_bytes(self.raw, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


@dataclass
class RecordingHandler:
    """Keeps every accepted mail. ``replies`` are answered to DATA instead of accepting, in
    order, one per mail (e.g. ``["451 4.3.0 try later", "550 5.1.1 no such user"]``)."""

    received: list[ReceivedMail] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            if self.replies:
                reply = self.replies.pop(0)
                self.refused.append(reply)
                return reply
            self.received.append(
                ReceivedMail(
                    mail_from=str(envelope.mail_from),
                    rcpt_tos=list(envelope.rcpt_tos),
                    raw=bytes(envelope.original_content or envelope.content),
                )
            )
        return "250 OK"


class EmlFolderHandler:
    """Writes each accepted mail to ``folder`` as ``<time>-<recipient>.eml`` (open it in any
    mail program)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self._count = 0
        self._lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        from datetime import UTC, datetime

        with self._lock:
            self._count += 1
            count = self._count
        to = re.sub(r"[^A-Za-z0-9@._-]+", "_", (envelope.rcpt_tos or ["unknown"])[0])[:80]
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        path = self.folder / f"{stamp}-{count:04d}-{to}.eml"
        path.write_bytes(bytes(envelope.original_content or envelope.content))
        return "250 OK"


@contextmanager
def smtp_server(handler: object, *, host: str = "127.0.0.1", port: int = 0) -> Iterator[int]:
    """Run an aiosmtpd server with ``handler`` in a thread; yields its port."""
    controller = Controller(handler, hostname=host, port=port or _free_port(host))
    controller.start()
    try:
        yield int(controller.port)
    finally:
        controller.stop()


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
