"""``billing simulate SCENARIO [--json] [--until DATE]``.

Registered on the ``billing`` app with ``app.command()(simulate)``. Exit codes: 0 done,
2 the scenario is invalid (the message names the field), 1 the simulation could not run.
"""

from __future__ import annotations

import asyncio
import gc
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from billing.simulate.render import print_timeline, render_json
from billing.simulate.scenario import Scenario, ScenarioError, load_scenario, locate
from billing.simulate.timeline import Timeline

#: Horizons at least this long get a progress bar (on a terminal, without --json).
PROGRESS_FROM = timedelta(days=366)


def simulate(
    scenario: Annotated[
        Path,
        typer.Argument(
            metavar="SCENARIO",
            help="The scenario file, YAML or JSON (format: docs/scenarios.md).",
            show_default=False,
        ),
    ],
    json_output: Annotated[
        bool,
        typer.Option("--json", help="Print the timeline as a JSON document instead of tables."),
    ] = False,
    until: Annotated[
        str | None,
        typer.Option(
            "--until",
            metavar="DATE",
            help="Stop at DATE instead of the scenario's horizon (written like the "
            "scenario's instants, e.g. 2033-01-01 or 2033-01-01T00:00:00Z).",
        ),
    ] = None,
) -> None:
    """Run a billing scenario on Temporal's time-skipping test server, with the real
    subscription workflow, localstripe and a throwaway database, and print its timeline:
    invoices, payment attempts, status changes and notices."""
    try:
        parsed = load_scenario(scenario)
        if until is not None:
            parsed = parsed.with_until(until)
    except ScenarioError as error:
        _fail(str(error), code=2)

    try:
        timeline = asyncio.run(_run(parsed, show_progress=not json_output))
    except ScenarioError as error:
        _fail(str(locate(error, scenario)), code=2)
    except RuntimeError as error:  # missing binaries, localstripe, the server, SimulationError
        _fail(f"the simulation could not run: {error}", code=1)

    if json_output:
        typer.echo(render_json(timeline), nl=False)
    else:
        console = Console()
        if not console.is_terminal:
            console = Console(width=max(console.width, 120))
        print_timeline(timeline, console)


async def _run(scenario: Scenario, *, show_progress: bool) -> Timeline:
    from billing.settings import Settings
    from billing.simulate.runner import run_scenario

    # Everything imported so far lives as long as this command: leave it out of the garbage
    # collector's full passes, each of which would otherwise walk every module object
    # (about 0.3 s of ten simulated years, scripts/bench_simulate.py).
    gc.freeze()
    test_server_path = Settings().temporal_test_server_path
    stderr = Console(stderr=True)
    if not (
        show_progress and stderr.is_terminal and scenario.horizon - scenario.start >= PROGRESS_FROM
    ):
        return await run_scenario(scenario, test_server_path=test_server_path)

    total_days = (scenario.horizon - scenario.start) / timedelta(days=1)
    with Progress(
        TextColumn("simulating {task.fields[at]}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=stderr,
        transient=True,
    ) as progress:
        task = progress.add_task("simulate", total=total_days, at=_day(scenario.start))

        def advanced(now: datetime) -> None:
            done = (now - scenario.start) / timedelta(days=1)
            progress.update(task, completed=min(done, total_days), at=_day(now))

        return await run_scenario(scenario, test_server_path=test_server_path, progress=advanced)


def _day(instant: datetime) -> str:
    return instant.strftime("%Y-%m-%d")


def _fail(message: str, *, code: int) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)
