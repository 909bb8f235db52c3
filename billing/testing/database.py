"""Throwaway, fully migrated databases for tests: a temporary SQLite file, or a fresh
PostgreSQL database that is dropped afterwards."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import sqlite3
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import alembic
import sqlalchemy
from sqlalchemy import create_engine, exc, text
from sqlalchemy.pool import NullPool

from db.engine import normalize_url
from db.migrate import MIGRATIONS_DIR, upgrade

DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"

Backend = Literal["sqlite", "postgres"]


def postgres_available(admin_url: str = DEFAULT_ADMIN_URL, *, timeout_s: int = 2) -> bool:
    """Whether a PostgreSQL server answers at ``admin_url`` within ``timeout_s`` seconds."""
    try:
        engine = create_engine(
            normalize_url(admin_url),
            poolclass=NullPool,
            connect_args={"connect_timeout": timeout_s},
        )
    except ImportError:  # psycopg is an optional dependency (the "postgres" extra)
        return False
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return True
    except exc.DBAPIError:
        return False
    finally:
        engine.dispose()


@contextmanager
def temporary_database(
    backend: Backend,
    *,
    admin_url: str = DEFAULT_ADMIN_URL,
    migrate: bool = True,
    name_prefix: str = "billing_test_",
) -> Iterator[str]:
    """Yield the URL of a new, empty database migrated to head (unless ``migrate=False``).

    PostgreSQL: ``CREATE DATABASE billing_test_<random>`` through ``admin_url``; afterwards
    its remaining connections are terminated and it is dropped, even if the block raised.
    """
    if backend == "sqlite":
        with tempfile.TemporaryDirectory(prefix="billing-test-") as directory:
            path = Path(directory) / "billing.sqlite3"
            url = f"sqlite:///{path}"
            if migrate:
                migrated_sqlite_copy(path)
            yield url
        return
    if backend != "postgres":
        raise ValueError(f"unknown backend {backend!r}; use 'sqlite' or 'postgres'")

    admin = normalize_url(admin_url)
    name = f"{name_prefix}{secrets.token_hex(6)}"
    # CREATE/DROP DATABASE cannot run inside a transaction block.
    admin_engine = create_engine(admin, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with admin_engine.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            url = admin.set(database=name).render_as_string(hide_password=False)
            if migrate:
                upgrade(url)
            yield url
        finally:
            with admin_engine.connect() as connection:
                # A test that leaked a pooled connection must not make DROP DATABASE fail.
                connection.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :name AND pid <> pg_backend_pid()"
                    ),
                    {"name": name},
                )
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    finally:
        admin_engine.dispose()


# ---- SQLite: a migrated template, copied ----------------------------------------------------

#: Where migrated SQLite templates are kept: a folder of this user's, readable by nobody else
#: (a template is copied into every throwaway database, so nobody else may write one).
SQLITE_TEMPLATE_DIR_VARIABLE = "BILLING_SQLITE_TEMPLATE_DIR"


def migrations_digest() -> str:
    """What a migrated SQLite database depends on: every file of the migrations folder (names
    and bytes), and the versions of Alembic, SQLAlchemy and SQLite that ran them."""
    digest = hashlib.sha256()
    for versions in (alembic.__version__, sqlalchemy.__version__, sqlite3.sqlite_version):
        digest.update(versions.encode() + b"\0")
    for path in sorted(MIGRATIONS_DIR.rglob("*.py")):
        digest.update(str(path.relative_to(MIGRATIONS_DIR)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:32]


def sqlite_template_dir() -> Path:
    """``$BILLING_SQLITE_TEMPLATE_DIR``, else ``billing-sqlite-<uid>`` in the temp folder."""
    configured = os.environ.get(SQLITE_TEMPLATE_DIR_VARIABLE)
    if configured:
        return Path(configured)
    return Path(tempfile.gettempdir()) / f"billing-sqlite-{os.getuid()}"


def _private_folder(folder: Path) -> bool:
    """Create ``folder`` (mode 700) if needed; whether it is this user's and nobody else's."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = folder.lstat()
    except OSError:
        return False
    return (
        stat.S_ISDIR(info.st_mode)
        and info.st_uid == os.getuid()
        and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    )


def migrated_sqlite_copy(path: Path) -> None:
    """Make ``path`` a SQLite database migrated to head: a copy of a template migrated once
    per set of migrations (``migrations_digest``), instead of running every revision again
    (19 revisions: 0.3-0.7 s of CPU, a tenth of a ten-year simulation). Where no template can
    be kept (no private folder to keep it in), the migrations run on ``path`` itself.

    A copy is the migrated database byte for byte: the template is written by ``upgrade``
    exactly as ``path`` would be, and only ever read afterwards."""
    folder = sqlite_template_dir()
    if not _private_folder(folder):
        upgrade(f"sqlite:///{path}")
        return
    template = folder / f"migrated-{migrations_digest()}.sqlite3"
    if not template.exists():
        # Migrated beside it, then renamed into place: a concurrent process sees either no
        # template or a whole one (each migrates its own, the last rename wins; both equal).
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            fresh = Path(scratch) / "template.sqlite3"
            upgrade(f"sqlite:///{fresh}")
            _checkpoint(fresh)
            os.replace(fresh, template)
    shutil.copyfile(template, path)


def _checkpoint(path: Path) -> None:
    """Fold the write-ahead log into the file, so the file alone is the database."""
    connection = sqlite3.connect(path)
    try:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        connection.close()
    for leftover in (Path(f"{path}-wal"), Path(f"{path}-shm")):
        if leftover.exists() and leftover.stat().st_size:
            raise RuntimeError(f"{leftover} is not empty after a checkpoint")
