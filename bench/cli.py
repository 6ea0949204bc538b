"""The `attnbench` command line: thin Typer commands that hand over to one function each.

Heavy imports (torch, triton, seaborn) happen inside the commands, so `--help` is instant.
Bad input raises attnbench.errors.InputError (or UnknownNameError) and becomes one line, exit 2.
"""

from __future__ import annotations

import sys

import typer

from attnbench.errors import USER_ERRORS

app = typer.Typer(
    name="attnbench",
    help="Benchmark attention mechanisms: speed, memory and quality, side by side.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def main() -> None:
    """Console entry point: runs the app, turning input errors into one line and exit code 2."""
    try:
        app(standalone_mode=False)
    except USER_ERRORS as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        sys.exit(2)
