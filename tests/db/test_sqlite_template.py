"""Throwaway SQLite databases are copies of one migrated template per set of migrations
(``billing.testing.database.migrated_sqlite_copy``): the same database as running every
revision, without running them for each simulation and test."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

import billing.testing.database as database
from billing.testing.database import SQLITE_TEMPLATE_DIR_VARIABLE, temporary_database
from db.engine import make_engine
from db.migrate import upgrade


def _dump(path: Path) -> dict[str, Any]:
    """Schema, pragmas the file keeps, and every row of every table. A table the migrations
    rebuilt (SQLite's batch mode) lists its constraints in an order that changes from one run
    of the migrations to the next (Alembic keeps them in a set): each statement's lines are
    compared as a set."""
    connection = sqlite3.connect(path)
    try:
        schema = sorted(
            (
                (kind, name, table, sorted((sql or "").replace(",", "\n").splitlines()))
                for kind, name, table, sql in connection.execute(
                    "SELECT type, name, tbl_name, sql FROM sqlite_master"
                )
            ),
            key=repr,
        )
        tables = [name for kind, name, _, _ in schema if kind == "table"]
        return {
            "schema": schema,
            "journal_mode": connection.execute("PRAGMA journal_mode").fetchone(),
            "user_version": connection.execute("PRAGMA user_version").fetchone(),
            "rows": {
                table: sorted(connection.execute(f'SELECT * FROM "{table}"').fetchall(), key=repr)
                for table in tables
            },
        }
    finally:
        connection.close()


@pytest.fixture
def migrations_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Templates kept in a folder of this test's; the URLs the migrations ran on."""
    monkeypatch.setenv(SQLITE_TEMPLATE_DIR_VARIABLE, str(tmp_path / "templates"))
    ran: list[str] = []
    real: Callable[..., None] = database.upgrade

    def counting(url: str, *args: Any) -> None:
        ran.append(url)
        real(url, *args)

    monkeypatch.setattr(database, "upgrade", counting)
    return ran


def test_a_copy_is_the_database_the_migrations_make(
    migrations_run: list[str], tmp_path: Path
) -> None:
    fresh = tmp_path / "fresh.sqlite3"
    upgrade(f"sqlite:///{fresh}")
    with temporary_database("sqlite") as first, temporary_database("sqlite") as url:
        assert len(migrations_run) == 1  # the second is a copy
        copied = Path(url.removeprefix("sqlite:///"))
        assert _dump(copied) == _dump(fresh)
        assert _dump(Path(first.removeprefix("sqlite:///"))) == _dump(fresh)
        # And it is its own file: what one test writes, another does not see.
        engine = make_engine(url)
        with engine.begin() as connection:
            connection.execute(text("UPDATE alembic_version SET version_num = 'changed'"))
        engine.dispose()
        assert _dump(copied) != _dump(fresh)
        assert _dump(Path(first.removeprefix("sqlite:///"))) == _dump(fresh)


def test_the_migrations_run_once_per_set_of_migrations(
    migrations_run: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for _ in range(3):
        with temporary_database("sqlite"):
            pass
    assert len(migrations_run) == 1
    # A changed revision (or Alembic, SQLAlchemy, SQLite) is another set: migrated anew.
    monkeypatch.setattr(database, "migrations_digest", lambda: "another-set-of-migrations")
    for _ in range(2):
        with temporary_database("sqlite"):
            pass
    assert len(migrations_run) == 2


def test_the_digest_follows_the_migrations_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = database.migrations_digest()
    copy = tmp_path / "migrations"
    copy.mkdir()
    for path in database.MIGRATIONS_DIR.rglob("*.py"):
        target = copy / path.relative_to(database.MIGRATIONS_DIR)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    monkeypatch.setattr(database, "MIGRATIONS_DIR", copy)
    assert database.migrations_digest() == before
    revision = next(copy.glob("versions/0001_*.py"))
    revision.write_text(revision.read_text() + "\n# changed\n")
    assert database.migrations_digest() != before


def test_no_template_in_a_folder_others_can_write(
    migrations_run: list[str], tmp_path: Path
) -> None:
    shared = tmp_path / "templates"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    for _ in range(2):
        with temporary_database("sqlite"):
            pass
    assert len(migrations_run) == 2  # each database migrated itself
    assert list(shared.iterdir()) == []
