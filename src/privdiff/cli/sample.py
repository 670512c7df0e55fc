"""`privdiff sample`: images from the base model plus an adapter."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from privdiff.cli.app import app
from privdiff.cli.options import device_option, precision_option, runtime_config

console = Console(soft_wrap=True)  # paths must stay copy-pasteable, never wrapped


@app.command()
def sample(
    run_dir: Path = typer.Argument(None, help="A run folder (uses its adapter, base model and captions)."),
    lora: Path = typer.Option(None, help="A LoRA .safetensors file instead of a run folder."),
    pretrained: str = typer.Option(None, help="Local Stable Diffusion folder (default: the run's, or the shipped base)."),
    prompt: list[str] = typer.Option(None, "--prompt", "-p", help="Prompt (repeatable; cycled to --num-images)."),
    num_images: int = typer.Option(16, min=1, help="Images to generate."),
    steps: int = typer.Option(25, min=1, help="Denoising steps."),
    scheduler: str = typer.Option("ddim", help="ddim or ddpm."),
    guidance_scale: float = typer.Option(3.0, min=1.0, help="Classifier-free guidance scale."),
    seed: int = typer.Option(0, help="Sampling seed."),
    out: Path = typer.Option(Path("samples.png"), "--out", "-o", help="PNG grid to write."),
    device: str = device_option(),
    precision: str = precision_option(),
) -> None:
    """Generate a PNG grid with DDIM/DDPM and classifier-free guidance."""
    from privdiff.models.generation import sample_to_file
    from privdiff.runtime import resolve_runtime

    runtime = resolve_runtime(runtime_config(device, precision))

    path = sample_to_file(run_dir=run_dir, lora=lora, pretrained=pretrained, prompts=prompt,
                          num_images=num_images, steps=steps, scheduler=scheduler,
                          guidance_scale=guidance_scale, seed=seed, out=out, device=runtime.device,
                          dtype=runtime.dtype)
    console.print(f"samples: [bold]{path}[/]")
