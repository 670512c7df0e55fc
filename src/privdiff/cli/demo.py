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
    device: str = device_option(),
    precision: str = precision_option(),
) -> None:
    """Fine-tune a LoRA on the private digits from the shipped base, sample, write runs/demo/."""
    from privdiff.demo import run_demo

    runtime = runtime_config(device, precision)
    result = run_demo(out, steps=steps, show_progress=not quiet, runtime=runtime)
    console.print(result.describe(), soft_wrap=True, highlight=False, markup=False)
