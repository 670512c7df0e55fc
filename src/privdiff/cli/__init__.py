"""The `privdiff` command: wires the subcommands together and turns errors into one line."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from privdiff import __version__
from privdiff.errors import PrivdiffError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Private fine-tuning of diffusion models, and the attacks that measure what leaks.")
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        print(f"privdiff {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """privdiff: train with privacy, then measure what still leaks."""


def _register() -> None:
    from privdiff.cli import attack, audit, demo, evaluate, inspect, sample, split, train  # noqa: F401  (each module adds its commands)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: runs the CLI; PrivdiffError -> 'error: ...' on stderr and exit 2."""
    _register()
    try:
        code = app(args=argv, standalone_mode=False)  # click returns typer.Exit's code in this mode
    except PrivdiffError as err:
        err_console.print(f"[bold red]error:[/] {err}", highlight=False, markup=True, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted (a run can be continued with --resume)")
        return 130
    except typer.Exit as exit_:
        return exit_.exit_code
    except typer.Abort:
        return 1
    except Exception as err:  # click usage errors arrive as ClickException in standalone_mode=False
        import click

        if isinstance(err, click.ClickException):
            err.show()
            return err.exit_code
        raise
    return code if isinstance(code, int) else 0


def run() -> None:
    sys.exit(main())


__all__ = ["app", "main", "run"]
