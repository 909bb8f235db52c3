"""A payments worker in its own process, for simulations and tests on the time-skipping server:
``python -m billing.testing.payments_process --target HOST:PORT --task-queue Q ...``, with
the database URL in ``BILLING_PAYMENTS_PROCESS_DATABASE_URL``.

``BillingHarness(payments_processes=N)`` starts N of these instead of the payments worker in its
own process, as production runs workers in several processes. A simulation of many
subscriptions is CPU-bound in Python, and one process holds one interpreter lock: with the
charges (the provider calls, their settlement and their writes, about half of the work of a
billed period) in another process, the two halves run on two cores.

The process prints ``ready`` on stdout once its worker is built and connected, then runs until
SIGTERM or SIGINT, when it shuts the worker down (in-flight activities finish).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import tempfile
from typing import IO, TextIO

from temporalio.client import Client

from activities.stripe_gateway import StripeGateway, make_stripe_client
from billing.temporal_payloads import DATA_CONVERTER
from billing.testing.clocks import ServerTimeClock
from billing.testing.localstripe import LOCALSTRIPE_API_KEY
from billing.worker import Dependencies, build_payments_worker
from db.engine import make_engine, make_session_factory

#: The test harness's workers' build id (this process's and ``BillingHarness``'s). Without
#: one the SDK hashes the bytecode of every loaded module the first time a process builds a
#: worker (0.3-0.4 s of CPU, a tenth of a ten-year simulation); no versioning uses it here.
HARNESS_BUILD_ID = "billing-test-harness"

#: The variable that carries the database URL to the process.
DATABASE_URL_VARIABLE = "BILLING_PAYMENTS_PROCESS_DATABASE_URL"
#: Real seconds a new process may take to import, connect and build its worker.
READY_TIMEOUT_S = 60.0


class PaymentsProcess:
    """One payments worker process (this module run with ``python -m``), started and stopped
    from asyncio. Its stderr goes to a temporary file, quoted when it fails."""

    def __init__(
        self,
        *,
        target: str,
        namespace: str,
        task_queue: str,
        database_url: str,
        stripe_api_base: str,
        threads: int = 8,
        throwaway_database: bool = False,
    ) -> None:
        self._args = [
            "--target",
            target,
            "--namespace",
            namespace,
            "--task-queue",
            task_queue,
            "--stripe-api-base",
            stripe_api_base,
            "--threads",
            str(threads),
        ]
        if throwaway_database:
            self._args.append("--throwaway-database")
        # In the environment, not the command line: a PostgreSQL URL may hold a password, and
        # any user on the machine can read a process's arguments.
        self._env = {**os.environ, DATABASE_URL_VARIABLE: database_url}
        self._process: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None

    async def start(self) -> None:
        """Start the process and wait until its worker is connected."""
        await self.spawn()
        await self.wait_ready()

    async def spawn(self) -> None:
        """Start the process (it takes about a second to import and connect)."""
        self._log = tempfile.TemporaryFile(prefix="payments-worker-", suffix=".log")  # noqa: SIM115
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            __name__,
            *self._args,
            env=self._env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=self._log,
        )

    async def wait_ready(self) -> None:
        """Wait until the spawned process's worker is connected; raise if it fails."""
        assert self._process is not None and self._process.stdout is not None
        try:
            line = await asyncio.wait_for(self._process.stdout.readline(), READY_TIMEOUT_S)
        except TimeoutError:
            line = b""
        if line.strip() != b"ready":
            tail = self.output_tail()
            await self.stop()
            raise RuntimeError(f"the payments worker process did not start: {tail}")

    @property
    def pid(self) -> int | None:
        """The running process's id (None before ``spawn`` and after ``stop``)."""
        return None if self._process is None else self._process.pid

    def check(self) -> None:
        """Raise if the process has exited (its worker died): nothing would charge any more."""
        if self._process is not None and self._process.returncode is not None:
            raise RuntimeError(
                f"the payments worker process exited with code {self._process.returncode}: "
                f"{self.output_tail()}"
            )

    def output_tail(self, max_chars: int = 3000) -> str:
        if self._log is None:
            return "(no output)"
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode("utf-8", errors="replace")[-max_chars:] or "(no output)"

    async def stop(self) -> None:
        """SIGTERM: the worker finishes what it is running and exits; killed after 10 s."""
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="Temporal frontend, HOST:PORT")
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--task-queue", required=True, help="the payments task queue")
    parser.add_argument("--stripe-api-base", required=True, help="localstripe's URL")
    parser.add_argument("--threads", type=int, default=8, help="activity threads")
    parser.add_argument(
        "--throwaway-database",
        action="store_true",
        help="a SQLite database nobody keeps: no fsync per commit",
    )
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace, ready: TextIO) -> None:
    database_url = os.environ.get(DATABASE_URL_VARIABLE)
    if not database_url:
        raise SystemExit(f"set {DATABASE_URL_VARIABLE} to the database the harness uses")
    engine = make_engine(database_url, throwaway=args.throwaway_database)
    stripe = make_stripe_client(
        api_key=LOCALSTRIPE_API_KEY, api_base=args.stripe_api_base, max_network_retries=0
    )
    deps = Dependencies(
        session_factory=make_session_factory(engine),
        # localstripe rejects `description` on PaymentIntents.
        gateway=StripeGateway(stripe, send_description=False),
        clock=ServerTimeClock(),  # only activities run here
    )
    client = await Client.connect(
        args.target, namespace=args.namespace, data_converter=DATA_CONVERTER
    )
    worker = build_payments_worker(
        client,
        deps,
        task_queue=args.task_queue,
        charge_rate_per_s=None,
        activity_threads=args.threads,
        build_id=HARNESS_BUILD_ID,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    running = asyncio.create_task(worker.run())
    print("ready", file=ready, flush=True)
    ready.close()
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({running, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if not running.done():
        await worker.shutdown()
    await running  # raises if the worker failed
    engine.dispose()


def main(argv: list[str] | None = None) -> int:
    # Standard output carries the one "ready" line and nothing else: whatever else writes to
    # it (the SDK core prints its warnings there) goes to stderr, the log, instead, so the
    # parent never reads a warning for "ready" nor blocks this process on a full pipe.
    ready = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    gc.freeze()  # the modules live as long as the process: keep them out of full collections
    asyncio.run(serve(_arguments(argv), ready))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
