"""Run localstripe (a fake, stateful Stripe-protocol server) as a child process for tests and
the local stack. It is never imported: the real ``stripe`` SDK talks to it over HTTP.

Facts about localstripe 1.15 that shape this helper (read from its source):

* it pickles its whole store to the fixed path ``/tmp/localstripe.pickle`` after every write and
  reloads that file at start-up. Every instance on the machine shares that file, so one
  clobbers another's. We therefore always run it through
  ``billing.testing.localstripe_server``, which never touches that file: the store stays in
  memory (``store=None``, the default: tests, simulations) or lives in a file of our own,
  written atomically (``store=PATH``: the local stack, in its state folder);
* it logs every request to stderr, so its output goes to a file, not a pipe nobody reads
  (a full pipe would block the server);
* ``DELETE /_config/data`` empties the store (``flush``).
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO

from billing.settings import find_binary

__all__ = [
    "LOCALSTRIPE_API_KEY",
    "LOCALSTRIPE_STORE",
    "LocalStripe",
    "find_localstripe_executable",
]

#: The API key the test stacks give the Stripe SDK for localstripe (any key works there).
LOCALSTRIPE_API_KEY = "sk_test_localstripe"

#: Where localstripe itself saves its store (fixed in its source), shared by every localstripe
#: run directly on the machine. Ours never read or write it.
LOCALSTRIPE_STORE = Path("/tmp/localstripe.pickle")


def find_localstripe_executable() -> str:
    """The ``localstripe`` script of this interpreter's environment, else the one on PATH."""
    return find_binary("localstripe", None, "localstripe")


def _free_port() -> int:
    # The OS picks a free port; localstripe binds it a moment later. A rare race with another
    # process is handled by retrying the start-up.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LocalStripe:
    """A localstripe process on a free port, as a context manager::

    with LocalStripe() as server:
        client = make_stripe_client(api_key="sk_test_local", api_base=server.url)
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        startup_timeout_seconds: float = 15.0,
        store: Path | None = None,
        log_path: Path | None = None,
        log_arrivals: bool = False,
    ) -> None:
        """``store``: a file to load the store from at start and save it to after every write
        (the local stack resumes with it; each write costs time in proportion to the store);
        None keeps it in memory. ``log_path`` keeps its output in a file instead of a
        temporary one. ``log_arrivals``: each request's arrival instant to the microsecond in
        that log too (``billing.testing.localstripe_server``)."""
        self._log_arrivals = log_arrivals
        self._store = store
        self._log_path = log_path
        self._requested_port = port
        self._startup_timeout_seconds = startup_timeout_seconds
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("localstripe is not running; use LocalStripe as a context manager")
        return self._port

    @property
    def pid(self) -> int:
        """The localstripe process's id (benchmarks read its CPU time)."""
        if self._process is None:
            raise RuntimeError("localstripe is not running; use LocalStripe as a context manager")
        return self._process.pid

    @property
    def url(self) -> str:
        """The API base to give the Stripe client, e.g. ``http://127.0.0.1:54321``."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LocalStripe:
        if self._process is not None:
            return self
        # A port picked by us can be taken before localstripe binds it: try a few times.
        attempts = 1 if self._requested_port is not None else 3
        last_error: RuntimeError | None = None
        for _ in range(attempts):
            port = self._requested_port or _free_port()
            try:
                self._spawn(port)
                self._wait_until_answering()
                return self
            except RuntimeError as error:
                last_error = error
                self.stop()
        assert last_error is not None
        raise last_error

    def _spawn(self, port: int) -> None:
        # Lives as long as the process and is closed in stop(), so no ``with`` block.
        self._log = (
            self._log_path.open("ab+")
            if self._log_path is not None
            else tempfile.TemporaryFile(prefix="localstripe-", suffix=".log")  # noqa: SIM115
        )
        self._port = port
        # localstripe's own server, with the store handled by our wrapper (see the module doc).
        executable = sys.executable
        args = [executable, "-m", "billing.testing.localstripe_server", "--port", str(port)]
        if self._store is not None:
            args += ["--store", str(self._store)]
        if self._log_arrivals:
            args.append("--log-arrivals")
        try:
            self._process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
            )
        except OSError as error:
            raise RuntimeError(
                f"could not start {executable}: {error}; install the PyPI package localstripe"
            ) from error

    def _wait_until_answering(self) -> None:
        deadline = time.monotonic() + self._startup_timeout_seconds
        while True:
            process = self._process
            assert process is not None
            if process.poll() is not None:
                raise RuntimeError(
                    f"localstripe exited with code {process.returncode} before answering on "
                    f"port {self.port}; its output ends with:\n{self.output_tail()}"
                )
            # Still alive after answering: it was localstripe, not another process that took
            # the port first.
            if self._answers_http() and process.poll() is None:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"localstripe did not answer HTTP on {self.url} within "
                    f"{self._startup_timeout_seconds:g}s; its output ends with:\n"
                    f"{self.output_tail()}"
                )
            time.sleep(0.02)

    def _answers_http(self) -> bool:
        # Any HTTP answer counts (an unauthenticated GET gets 401): the server is up.
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
        try:
            connection.request("GET", "/v1/balance")
            connection.getresponse().read()
            return True
        except OSError:
            return False
        finally:
            connection.close()

    def output_tail(self, max_chars: int = 2000) -> str:
        """The end of localstripe's combined stdout/stderr (its access log and tracebacks)."""
        if self._log is None:
            return "(no output captured)"
        self._log.flush()
        self._log.seek(0)
        text = self._log.read().decode("utf-8", errors="replace")
        return text[-max_chars:] or "(no output)"

    def flush(self) -> None:
        """Delete every object localstripe holds (``DELETE /_config/data``)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request("DELETE", "/_config/data")
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        if response.status != 200:
            raise RuntimeError(
                f"localstripe refused to flush its data: HTTP {response.status} {body[:200]!r}"
            )

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None
        self._port = None

    def __enter__(self) -> LocalStripe:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
