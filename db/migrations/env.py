"""Alembic environment for the billing database (SQLite and PostgreSQL).

Where the URL comes from, first match wins: an open connection in
``config.attributes["connection"]``, ``config.attributes["url"]`` (db.migrate sets it),
``-x url=...`` on the command line, the ``BILLING_DATABASE_URL`` environment variable,
``sqlalchemy.url`` in alembic.ini.
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection, pool

import db.models  # noqa: F401  (registers every table on Base.metadata)
from db.base import Base
from db.engine import make_engine

URL_ENV_VAR = "BILLING_DATABASE_URL"

config = context.config

# Only the alembic command line configures logging; db.migrate runs inside an application
# whose logging must not be replaced.
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def database_url() -> str:
    url = (
        config.attributes.get("url")
        or context.get_x_argument(as_dictionary=True).get("url")
        or os.environ.get(URL_ENV_VAR)
        or config.get_main_option("sqlalchemy.url")
    )
    if not url:
        raise RuntimeError(
            "no database URL for migrations: pass -x url=..., set "
            f"{URL_ENV_VAR}, or call db.migrate.upgrade(url)"
        )
    return str(url)


def run_offline() -> None:
    """``alembic upgrade --sql``: print the DDL instead of running it."""
    url = database_url()
    context.configure(
        url=url,
        target_metadata=Base.metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=url.startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_on(connection: Connection, *, begins_itself: bool = False) -> None:
    """``begins_itself``: the connection comes from db.engine.make_engine, whose SQLite
    connections emit their own BEGIN, so DDL there really is transactional."""
    is_sqlite = connection.dialect.name == "sqlite"
    # SQLite alters a table by copying it to a new one and dropping the old one (batch mode);
    # with foreign keys enforced, that drop would fail or cascade. The pragma only works
    # outside a transaction, so it is set on the raw connection before BEGIN, and
    # foreign_key_check below refuses to commit a migration that broke a reference.
    toggle_fks = is_sqlite and not connection.in_transaction()
    if toggle_fks:
        connection.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")  # type: ignore[union-attr]
    try:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=is_sqlite,
            compare_type=True,
            # One transaction for the whole upgrade, so a failing revision leaves nothing
            # half-applied (and the foreign key check below runs before the commit).
            transactional_ddl=True if is_sqlite and begins_itself else None,
        )
        with context.begin_transaction():
            context.run_migrations()
            if is_sqlite:
                broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise RuntimeError(f"migration left dangling foreign keys: {broken[:5]}")
    finally:
        if toggle_fks:
            connection.connection.driver_connection.execute("PRAGMA foreign_keys=ON")  # type: ignore[union-attr]


def run_online() -> None:
    given = config.attributes.get("connection")
    if isinstance(given, Connection):
        run_on(given)
        return
    # NullPool: the migration's connection is closed at once, not parked in a pool.
    engine = make_engine(database_url(), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            run_on(connection, begins_itself=True)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
