"""The `billing simulate` command as the lead registers it (`app.command()(simulate)`), on a
small Typer app, run with Typer's CliRunner (a real invocation: argument parsing, exit code,
stdout and stderr)."""

from __future__ import annotations

from pathlib import Path

import typer
from typer.testing import CliRunner, Result

from billing.simulate.command import simulate

app = typer.Typer()


@app.callback()
def billing() -> None:
    """billing (for tests): subcommands as in the real CLI."""


app.command()(simulate)

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"


def run_cli(*args: str | Path) -> Result:
    return CliRunner().invoke(app, ["simulate", *(str(a) for a in args)])
