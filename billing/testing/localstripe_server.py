"""Start localstripe with its store in memory or in a file of our choosing:
``python -m billing.testing.localstripe_server --port PORT [--store PATH]``.

localstripe 1.15 pickles its *whole* store to the fixed path ``/tmp/localstripe.pickle``
after every object it writes, and reloads that file at start-up. Every localstripe on the
machine shares it, so one clobbers another's (a restart of ``billing dev`` came back with no
customers), and each write costs time in proportion to everything stored so far: in a year of
100 subscriptions (3,600 requests) that re-pickling was about 49 s of localstripe's CPU. Here
that file is never read or written:

* without ``--store`` (tests, simulations, benchmarks) the store stays in memory;
* with ``--store PATH`` (``billing dev``: its state folder) it is loaded from ``PATH`` at
  start and written back after every write, atomically (a temporary file beside it, fsync,
  rename), so a crash mid-write leaves the previous store, never half of one.

With ``--log-arrivals`` (benchmarks) every request also logs one line when it arrived, to the
microsecond (``ARRIVED <unix seconds> <method> <path> <status>``): localstripe's access log
has whole seconds only, too coarse to check a cap in every sliding one-second window.

Everything else is localstripe's own server, unchanged: the requests, objects and answers
(``billing.testing.localstripe_index`` makes its listings of one kind read only that kind,
with the same answers).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def save_store(store: dict[str, Any], path: Path) -> None:
    """Write ``store`` to ``path`` atomically: readers see the old file or the new one."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            # A plain dict: the store's class writes itself to disk on every change.
            pickle.dump(dict(store), out, protocol=pickle.HIGHEST_PROTOCOL)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    # The rename itself survives a power cut only once the folder is synced.
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load_store(path: Path) -> dict[str, Any]:
    """The store saved at ``path`` (empty if there is none yet). The file is our own, written
    by ``save_store`` in the state folder; it is never taken from elsewhere."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    try:
        loaded = pickle.loads(data)  # our own file, see above
    except Exception as error:
        raise SystemExit(
            f"localstripe's saved store {path} cannot be read ({type(error).__name__}: "
            f"{error}); move it aside to start the fake Stripe empty (customers and cards "
            "made before are then gone from it)"
        ) from error
    if not isinstance(loaded, dict):
        raise SystemExit(
            f"localstripe's saved store {path} holds a {type(loaded).__name__}, not a store; "
            "move it aside to start the fake Stripe empty"
        )
    return loaded


def parse_args(argv: Sequence[str]) -> tuple[Path | None, list[str]]:
    """Our ``--store PATH``, and the arguments left for localstripe's own parser."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--store", type=Path, default=None)
    ours, theirs = parser.parse_known_args(argv)
    store: Path | None = ours.store
    return (None if store is None else store.resolve()), theirs


#: Prefix of the lines ``--log-arrivals`` writes.
ARRIVAL_PREFIX = "ARRIVED "


def log_arrivals(app: Any) -> None:
    """Make ``app`` log each request's arrival instant (see the module doc), on stderr."""
    import time

    from aiohttp import web

    @web.middleware
    async def arrival(request: Any, handler: Any) -> Any:
        arrived = time.time()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as error:
            status = error.status
            raise
        finally:
            print(
                f"{ARRIVAL_PREFIX}{arrived:.6f} {request.method} {request.path} {status}",
                file=sys.stderr,
                flush=True,
            )

    app.middlewares.insert(0, arrival)  # outermost: the arrival before any other work


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    arrivals = "--log-arrivals" in args
    store_path, rest = parse_args([a for a in args if a != "--log-arrivals"])
    from localstripe import resources  # only in the server process
    import billing.testing.localstripe_conformance  # isort: skip  (patches first)
    import billing.testing.localstripe_index  # isort: skip  (patches first)
    import billing.testing.localstripe_settlement  # noqa: F401  # isort: skip  (patches first)
    from localstripe.server import app, start

    if arrivals:
        log_arrivals(app)

    if store_path is None:
        # The store is a dict subclass whose __setitem__/__delitem__ call dump_to_disk.
        resources.Store.dump_to_disk = lambda self: None
    else:
        store_path.parent.mkdir(parents=True, exist_ok=True)
        resources.store.update(load_store(store_path))
        resources.Store.dump_to_disk = lambda self: save_store(self, store_path)
    # Never read the shared /tmp file: the store above is the whole of it.
    sys.argv = [sys.argv[0], *rest, *([] if "--from-scratch" in rest else ["--from-scratch"])]
    start()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
