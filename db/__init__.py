"""The database layer: SQLAlchemy models, repositories returning billing.records dataclasses,
engine and unit-of-work setup, and Alembic migrations (SQLite and PostgreSQL)."""
