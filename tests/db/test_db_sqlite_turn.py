"""SQLite transactions queue for their turn (``db.engine._TransactionTurn``) instead of polling
in SQLite's busy handler, where a waiter could be passed over until the busy timeout (5 s) and
fail with "database is locked": with two worker processes of many threads each (a simulation's
billing and payments workers) that happened to several transactions a minute."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from sqlalchemy import text

from db.engine import make_engine, make_session_factory, unit_of_work

REPO_ROOT = Path(__file__).resolve().parents[2]
THREADS = 8
TRANSACTIONS = 25
#: Each transaction holds the write lock this long (seconds): a few activities' writes.
HOLD_S = 0.02

#: One process: THREADS threads, each TRANSACTIONS write transactions on the database at argv[1];
#: every fifth one of a thread raises after its insert (rolled back: its turn must come back).
#: Prints the rows it committed, then the errors it met.
WRITER = textwrap.dedent(
    f"""
    import sys, threading, time
    from sqlalchemy import text
    from db.engine import make_engine, make_session_factory, unit_of_work

    factory = make_session_factory(make_engine(sys.argv[1]))
    errors, committed = [], []

    class Abort(Exception):
        pass

    def write(thread):
        for n in range({TRANSACTIONS}):
            try:
                with unit_of_work(factory) as session:
                    session.execute(text("INSERT INTO t (who) VALUES (:who)"), {{"who": thread}})
                    time.sleep({HOLD_S})
                    if n % 5 == 4:
                        raise Abort()
                committed.append(1)
            except Abort:
                pass
            except Exception as error:
                errors.append(str(error).splitlines()[0])

    threads = [threading.Thread(target=write, args=(i,)) for i in range({THREADS})]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(len(committed))
    print(errors)
    """
)


def test_two_processes_of_many_threads_never_see_database_is_locked(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'billing.sqlite3'}"
    engine = make_engine(url)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, who INTEGER)"))
    engine.dispose()

    env = {"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"}
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO_ROOT,
        )
        for _ in range(2)
    ]
    outputs = [w.communicate(timeout=300) for w in writers]
    for writer, (_, stderr) in zip(writers, outputs, strict=True):
        assert writer.returncode == 0, stderr[-2000:]

    kept = TRANSACTIONS - TRANSACTIONS // 5
    for stdout, _ in outputs:
        committed, errors = stdout.strip().splitlines()
        assert errors == "[]", f"transactions failed: {errors}"
        assert int(committed) == THREADS * kept
    factory = make_session_factory(make_engine(url))
    with unit_of_work(factory) as session:
        rows = session.execute(text("SELECT count(*) FROM t")).scalar_one()
    assert rows == 2 * THREADS * kept  # every commit landed, no rolled-back insert did
