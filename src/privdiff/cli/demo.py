"""`privdiff demo`: the main job on the embedded default."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from privdiff.cli.app import app
from privdiff.cli.options import device_option, precision_option, runtime_config

console = Console(soft_wrap=True)  # paths must stay copy-pasteable, never wrapped


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Where the demo's runs go."),
    steps: int = typer.Option(None, help="Override the fine-tuning steps (quick looks)."),
    quiet: bool = typer.Option(False, help="No progress bars."),
    full: bool = typer.Option(False, "--full", help="Also SMP-LoRA and the plain LoRA stopped early at its "
                              "utility (about 3 minutes more on 2 CPU cores)."),
    device: str = device_option(),
    precision: str = precision_option(),
) -> None:
    """Fine-tune a plain LoRA and a DP-LoRA on the private digits, audit both, write runs/demo/report.html."""
    from privdiff.demo import run_demo

    runtime = runtime_config(device, precision)
    result = run_demo(out, steps=steps, show_progress=not quiet, runtime=runtime, full=full)
    console.print(result.describe(), soft_wrap=True, highlight=False, markup=False)
