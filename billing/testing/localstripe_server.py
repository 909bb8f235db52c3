"""Start localstripe with its store kept in memory only: ``python -m
billing.testing.localstripe_server --port PORT`` (``LocalStripe(persist=False)`` runs this).

localstripe 1.15 pickles its *whole* store to ``/tmp/localstripe.pickle`` after every object
it writes. Each write therefore costs time in proportion to everything stored so far, and a
run's cost grows with the square of its charges: in a year of 100 subscriptions (3,600
requests) that re-pickling was about 49 s of localstripe's CPU, and half the simulation's
wall time. A throwaway server (tests, simulations, benchmarks, always ``--from-scratch``)
never reads that file back, so here the store is not written at all. Everything else is
localstripe's own server, unchanged: the requests, objects and answers are the same.

The local stack (``billing dev``) keeps localstripe's persistence, to resume across restarts.
"""

from __future__ import annotations

import sys


def main() -> int:
    from localstripe import resources  # only in the server process
    import billing.testing.localstripe_conformance  # noqa: F401  # isort: skip  (patches first)
    from localstripe.server import start

    if "--from-scratch" not in sys.argv[1:]:
        # Reading a saved store but never writing it back would lose what this run adds.
        sys.argv.append("--from-scratch")
    # The store is a dict subclass whose __setitem__/__delitem__ call dump_to_disk.
    resources.Store.dump_to_disk = lambda self: None
    start()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
