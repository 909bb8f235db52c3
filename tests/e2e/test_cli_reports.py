"""``billing reports ...`` as a user runs it: a subprocess on a database holding the
hand-worked book (tests/finance_book.py), on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
import subprocess
from collections.abc import Iterator

import pytest

from billing.testing.database import temporary_database
from db.engine import make_engine, make_session_factory
from tests import finance_book as book
from tests.conftest import BOTH_BACKENDS, POSTGRES_ADMIN_URL, require_postgres
from tests.e2e.test_cli_start_up import BILLING, environment, free_port


@pytest.fixture
def env(backend: str) -> Iterator[dict[str, str]]:
    if backend == "postgres":
        require_postgres()
    with temporary_database(backend, admin_url=POSTGRES_ADMIN_URL) as url:  # type: ignore[arg-type]
        engine = make_engine(url)
        book.write_book(make_session_factory(engine))
        engine.dispose()
        yield environment(f"127.0.0.1:{free_port()}", url)


def run(env: dict[str, str], *args: str | bytes) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BILLING.encode(), *(a if isinstance(a, bytes) else a.encode() for a in args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@BOTH_BACKENDS
def test_every_report_as_csv(env: dict[str, str]) -> None:
    done = run(env, "reports", "mrr", "--from", "2026-01", "--to", "2026-04", "--csv")
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    got = {
        (r["month"], r["currency"]): tuple(
            int(r[c])
            for c in (
                "opening_mrr_minor",
                "new_minor",
                "expansion_minor",
                "contraction_minor",
                "churned_minor",
                "reactivated_minor",
                "closing_mrr_minor",
            )
        )
        for r in rows
    }
    assert got == book.MRR

    aging = run(env, "reports", "ar-aging", "--as-of", "2026-04-30T00:00:00Z", "--csv")
    assert {
        (r["currency"], r["bucket"]): (int(r["invoices"]), int(r["outstanding_minor"]))
        for r in csv.DictReader(io.StringIO(aging.stdout))
    } == book.AGING

    dunning = run(env, "reports", "dunning", "--from", "2026-01", "--to", "2026-04", "--csv")
    assert {
        (r["currency"], r["by"], r["key"]): (
            int(r["failed_invoices"]),
            int(r["recovered_invoices"]),
            int(r["recovered_minor"]),
            r["recovery_rate"],
        )
        for r in csv.DictReader(io.StringIO(dunning.stdout))
    } == book.DUNNING

    collections = run(
        env, "reports", "collections", "--from", "2026-01", "--to", "2026-04", "--currency", "eur"
    )
    assert collections.returncode == 0, collections.stderr
    assert "123456" in collections.stdout and "USD" not in collections.stdout
    exported = run(env, "reports", "collections", "--from", "2026-01", "--to", "2026-04", "--csv")
    assert exported.returncode == 0, exported.stderr
    assert {
        (r["month"], r["currency"]): (
            int(r["refunded_minor"]),
            int(r["refunds"]),
            int(r["net_collected_minor"]),
        )
        for r in csv.DictReader(io.StringIO(exported.stdout))
    } == book.REFUNDED


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("mrr", "--from", "2026-13"), "from must be a month as YYYY-MM"),
        (("mrr", "--from", "2026-04", "--to", "2026-01"), "is after to"),
        (("mrr", "--currency", b"US\xff"), "lone surrogate"),
        (("collections", "--from", "x" * 10_000), "at most 64"),
        (("ar-aging", "--as-of", "yesterday"), "as_of must be an ISO 8601 instant"),
        (("dunning", "--currency", "💶"), "currency"),
    ],
)
def test_bad_arguments_are_refused_with_a_message(
    env: dict[str, str], args: tuple[str | bytes, ...], words: str
) -> None:
    done = run(env, "reports", *args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert words in " ".join(done.stderr.split()), done.stderr
    assert "Traceback" not in done.stderr
