"""A real deployment's Temporal connection: mTLS to a self-hosted cluster (client certificate,
key and CA from PEM files) or Temporal Cloud's API key, from the BILLING_ settings to the
arguments of ``Client.connect``."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.service import TLSConfig

from billing.settings import Settings
from billing.worker import temporal_tls_config


def settings_from_env(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    for key in list(__import__("os").environ):
        if key.startswith("BILLING_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings(_env_file=None)  # type: ignore[call-arg]


@pytest.fixture
def pems(tmp_path: Path) -> dict[str, Path]:
    files = {}
    for name in ("cert", "key", "ca"):
        path = tmp_path / f"{name}.pem"
        path.write_bytes(f"-----BEGIN {name.upper()}-----\n{name}\n-----END-----\n".encode())
        files[name] = path
    return files


def test_plain_grpc_without_tls_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert temporal_tls_config(settings_from_env(monkeypatch)) is False


def test_mtls_carries_the_client_certificate_key_and_ca(
    monkeypatch: pytest.MonkeyPatch, pems: dict[str, Path]
) -> None:
    settings = settings_from_env(
        monkeypatch,
        BILLING_TEMPORAL_TLS_CERT=str(pems["cert"]),
        BILLING_TEMPORAL_TLS_KEY=str(pems["key"]),
        BILLING_TEMPORAL_TLS_CA=str(pems["ca"]),
        BILLING_TEMPORAL_TLS_SERVER_NAME="temporal.internal",
    )
    tls = temporal_tls_config(settings)
    assert isinstance(tls, TLSConfig)
    assert tls.client_cert == pems["cert"].read_bytes()
    assert tls.client_private_key == pems["key"].read_bytes()
    assert tls.server_root_ca_cert == pems["ca"].read_bytes()
    assert tls.domain == "temporal.internal"


def test_a_ca_alone_is_server_verified_tls(
    monkeypatch: pytest.MonkeyPatch, pems: dict[str, Path]
) -> None:
    tls = temporal_tls_config(
        settings_from_env(monkeypatch, BILLING_TEMPORAL_TLS_CA=str(pems["ca"]))
    )
    assert isinstance(tls, TLSConfig)
    assert tls.server_root_ca_cert == pems["ca"].read_bytes() and tls.client_cert is None


def test_a_cloud_api_key_turns_tls_on_and_stays_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from_env(monkeypatch, BILLING_TEMPORAL_API_KEY="tcld-api-key-123")
    assert temporal_tls_config(settings) is True
    assert settings.temporal_api_key is not None
    assert "tcld-api-key-123" not in repr(settings)


def test_a_certificate_without_its_key_is_refused(
    monkeypatch: pytest.MonkeyPatch, pems: dict[str, Path]
) -> None:
    with pytest.raises(ValueError, match="BILLING_TEMPORAL_TLS_CERT is set but "
                       "BILLING_TEMPORAL_TLS_KEY is not"):  # fmt: skip
        settings_from_env(monkeypatch, BILLING_TEMPORAL_TLS_CERT=str(pems["cert"]))


def test_a_missing_pem_file_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"BILLING_TEMPORAL_TLS_CA is .*not a readable file"):
        settings_from_env(monkeypatch, BILLING_TEMPORAL_TLS_CA=str(tmp_path / "nope.pem"))
