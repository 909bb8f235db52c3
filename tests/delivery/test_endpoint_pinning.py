"""SSRF: an event delivery resolves the endpoint's host once per attempt, refuses private
addresses outside dev, connects to exactly the address it checked (no second lookup, so no
DNS-rebinding window), and still verifies TLS against the host name. Real database, real
HTTPS receiver with a certificate from a test CA (made with the openssl command)."""

from __future__ import annotations

import hashlib
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpcore
import pytest
from sqlalchemy.orm import Session, sessionmaker
from temporalio.exceptions import ApplicationError

from activities.delivery import DeliveryActivities, MailSettings
from billing.clock import SystemClock
from billing.delivery import PostEventInput
from billing.ids import new_id
from billing.records import EventEndpointRecord
from billing.testing.event_receiver import event_receiver
from db.engine import make_engine, make_session_factory, unit_of_work
from db.repositories import events as events_repo
from tests.conftest import BOTH_BACKENDS
from tests.delivery.support import T0, make_book

PUBLIC = "93.184.216.34"


@pytest.fixture
def session_factory(database_url: str) -> sessionmaker[Session]:
    return make_session_factory(make_engine(database_url))


class RebindingDns:
    """A resolver that answers the endpoint's name with a public address first and a
    private one afterwards (an attacker's DNS with a 0-s TTL)."""

    def __init__(self, host: str, answers: list[list[str]]) -> None:
        self.host = host
        self.answers = answers
        self.lookups = 0

    def __call__(self, host: str) -> list[str]:
        assert host == self.host, host
        answer = self.answers[min(self.lookups, len(self.answers) - 1)]
        self.lookups += 1
        return answer


class Dials:
    """Records every address a delivery connects to; ``route`` sends one to a local port
    (standing in for the internet: the machine is offline)."""

    def __init__(self, route: dict[str, int] | None = None) -> None:
        self.route = route or {}
        self.dialed: list[str] = []

    def __call__(self, address: str, port: int, timeout: float | None) -> httpcore.NetworkStream:
        self.dialed.append(address)
        if address not in self.route:
            raise httpcore.ConnectError(f"test network: {address} is unreachable")
        return httpcore.SyncBackend().connect_tcp("127.0.0.1", self.route[address], timeout)


@pytest.fixture(scope="module")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and two server certificates (hooks.pinned.test, other.test) from ``openssl``."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("the openssl command is needed (Debian package openssl)")
    d = tmp_path_factory.mktemp("ca")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=d, check=True, capture_output=True)

    new_key = ["-newkey", "rsa:2048", "-nodes"]
    run("req", "-x509", *new_key, "-days", "2", "-subj", "/CN=Test CA", "-keyout", "ca.key",
        "-out", "ca.pem")  # fmt: skip
    for name in ("hooks.pinned.test", "other.test"):
        (d / f"{name}.ext").write_text(f"subjectAltName=DNS:{name}\n")
        run("req", *new_key, "-subj", f"/CN={name}", "-keyout", f"{name}.key",
            "-out", f"{name}.csr")  # fmt: skip
        signed_by_ca = ["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2"]
        run("x509", "-req", "-in", f"{name}.csr", *signed_by_ca, "-extfile", f"{name}.ext",
            "-out", f"{name}.pem")  # fmt: skip
    return d


