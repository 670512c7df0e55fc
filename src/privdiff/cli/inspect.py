"""`privdiff inspect FILE.safetensors [--scrub OUT]`: what a LoRA file's header gives away."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from privdiff.cli.app import app

console = Console(soft_wrap=True)
LEAK_EXIT_CODE = 3


@app.command()
def inspect(
    file: Path = typer.Argument(..., help="A LoRA .safetensors file (diffusers, peft or kohya)."),
    json_out: Path = typer.Option(None, "--json", help="Also write the findings as JSON here."),
    scrub: Path = typer.Option(None, "--scrub", help="Write a clean copy here (same tensors, allow-listed header)."),
    drop_config: bool = typer.Option(False, help="With --scrub: drop the LoRA config (lora_adapter_metadata) too."),
) -> None:
    """Report header metadata leaks (captions, tags, dataset paths, seeds, counts...).

    Exit code 3 when the header has high or medium findings (0 when clean, or after a successful --scrub).
    """
    from privdiff.models.inspect import inspect_file, scrub_file
    from privdiff.runs.files import atomic_write_json

    report = inspect_file(file)
    table = Table("severity", "key", "why", "value", title=f"{file}: {report['metadata_keys']} header keys, "
                  f"{report['tensors']} tensors")
    for finding in report["findings"]:
        colour = {"high": "red", "medium": "yellow"}.get(finding["severity"], "")
        table.add_row(f"[{colour}]{finding['severity']}[/]" if colour else finding["severity"], finding["key"],
                      finding["reason"], finding["excerpt"])
    if report["findings"]:
        console.print(table)
    else:
        console.print(f"{file}: no metadata beyond the allow-list (format, LoRA config, privdiff.* DP fields)")
    if scrub is not None:
        from diffusers import StableDiffusionPipeline

        report["scrub"] = scrub_file(file, scrub, drop_config)
        StableDiffusionPipeline.lora_state_dict(str(scrub))  # the clean copy must still load as a LoRA
        console.print(f"clean copy: [bold]{scrub}[/] (removed {len(report['scrub']['removed'])} keys, "
                      f"kept {', '.join(report['scrub']['kept']) or 'none'})")
    if json_out is not None:
        atomic_write_json(json_out, report)
    if report["leaks"] and scrub is None:
        raise typer.Exit(LEAK_EXIT_CODE)


__all__ = ["inspect"]
