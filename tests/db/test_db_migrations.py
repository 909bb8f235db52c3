"""Alembic revisions build exactly the schema the models declare, on SQLite and PostgreSQL,
and run in both directions."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, text
from sqlalchemy.exc import IntegrityError

from billing.testing.database import temporary_database
from db.base import Base
from db.engine import make_engine, make_session_factory, unit_of_work
from db.migrate import (
    MIGRATIONS_DIR,
    alembic_config,
    current_revision,
    downgrade,
    head_revision,
    upgrade,
)
from db.repositories import customers, subscriptions

REPO_ROOT = Path(__file__).resolve().parents[2]


def schema_diffs(url: str) -> list[Any]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection, opts={"compare_type": True, "compare_server_default": True}
            )
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def table_names(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade_round_trip(backend: str, admin_url: str) -> None:
    with temporary_database(backend, admin_url=admin_url, migrate=False) as url:
        assert current_revision(url) is None

        upgrade(url)
        assert current_revision(url) == head_revision()
        assert set(Base.metadata.tables) <= table_names(url)

        downgrade(url, "base")
        assert current_revision(url) is None
        assert table_names(url) == {"alembic_version"}

        upgrade(url)
        assert current_revision(url) == head_revision()
        assert schema_diffs(url) == []


def test_migrated_schema_equals_the_models(database_url: str) -> None:
    assert schema_diffs(database_url) == []


def reflect_constraints(engine: Engine) -> dict[str, Any]:
    """What alembic's compare does not look at: CHECK constraints (name and SQL as the
    server normalises it), plus names of unique constraints, foreign keys and indexes."""
    inspector = inspect(engine)
    found: dict[str, Any] = {}
    for table in sorted(Base.metadata.tables):
        found[table] = {
            "checks": sorted(
                (c["name"], c["sqltext"]) for c in inspector.get_check_constraints(table)
            ),
            "uniques": sorted(
                (c["name"], tuple(c["column_names"]))
                for c in inspector.get_unique_constraints(table)
            ),
            "fks": sorted(
                (c["name"], tuple(c["constrained_columns"]), c["referred_table"])
                for c in inspector.get_foreign_keys(table)
            ),
            "indexes": sorted(
                (i["name"], tuple(i["column_names"]), bool(i["unique"]))
                for i in inspector.get_indexes(table)
                # PostgreSQL also lists the indexes behind unique constraints; SQLite does not.
                if not i.get("duplicates_constraint")
            ),
            "pk": inspector.get_pk_constraint(table)["name"],
        }
    return found


def test_migration_creates_the_same_constraints_as_the_models(
    backend: str, admin_url: str, database_url: str
) -> None:
    with temporary_database(backend, admin_url=admin_url, migrate=False) as model_url:
        model_engine = make_engine(model_url)
        migrated_engine = make_engine(database_url)
        try:
            Base.metadata.create_all(model_engine)
            expected = reflect_constraints(model_engine)
            actual = reflect_constraints(migrated_engine)
        finally:
            model_engine.dispose()
            migrated_engine.dispose()
    assert actual == expected
    # And the names follow the convention, so later revisions can address them.
    invoices = actual["invoices"]
    # One renewal per period (a partial unique index: change invoices are keyed by change).
    assert ("uq_invoices_renewal_period", ("subscription_id", "period_start"), True) in (
        invoices["indexes"]
    )
    assert ("uq_invoices_change_id", ("change_id",)) in invoices["uniques"]
    assert {name for name, _ in invoices["checks"]} == {
        "ck_invoices_amount_due_nonnegative",
        "ck_invoices_amount_paid_within_due",
        "ck_invoices_credit_applied_within_subtotal",
        "ck_invoices_status",
    }
    assert ("uq_payments_invoice_id", ("invoice_id",)) in actual["payments"]["uniques"]
    assert actual["customers"]["pk"] == "pk_customers"


def test_upgrade_works_from_any_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An installed service runs from wherever it is started, with no alembic.ini in sight.
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'elsewhere.sqlite3'}"
    upgrade(url)
    assert current_revision(url) == head_revision()
    assert schema_diffs(url) == []


def test_package_data_ships_every_migration_file() -> None:
    """setuptools only installs what ``[tool.setuptools.package-data]`` matches; a revision
    left out would be silently missing from an installed package."""
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["db"]
    package_dir = MIGRATIONS_DIR.parent
    shipped = {path for pattern in patterns for path in package_dir.glob(pattern)}
    needed = {MIGRATIONS_DIR / "env.py", *(MIGRATIONS_DIR / "versions").glob("*.py")}
    assert len(needed) >= 2
    assert needed <= shipped, sorted(str(p) for p in needed - shipped)


#: A later revision of the kind SQLite can only do by copying the table: rebuild `customers`,
#: which subscriptions and invoices reference.
REBUILD_CUSTOMERS = """
import sqlalchemy as sa
from alembic import op

