"""The SMTP adapter: sends one message, and says what the server answered.

Only a reply code leaves here (``SmtpSendError.code``, None when the server never answered),
so ``billing.notices.smtp_verdict`` decides retry or give-up. The password is read from its
``SecretStr`` at login and appears in no error or log."""

from __future__ import annotations

import smtplib
import ssl
from dataclasses import dataclass
from email.message import EmailMessage

from pydantic import SecretStr


class SmtpSendError(Exception):
    """The server did not accept the message: ``code`` is its reply (None: no reply at all,
    e.g. a timeout or a refused connection)."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class SmtpConfig:
    host: str
    port: int = 25
    #: ``none``, ``starttls`` or ``tls`` (implicit).
    tls: str = "none"
    user: str | None = None
    password: SecretStr | None = None
    timeout_s: float = 10.0


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class SmtpMailer:
    def __init__(self, config: SmtpConfig) -> None:
        self.config = config

    def send(self, message: EmailMessage) -> None:
        """Deliver ``message`` to its ``To``; return once the server accepted it (250 after
        DATA), raise ``SmtpSendError`` otherwise."""
        c = self.config
        try:
            if c.tls == "tls":
                client: smtplib.SMTP = smtplib.SMTP_SSL(
                    c.host, c.port, timeout=c.timeout_s, context=ssl.create_default_context()
                )
            else:
                client = smtplib.SMTP(c.host, c.port, timeout=c.timeout_s)
            with client:
                if c.tls == "starttls":
                    client.starttls(context=ssl.create_default_context())
                if c.user:
                    password = c.password.get_secret_value() if c.password else ""
                    client.login(c.user, password)
                refused = client.send_message(message)
        except smtplib.SMTPRecipientsRefused as error:
            # One recipient per message: its reply is the message's.
            code, reply = next(iter(error.recipients.values()))
            raise SmtpSendError(code, f"recipient refused: {code} {_text(reply)}") from None
        except smtplib.SMTPResponseException as error:
            raise SmtpSendError(
                error.smtp_code, f"{error.smtp_code} {_text(error.smtp_error)}"
            ) from None
        except (TimeoutError, smtplib.SMTPException, OSError) as error:
            # No reply code: connection refused or dropped, a timeout, a TLS failure.
            raise SmtpSendError(None, f"{type(error).__name__}: {error}") from None
        if refused:
            code, reply = next(iter(refused.values()))
            raise SmtpSendError(code, f"recipient refused: {code} {_text(reply)}")
