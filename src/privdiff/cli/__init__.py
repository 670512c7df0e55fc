"""The `privdiff` command: wires the subcommands together and turns errors into one line."""

from __future__ import annotations

import os
import sys
import traceback

import typer
from rich.console import Console
from rich.markup import escape

from privdiff.cli import attack, audit, check, demo, epsilon, evaluate, inspect, sample, split, train  # noqa: F401  (each adds its commands)
from privdiff.cli.app import app
from privdiff.errors import FailedOnMainProcess, PrivdiffError

err_console = Console(stderr=True)

DEBUG_ENV = "PRIVDIFF_DEBUG"  # set to 1 for the full traceback of an internal error


def main(argv: list[str] | None = None) -> int:
    """Console entry point: runs the CLI and turns every failure into one line on stderr.

    Returns:
        0 on success; 2 for a `PrivdiffError` (bad input, explained); 1 for anything else
        ("internal error: ...", with the traceback when PRIVDIFF_DEBUG=1); 130 on Ctrl-C;
        click's own code for usage errors.
    """
    try:
        code = app(args=argv, standalone_mode=False)  # click returns typer.Exit's code in this mode
    except PrivdiffError as err:
        _print_process_error(err)
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
        return _internal_error(err)
    return code if isinstance(code, int) else 0


def _print_process_error(err: PrivdiffError) -> None:
    """One line. In a torchrun launch, a refusal the main process decided and printed
    (`FailedOnMainProcess`) is not printed again by the others; their own failures name their rank."""
    rank = os.environ.get("RANK", "0") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "0"
    if rank == "0":
        _print_error("error", _one_line(err))
    elif not isinstance(err, FailedOnMainProcess):
        _print_error(f"error on rank {rank}", _one_line(err))


def _one_line(err: BaseException, limit: int = 500) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _print_error(label: str, text: str) -> None:
    err_console.print(f"[bold red]{label}:[/] {escape(text)}", highlight=False, markup=True, soft_wrap=True)


def _internal_error(err: BaseException) -> int:
    """One line for a failure privdiff did not foresee; the traceback only on request."""
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if debug:
        traceback.print_exception(err, file=sys.stderr)
    hint = "" if debug else f" (set {DEBUG_ENV}=1 for the traceback)"
    _print_error("internal error", f"{type(err).__name__}: {_one_line(err, 300)}{hint}")
    return 1


def run() -> None:
    sys.exit(main())


__all__ = ["app", "main", "run"]
