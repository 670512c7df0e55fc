"""The typer application every command module adds itself to (imported by them, never the reverse)."""

from __future__ import annotations

import typer

from privdiff import __version__

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Private fine-tuning of diffusion models, and the attacks that measure what leaks.")


def _version(value: bool) -> None:
    if value:
        print(f"privdiff {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """privdiff: train with privacy, then measure what still leaks."""


__all__ = ["app"]
