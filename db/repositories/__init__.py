"""Repositories: plain functions taking a Session first. Every query is a ``select()``,
``insert()`` or ``update()``; results are billing.records dataclasses (or billing.plans.Plan),
never ORM rows. Nothing here commits: the caller's unit of work does."""
