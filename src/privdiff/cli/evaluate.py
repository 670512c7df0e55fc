"""`privdiff evaluate`, `privdiff report` and `privdiff extractor train`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from privdiff.cli.app import app
from privdiff.cli.options import (
    build_config,
    device_option,
    precision_option,
    runtime_flags,
)

console = Console(soft_wrap=True)  # paths must stay copy-pasteable, never wrapped
extractor_app = typer.Typer(no_args_is_help=True, help="The shipped feature extractors.")
app.add_typer(extractor_app, name="extractor")


@app.command()
def evaluate(
    run_dir: Path = typer.Argument(..., help="A finished run folder."),
    config: Path = typer.Option(None, "--config", "-c", help="YAML evaluation config (defaults if omitted)."),
    num_samples: int = typer.Option(None, help="Generated samples (default 1000)."),
    quick: bool = typer.Option(False, help="Quick mode: 256 samples."),
    features: str = typer.Option(None, help="Feature extractor: digits|glyphs|fill, classifier:DIR, "
                                            "inception:FILE, clip:DIR or torchscript:FILE (local only)."),
    eval_seed: int = typer.Option(None, help="Seed of the generation latents and fixed noises."),
    steps: int = typer.Option(None, help="Sampler steps (default 50)."),
    guidance_scale: float = typer.Option(None, help="Guidance scale (default 3.0)."),
    bootstrap: int = typer.Option(None, help="Bootstrap resamples (default 200)."),
    precision_recall: bool = typer.Option(False, "--precision-recall", help="Also k-NN precision/recall."),
    device: str = device_option(),
    precision: str = precision_option(),
    set_: list[str] = typer.Option(None, "--set", help="Any evaluation config key: key=value (repeatable)."),
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """Utility metrics of a run (FID, KID, accuracy, held-out loss) -> RUN_DIR/metrics.json."""
    from privdiff.evaluation import QUICK, EvalConfig, evaluate_run, record_key

    # a flag left out (None; False for the switches) leaves the config file's value; --num-samples beats --quick
    flags = {**(QUICK if quick else {}), "features": features, "eval_seed": eval_seed, "num_inference_steps": steps,
             "guidance_scale": guidance_scale, "bootstrap": bootstrap, "precision_recall": precision_recall or None, **runtime_flags(device, precision)}
    if num_samples is not None:
        flags["num_samples"] = num_samples
    cfg = build_config(config, flags, set_, kind=EvalConfig)
    result = evaluate_run(run_dir, cfg, show_progress=not quiet)
    for r in result["records"]:
        lo, hi = r["ci"]
        console.print(f"  {record_key(r):<34} {r['value']:.4g}  [{lo:.4g}, {hi:.4g}]", highlight=False)
    console.print(f"metrics: [bold]{Path(run_dir) / 'metrics.json'}[/]")


@app.command()
def report(
    run_dirs: list[Path] = typer.Argument(..., help="Run folders to compare side by side."),
    out: Path = typer.Option(Path("report.html"), "--out", "-o", help="HTML file to write (report.json beside it)."),
) -> None:
    """One self-contained HTML report card comparing runs (plus report.json)."""
    from privdiff.report import write_report

    path = write_report(run_dirs, out)
    console.print(f"report: [bold]{path}[/] (numbers in {path.with_suffix('.json')})")


@extractor_app.command("train")
def extractor_train(
    name: str = typer.Argument(..., help="Which recipe: digits, glyphs or fill."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write (use with --features classifier:DIR)."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Re-train a shipped feature extractor from its recipe (public data, deterministic, CPU)."""
    from privdiff.errors import ConfigError
    from privdiff.recipes.extractors import RECIPES, train_extractor

    if name not in RECIPES:
        raise ConfigError(f"unknown extractor recipe '{name}' (choose {', '.join(RECIPES)})")
    record = train_extractor(RECIPES[name], out, show_progress=not quiet)
    console.print(f"extractor: [bold]{out}[/] validation accuracy {record['validation_accuracy']}")