def server_context(ca: Path, name: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(ca / f"{name}.pem", ca / f"{name}.key")
    return context


def activities_for(
    session_factory: sessionmaker[Session],
    resolve: RebindingDns,
    dials: Dials,
    *,
    ca: Path | None = None,
    allow_insecure: bool = False,
) -> DeliveryActivities:
    return DeliveryActivities(
        session_factory,
        SystemClock(),
        mailer=None,
        mail=MailSettings(from_address="billing@shop.example"),
        post_timeout_s=5,
        allow_insecure_endpoints=allow_insecure,
        resolve=resolve,
        ssl_context=ssl.create_default_context(cafile=str(ca / "ca.pem")) if ca else None,
        dial=dials,
    )


def one_delivery(session_factory: sessionmaker[Session], url: str) -> str:
    """An endpoint for ``url`` and one event for it; the delivery's id."""
    with unit_of_work(session_factory) as session:
        endpoint, _ = events_repo.insert_endpoint(
            session,
            EventEndpointRecord(
                id=new_id("we"),
                url=url,
                url_digest=hashlib.sha256(url.encode()).hexdigest(),
                event_types=["*"],
                secret="bwhsec_pin",
                created_at=T0,
                updated_at=T0,
            ),
        )
        book = make_book(session, name="Zoë \U0001f600 " + "x" * 50)
        event = events_repo.record_event(
            session,
            type="subscription.updated",
            subscription_id=book.subscription.id,
            object_id=book.subscription.id,
            object={"id": book.subscription.id},
            dedupe_key=f"{book.subscription.id}:pin",
            created_at=T0,
        )
        assert event is not None
        deliveries = events_repo.list_deliveries(session, event.id)
        (delivery,) = [d for d in deliveries if d.endpoint_id == endpoint.id]
    return delivery.id


def attempts_of(session_factory: sessionmaker[Session], delivery_id: str) -> list[str | None]:
    with unit_of_work(session_factory) as session:
        return [a.error for a in events_repo.list_delivery_attempts(session, [delivery_id])]


@BOTH_BACKENDS
def test_a_rebinding_dns_never_steers_a_delivery_to_a_private_address(
    session_factory: sessionmaker[Session],
) -> None:
    with event_receiver() as inside:
        host = "hooks.rebind.test"
        dns = RebindingDns(host, [[PUBLIC], ["127.0.0.1"]])
        dials = Dials()  # the public address is unreachable from this machine
        activities = activities_for(session_factory, dns, dials)
        delivery_id = one_delivery(session_factory, inside.url_for(host))
        for attempt in (1, 2):
            with pytest.raises(ApplicationError, match="event not accepted"):
                activities.post_event(PostEventInput(delivery_id))
            # One lookup per attempt: the connection never asks the DNS again.
            assert dns.lookups == attempt
        assert inside.requests == [], "the private address was reached"
        # The first attempt went to exactly the address it checked; the second was refused
        # before any connection.
        assert dials.dialed == [PUBLIC]
        errors = attempts_of(session_factory, delivery_id)
        assert errors[0] is not None and PUBLIC in errors[0]
        assert errors[1] == (
            f"refused: {host} resolves to 127.0.0.1, which is not public (private, loopback, "
            "link-local or metadata); refused"
        )


@pytest.mark.parametrize("address", ["169.254.169.254", "10.0.0.5", "::1", "fe80::1"])
def test_metadata_private_and_link_local_answers_are_refused(
    session_factory: sessionmaker[Session], address: str
) -> None:
    dials = Dials()
    dns = RebindingDns("hooks.example.test", [[PUBLIC, address]])
    activities = activities_for(session_factory, dns, dials)
    delivery_id = one_delivery(session_factory, "https://hooks.example.test/h")
    with pytest.raises(ApplicationError):
        activities.post_event(PostEventInput(delivery_id))
    assert dials.dialed == []
    assert f"resolves to {address}, which is not public" in (
        attempts_of(session_factory, delivery_id)[0] or ""
    )


def test_dev_allows_private_addresses_but_still_pins_them(
    session_factory: sessionmaker[Session],
) -> None:
    with event_receiver() as local:
        dns = RebindingDns("hooks.local.test", [["127.0.0.1"], ["127.0.0.2"]])
        dials = Dials({"127.0.0.1": local.port})
        activities = activities_for(session_factory, dns, dials, allow_insecure=True)
        delivery_id = one_delivery(session_factory, local.url_for("hooks.local.test"))
        assert activities.post_event(PostEventInput(delivery_id)).outcome == "delivered"
    assert dials.dialed == ["127.0.0.1"] and dns.lookups == 1
    assert local.requests[0].headers["Host"] == f"hooks.local.test:{local.port}"


@pytest.fixture
def ca(test_ca: Path) -> Iterator[Path]:
    yield test_ca


def test_tls_is_verified_against_the_host_name_on_the_pinned_address(
    session_factory: sessionmaker[Session], ca: Path
) -> None:
    host = "hooks.pinned.test"
    with event_receiver(tls=server_context(ca, host)) as good:
        dns = RebindingDns(host, [[PUBLIC]])
        dials = Dials({PUBLIC: good.port})
        activities = activities_for(session_factory, dns, dials, ca=ca)
        delivery_id = one_delivery(session_factory, good.url_for(host))
        result = activities.post_event(PostEventInput(delivery_id))
    assert result.outcome == "delivered" and result.status_code == 200
    assert dials.dialed == [PUBLIC] and dns.lookups == 1
    (request,) = good.requests
    assert request.headers["Host"] == f"{host}:{good.port}"
    assert request.event()["type"] == "subscription.updated"
    # The same address serving a certificate for another name is refused: the check is
    # against the URL's host, not the address dialed.
    with event_receiver(tls=server_context(ca, "other.test")) as impostor:
        dns = RebindingDns(host, [[PUBLIC]])
        dials = Dials({PUBLIC: impostor.port})
        activities = activities_for(session_factory, dns, dials, ca=ca)
        delivery_id = one_delivery(session_factory, f"https://{host}:{impostor.port}/hooks")
        with pytest.raises(ApplicationError, match="event not accepted"):
            activities.post_event(PostEventInput(delivery_id))
        assert impostor.requests == []
    error = attempts_of(session_factory, delivery_id)[0] or ""
    assert "certificate verify failed" in error and "hooks.pinned.test" in error, error


def test_a_receiver_answering_200_after_our_timeout_gets_the_event_again_once_more(
    session_factory: sessionmaker[Session],
) -> None:
    """At least once, made visible: the first attempt times out (the receiver still answers
    200, too late), the retry delivers; the receiver has the same event id twice and
    deduplicates on it; our record is one delivered delivery with both attempts."""
    with event_receiver(delay_s=2.5) as late:
        dns = RebindingDns("hooks.late.test", [["127.0.0.1"]])
        activities = DeliveryActivities(
            session_factory,
            SystemClock(),
            mailer=None,
            mail=MailSettings(from_address="billing@shop.example"),
            post_timeout_s=1,
            allow_insecure_endpoints=True,
            resolve=dns,
        )
        delivery_id = one_delivery(session_factory, late.url_for("hooks.late.test"))
        with pytest.raises(ApplicationError, match="ReadTimeout"):
            activities.post_event(PostEventInput(delivery_id))
        late.delay_s = 0
        assert activities.post_event(PostEventInput(delivery_id)).outcome == "delivered"
        # Delivered: a third run (a retry after a lost result) sends nothing.
        assert activities.post_event(PostEventInput(delivery_id)).outcome == "skipped"
        time.sleep(2)  # the late answer to the first request is recorded too
    ids = [r.event()["id"] for r in late.requests]
    assert len(ids) == 2 and len(set(ids)) == 1
    errors = attempts_of(session_factory, delivery_id)
    assert len(errors) == 2 and "ReadTimeout" in (errors[0] or "") and errors[1] is None
