"""`privdiff pretrain` and `privdiff finetune`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from privdiff.cli import app
from privdiff.cli.options import build_config

console = Console(soft_wrap=True)  # paths must stay copy-pasteable, never wrapped


@app.command()
def finetune(
    config: Path = typer.Option(None, "--config", "-c", help="YAML run config (defaults if omitted)."),
    method: str = typer.Option(None, help="Training method: lora (more arrive with later methods)."),
    data: str = typer.Option(None, help="Built-in dataset (digits, faces, glyphs, fill) or imagefolder path."),
    num_examples: int = typer.Option(None, help="Seeded subset size of the private dataset."),
    pretrained: str = typer.Option(None, help="Local Stable Diffusion folder (default: shipped tiny base)."),
    out: str = typer.Option(None, "--out", "-o", help="Run folder to write."),
    steps: int = typer.Option(None, help="Optimisation steps."),
    batch_size: int = typer.Option(None, help="Examples per step."),
    learning_rate: float = typer.Option(None, "--lr", help="Learning rate."),
    rank: int = typer.Option(None, help="LoRA rank."),
    alpha: float = typer.Option(None, help="LoRA alpha (scale = alpha / rank)."),
    seed: int = typer.Option(None, help="Training seed."),
    membership: str = typer.Option(None, help="Reuse this membership.json (paired comparisons)."),
    set_: list[str] = typer.Option(None, "--set", help="Any config key: section.key=value (repeatable)."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its checkpoint."),
    overwrite: bool = typer.Option(False, help="Replace an existing run folder."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Fine-tune a LoRA on the private split and write a run folder."""
    from privdiff.training.run import run_training

    cfg = build_config(config, {
        "train.method": method, "data.name": data, "data.num_examples": num_examples,
        "model.pretrained": pretrained, "output_dir": out, "train.steps": steps,
        "train.batch_size": batch_size, "train.learning_rate": learning_rate, "lora.rank": rank,
        "lora.alpha": alpha, "train.seed": seed, "membership.manifest": membership}, set_)
    run_dir = run_training(cfg, resume=resume, overwrite=overwrite, show_progress=not quiet)
    console.print(f"run folder: [bold]{run_dir}[/]")


@app.command()
def pretrain(
    out: Path = typer.Option(Path("runs/pretrain/tiny-sd-glyphs"), "--out", "-o",
                             help="Folder for the pre-trained pipeline (save_pretrained layout)."),
    num_glyphs: int = typer.Option(None, help="Override the recipe: glyph images."),
    vae_steps: int = typer.Option(None, help="Override the recipe: VAE steps."),
    unet_steps: int = typer.Option(None, help="Override the recipe: UNet steps."),
    seed: int = typer.Option(None, help="Override the recipe: seed."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Pre-train the tiny base model on public glyphs (the shipped base's recipe by default)."""
    import dataclasses

    from privdiff.errors import ConfigError
    from privdiff.training.pretrain import PretrainConfig, pretrain as run_pretrain

    changes = {k: v for k, v in {"num_glyphs": num_glyphs, "vae_steps": vae_steps,
                                 "unet_steps": unet_steps, "seed": seed}.items() if v is not None}
    if any(v < 1 for k, v in changes.items() if k != "seed"):
        raise ConfigError("num-glyphs, vae-steps and unet-steps must be >= 1")
    summary = run_pretrain(out, dataclasses.replace(PretrainConfig(), **changes), show_progress=not quiet)
    console.print(f"base model: [bold]{out}[/]  (UNet loss {summary['unet_loss']:.4f}, "
                  f"VAE reconstruction {summary['vae_reconstruction_loss']:.4f})")
