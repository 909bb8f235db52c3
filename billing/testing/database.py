"""Throwaway, fully migrated databases for tests: a temporary SQLite file, or a fresh
PostgreSQL database that is dropped afterwards."""

from __future__ import annotations

import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from sqlalchemy import create_engine, exc, text
from sqlalchemy.pool import NullPool

from db.engine import normalize_url
from db.migrate import upgrade

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
            url = f"sqlite:///{Path(directory) / 'billing.sqlite3'}"
            if migrate:
                upgrade(url)
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