revision = "0099"
down_revision = "{base}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("customers", recreate="always") as batch:
        batch.add_column(sa.Column("nickname", sa.String(50), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("customers", recreate="always") as batch:
        batch.drop_column("nickname")
"""


def test_sqlite_batch_migration_can_rebuild_a_referenced_table(
    tmp_path: Path, factory: Any
) -> None:
    """Rebuilding a table drops the old copy; with foreign keys enforced that drop fails
    while other rows point at it. env.py switches enforcement off around the migration and
    runs PRAGMA foreign_key_check before committing."""
    scripts = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, scripts, ignore=shutil.ignore_patterns("__pycache__"))
    # On top of the current head: the repositories below write every column of today's tables.
    base = head_revision()
    assert base is not None
    (scripts / "versions" / "0099_rebuild_customers.py").write_text(
        REBUILD_CUSTOMERS.replace("{base}", base)
    )
    url = f"sqlite:///{tmp_path / 'billing.sqlite3'}"
    config = alembic_config(url)
    config.set_main_option("script_location", str(scripts))

    command.upgrade(config, base)
    engine = make_engine(url)
    session_factory = make_session_factory(engine)
    with unit_of_work(session_factory) as session:
        subscription = factory.subscription(session)

    command.upgrade(config, "0099")
    command.downgrade(config, base)

    with unit_of_work(session_factory) as session:
        assert subscriptions.get_subscription(session, subscription.id) == subscription
        assert customers.get_customer(session, subscription.customer_id) is not None
        assert session.connection().exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    # The rebuilt table is still referenced and enforcement is back on.
    with pytest.raises(IntegrityError), unit_of_work(session_factory) as session:
        session.execute(text("UPDATE subscriptions SET customer_id = 'cus_missing'"))
    engine.dispose()


def test_a_superseded_renewal_frees_its_period_and_blocks_the_downgrade_below_0022(
    backend: str, admin_url: str, factory: Any
) -> None:
    """0022: one live renewal per period; a voided one no longer holds it. Going back to
    0021's index would make two renewals of one period collide, so the downgrade refuses and
    says which, leaving the schema at 0022."""
    from datetime import UTC, datetime

    from billing.ids import invoice_id_for
    from billing.invoices import InvoiceStatus
    from db.repositories import invoices

    with temporary_database(backend, admin_url=admin_url, migrate=False) as url:
        upgrade(url)
        engine = make_engine(url)
        session_factory = make_session_factory(engine)
        try:
            with unit_of_work(session_factory) as session:
                subscription = factory.subscription(session)
                first = factory.invoice(session, subscription)
                # While it is live, a second renewal of the period is the same invoice.
                again, created = invoices.issue_invoice(
                    session, factory.invoice_record(subscription, id="in_other")
                )
                assert (again.id, created) == (first.id, False)
                invoices.transition_invoice(
                    session, first.id, to=InvoiceStatus.VOID, at=datetime.now(UTC)
                )
                second = factory.invoice(
                    session,
                    subscription,
                    id=invoice_id_for(subscription.id, first.period_start, 1),
                )
            with unit_of_work(session_factory) as session:
                assert (
                    invoices.get_invoice_for_period(session, subscription.id, first.period_start)
                    == second
                )
        finally:
            engine.dispose()

        with pytest.raises(RuntimeError, match="superseded renewal beside the live one"):
            downgrade(url, "0021")
        assert current_revision(url) == head_revision()
