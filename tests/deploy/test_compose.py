"""docker-compose.yml cannot run here (no Docker engine), so this checks it against the code:
every BILLING_* variable is a Settings field, every service's settings load, and the
addresses, ports and credentials line up between services."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import make_url

from billing.settings import Settings

COMPOSE = Path(__file__).parents[2] / "docker-compose.yml"
BILLING_SERVICES = ("migrate", "worker", "api")

# Host environment a deployment provides (compose refuses to start without these).
HOST_ENV = {
    "POSTGRES_PASSWORD": "s3cret-postgres-password",
    "BILLING_STRIPE_API_KEY": "sk_test_" + "x" * 24,
    "BILLING_STRIPE_WEBHOOK_SECRET": "whsec_" + "y" * 24,
    "BILLING_API_KEYS": '[{"name": "ops", "scope": "admin", "key": "' + "k" * 32 + '"}]',
}

_VAR = re.compile(r"\$\{(\w+)(?::\?[^}]*)?\}")


def interpolate(value: Any) -> str:
    """Compose's ${VAR:?message} substitution, failing like compose on a missing variable."""

    def sub(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in HOST_ENV:
            raise AssertionError(f"compose needs ${{{name}}} from the host environment")
        return HOST_ENV[name]

    return _VAR.sub(sub, str(value))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def env_of(compose: dict[str, Any], service: str) -> dict[str, str]:
    return {k: interpolate(v) for k, v in compose["services"][service]["environment"].items()}


def test_the_stack_has_the_production_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {
        "postgres", "temporal", "temporal-ui", "migrate", "worker", "api", "prometheus",
        "grafana",
    }  # fmt: skip


@pytest.mark.parametrize("service", BILLING_SERVICES)
def test_every_billing_variable_is_a_settings_field(compose: dict[str, Any], service: str) -> None:
    fields = {f"BILLING_{name.upper()}" for name in Settings.model_fields}
    names = {k for k in env_of(compose, service) if k.startswith("BILLING_")}
    assert names, f"{service} sets no BILLING_ variables"
    assert names <= fields, f"{service}: not settings fields: {sorted(names - fields)}"


@pytest.mark.parametrize("service", BILLING_SERVICES)
def test_each_service_settings_load_and_pass_the_production_checks(
    compose: dict[str, Any], service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in list(__import__("os").environ):
        if key.startswith("BILLING_"):
            monkeypatch.delenv(key)
    for key, value in env_of(compose, service).items():
        monkeypatch.setenv(key, value)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.environment == "production"
    settings.check_production_secrets()  # would exit on a missing or placeholder secret


def test_database_url_points_at_the_postgres_service(compose: dict[str, Any]) -> None:
    pg = env_of(compose, "postgres")
    for service in BILLING_SERVICES:
        url = make_url(env_of(compose, service)["BILLING_DATABASE_URL"])
        assert url.drivername == "postgresql+psycopg"
        assert (url.host, url.port) == ("postgres", 5432)
        assert url.username == pg["POSTGRES_USER"]
        assert url.password == pg["POSTGRES_PASSWORD"]
        assert url.database == pg["POSTGRES_DB"]


def test_temporal_addresses_line_up(compose: dict[str, Any]) -> None:
    assert env_of(compose, "temporal")["POSTGRES_SEEDS"] == "postgres"
    assert (
        env_of(compose, "temporal")["POSTGRES_USER"] == env_of(compose, "postgres")["POSTGRES_USER"]
    )
    for service in BILLING_SERVICES:
        assert env_of(compose, service)["BILLING_TEMPORAL_ADDRESS"] == "temporal:7233"
    assert env_of(compose, "temporal-ui")["TEMPORAL_ADDRESS"] == "temporal:7233"


def test_api_port_matches_its_published_port(compose: dict[str, Any]) -> None:
    api = compose["services"]["api"]
    port = int(env_of(compose, "api")["BILLING_API_PORT"])
    assert f"{port}:{port}" in api["ports"]
    assert env_of(compose, "api")["BILLING_API_HOST"] == "0.0.0.0"
    assert api["command"] == ["billing", "api"]


def test_worker_scales_and_everything_waits_for_the_migration(compose: dict[str, Any]) -> None:
    services = compose["services"]
    worker = services["worker"]
    # `--scale worker=N` needs no fixed name and no published ports.
    assert "container_name" not in worker and "ports" not in worker
    assert worker["command"] == ["billing", "worker"]
    assert services["migrate"]["command"] == ["billing", "migrate"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for service in ("worker", "api"):
        deps = services[service]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert deps["temporal"]["condition"] == "service_healthy"


def test_compose_refuses_to_start_without_a_secret(compose: dict[str, Any]) -> None:
    env = compose["services"]["worker"]["environment"]
    secret = env["BILLING_STRIPE_API_KEY"]
    assert re.fullmatch(r"\$\{BILLING_STRIPE_API_KEY:\?.+\}", secret)


def _published(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(host address, host port, container port) of each published port; compose's short
    syntax ``[HOST_IP:]HOST_PORT:CONTAINER_PORT`` (no host address: every interface)."""
    published = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):  # long syntax
            published.append(
                (str(entry.get("host_ip", "0.0.0.0")), str(entry.get("published", "")),
                 str(entry["target"]))
            )  # fmt: skip
            continue
        parts = str(entry).split(":")
        if len(parts) == 1:  # a container port alone: published on a random host port
            parts = ["", parts[0]]
        host_ip = parts[0] if len(parts) == 3 else "0.0.0.0"
        published.append((host_ip, parts[-2], parts[-1]))
    return published


def test_the_temporal_frontend_is_not_published(compose: dict[str, Any]) -> None:
    # Whoever reaches an unauthenticated frontend can signal or terminate billing workflows.
    temporal = compose["services"]["temporal"]
    assert _published(temporal) == [], "the Temporal frontend must stay on the internal network"
    assert "network_mode" not in temporal


def test_the_temporal_ui_is_published_on_the_host_loopback_only(compose: dict[str, Any]) -> None:
    ui = compose["services"]["temporal-ui"]
    for host_ip, _, _ in _published(ui):
        assert host_ip == "127.0.0.1", f"the Temporal UI is published on {host_ip or 'all'}"
    assert "network_mode" not in ui


def test_only_the_api_is_published_on_every_interface(compose: dict[str, Any]) -> None:
    exposed = {
        name
        for name, service in compose["services"].items()
        for host_ip, _, _ in _published(service)
        if host_ip not in ("127.0.0.1", "::1", "[::1]")
    }
    assert exposed == {"api"}


def test_the_parser_reads_compose_port_syntax() -> None:
    # The checks above are only as good as this reading of the short syntax.
    assert _published({"ports": ["7233:7233"]}) == [("0.0.0.0", "7233", "7233")]
    assert _published({"ports": ["127.0.0.1:8080:8080"]}) == [("127.0.0.1", "8080", "8080")]
    assert _published({"ports": ["7233"]}) == [("0.0.0.0", "", "7233")]


def test_several_workers_run_against_one_temporal_with_bounded_memory(
    compose: dict[str, Any],
) -> None:
    worker = compose["services"]["worker"]
    assert worker["deploy"]["replicas"] >= 2
    env = worker["environment"]
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        worker_max_cached_workflows=env["BILLING_WORKER_MAX_CACHED_WORKFLOWS"],
        activity_threads=env["BILLING_ACTIVITY_THREADS"],
    )
    assert settings.worker_max_cached_workflows == 500 and settings.activity_threads == 16
    assert env["BILLING_TEMPORAL_ADDRESS"] == "temporal:7233"


def test_health_checks_and_scrape_targets_match_the_settings(compose: dict[str, Any]) -> None:
    """The API and worker health checks call /readyz on the ports the settings serve, and
    Prometheus scrapes the ports they serve metrics on; the Grafana dashboard's queries name
    metrics the code exports."""
    import json

    worker = Settings(_env_file=None, **{  # type: ignore[call-arg]
        k.removeprefix("BILLING_").lower(): v
        for k, v in env_of(compose, "worker").items()
        if k in ("BILLING_WORKER_METRICS_ADDRESS", "BILLING_WORKER_HEALTH_ADDRESS")
    })  # fmt: skip
    assert worker.worker_health_address is not None and worker.worker_metrics_address
    health_port = worker.worker_health_address.rsplit(":", 1)[1]
    assert f":{health_port}/readyz" in " ".join(
        compose["services"]["worker"]["healthcheck"]["test"]
    )
    assert ":8000/readyz" in " ".join(compose["services"]["api"]["healthcheck"]["test"])
    scrape = yaml.safe_load((COMPOSE.parent / "prometheus.yml").read_text())
    metrics_port = worker.worker_metrics_address.rsplit(":", 1)[1]
    # Compose's DNS: one address per container of a service.
    dns = {"api": ["10.0.0.2"], "worker": ["10.0.0.3", "10.0.0.4"]}
    targets = scrape_targets(scrape, dns)
    assert targets["billing-api"] == {"api:8000"}
    assert targets["billing-worker"] == {f"10.0.0.3:{metrics_port}", f"10.0.0.4:{metrics_port}"}
    dashboard = json.loads((COMPOSE.parent / "grafana" / "billing-dashboard.json").read_text())
    queries = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    for name in (
        "billing_api_request_duration_seconds_bucket",
        "billing_charge_attempts_total",
        "billing_dunning_recoveries_total",
        "billing_webhook_events_total",
        "billing_notifications",
        "billing_subscriptions_needs_attention",
    ):
        assert name in queries


def scrape_targets(config: dict[str, Any], dns: dict[str, list[str]]) -> dict[str, set[str]]:
    """What Prometheus scrapes per job under ``config``, with compose's DNS ``dns`` (service
    name -> one address per container). A static ``host:port`` is one target: each scrape
    reaches whichever container the name resolves to then. ``dns_sd_configs`` of type A make
    one target per address (compose serves no SRV records, so type SRV finds nothing)."""
    found: dict[str, set[str]] = {}
    for job in config["scrape_configs"]:
        targets = found.setdefault(job["job_name"], set())
        for static in job.get("static_configs", []):
            targets.update(static["targets"])
        for sd in job.get("dns_sd_configs", []):
            assert sd.get("type", "SRV") == "A", "compose's DNS answers A records, not SRV"
            for name in sd["names"]:
                targets.update(f"{address}:{sd['port']}" for address in dns.get(name, []))
        unknown = set(job) - {
            "job_name",
            "metrics_path",
            "scrape_interval",
            "static_configs",
            "dns_sd_configs",
        }
        assert not unknown, f"scrape_targets does not model {sorted(unknown)}"
    return found


@pytest.mark.parametrize("scale", [None, 1, 5])
def test_prometheus_scrapes_every_worker_replica(
    compose: dict[str, Any], scale: int | None
) -> None:
    """Each worker serves its own metrics (its workflow cache, its task slots, its charges):
    every replica must be a target, at the port the worker's settings serve metrics on, also
    after `docker compose up --scale worker=N`."""
    replicas = scale or compose["services"]["worker"]["deploy"]["replicas"]
    assert replicas >= 1
    worker_env = env_of(compose, "worker")
    port = worker_env["BILLING_WORKER_METRICS_ADDRESS"].rsplit(":", 1)[1]
    addresses = [f"172.18.0.{10 + n}" for n in range(replicas)]
    scrape = yaml.safe_load((COMPOSE.parent / "prometheus.yml").read_text())

    targets = scrape_targets(scrape, {"api": ["172.18.0.2"], "worker": addresses})

    assert targets["billing-worker"] == {f"{a}:{port}" for a in addresses}
    # The service name the discovery asks for is the compose service that runs the workers.
    names = {
        name
        for job in scrape["scrape_configs"]
        for sd in job.get("dns_sd_configs", [])
        for name in sd["names"]
    }
    assert names <= set(compose["services"])
    assert compose["services"]["worker"]["command"] == ["billing", "worker"]
