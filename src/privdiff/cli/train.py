"""`privdiff pretrain` and `privdiff finetune`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from privdiff.cli.app import app
from privdiff.cli.options import (
    build_config,
    device_option,
    precision_option,
    runtime_config,
    runtime_flags,
)

console = Console(soft_wrap=True)  # paths must stay copy-pasteable, never wrapped


@app.command()
def finetune(
    config: Path = typer.Option(None, "--config", "-c", help="YAML run config (defaults if omitted)."),
    method: str = typer.Option(None, help="Training method: lora | dp-lora | smp-lora | mp-lora."),
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
    target_epsilon: float = typer.Option(None, help="dp-lora: epsilon to calibrate the noise to (default 8)."),
    delta: float = typer.Option(None, help="dp-lora: delta (default min(1e-5, 0.1/N); must be < 1/N)."),
    noise_multiplier: float = typer.Option(None, help="dp-lora: fixed noise multiplier instead of a target epsilon."),
    max_grad_norm: float = typer.Option(None, help="dp-lora: per-example clip norm C (default 1e-3)."),
    noise_multiplicity: int = typer.Option(None, help="dp-lora: K draws averaged inside each example (default 4)."),
    expected_batch_size: int = typer.Option(None, help="dp-lora: expected Poisson batch B (default min(64, N/4))."),
    physical_batch_size: int = typer.Option(None, help="dp-lora: examples per forward/backward chunk (memory)."),
    epochs: float = typer.Option(None, help="dp-lora: epochs, steps = epochs / q (default 50; --steps overrides)."),
    accountant: str = typer.Option(None, help="dp-lora: prv (default) or rdp."),
    smp_lambda: float = typer.Option(None, help="smp-lora/mp-lora: weight λ of the proxy's member CE (default 1)."),
    smp_beta: float = typer.Option(None, help="smp-lora: β in L / (β + λ·CE_m + 1e-5) (default 1)."),
    proxy_lr: float = typer.Option(None, help="smp-lora/mp-lora: proxy Adam learning rate (default 1e-5)."),
    proxy_steps: int = typer.Option(None, help="smp-lora/mp-lora: proxy steps k per LoRA step (default 1)."),
    distributed: bool = typer.Option(False, help="dp-lora under torchrun: data parallel with Opacus DPDDP."),
    device: str = device_option(),
    precision: str = precision_option(),
    no_cache: bool = typer.Option(False, "--no-cache", help="Encode afresh; read and write no encoding cache."),
    set_: list[str] = typer.Option(None, "--set", help="Any config key: section.key=value (repeatable)."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its checkpoint."),
    overwrite: bool = typer.Option(False, help="Replace an existing run folder."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Fine-tune a LoRA on the private split (plainly or with DP-SGD) and write a run folder."""
    from privdiff.distributed import shutdown_distributed
    from privdiff.errors import ConfigError
    from privdiff.training.run import run_training

    if target_epsilon is not None and noise_multiplier is not None:
        raise ConfigError("give --target-epsilon or --noise-multiplier, not both")
    if epochs is not None and steps is not None:
        raise ConfigError("give --epochs or --steps, not both")
    implied = (["dp.target_epsilon=null"] if noise_multiplier is not None else []) + \
              (["dp.epochs=null"] if steps is not None else [])
    cfg = build_config(config, {
        "train.method": method, "data.name": data, "data.num_examples": num_examples,
        "model.pretrained": pretrained, "output_dir": out, "train.steps": steps,
        "train.batch_size": batch_size, "train.learning_rate": learning_rate, "lora.rank": rank,
        "lora.alpha": alpha, "train.seed": seed, "membership.manifest": membership,
        "dp.target_epsilon": target_epsilon, "dp.delta": delta, "dp.noise_multiplier": noise_multiplier,
        "dp.max_grad_norm": max_grad_norm, "dp.noise_multiplicity": noise_multiplicity,
        "dp.expected_batch_size": expected_batch_size, "dp.physical_batch_size": physical_batch_size,
        "dp.epochs": epochs, "dp.accountant": accountant, "smp.lam": smp_lambda, "smp.beta": smp_beta,
        "smp.proxy_lr": proxy_lr, "smp.proxy_steps": proxy_steps, **runtime_flags(device, precision),
        "cache.enabled": False if no_cache else None}, implied + list(set_ or []))
    try:
        run_dir = run_training(cfg, resume=resume, overwrite=overwrite, show_progress=not quiet,
                               distributed=distributed)
    finally:
        shutdown_distributed()
    if run_dir is None:
        return  # a non-main process of a distributed run
    console.print(f"run folder: [bold]{run_dir}[/]")
    _print_privacy(run_dir)


def _print_privacy(run_dir: Path) -> None:
    import json

    privacy = json.loads((Path(run_dir) / "summary.json").read_text()).get("privacy") or {}
    if privacy:
        eps = privacy["epsilon"]
        console.print(f"privacy: ({'inf' if eps is None else f'{eps:.3f}'}, {privacy['delta']:.3g})-DP "
                      f"({privacy['accountant'].upper()}; PLD {privacy['epsilon_pld']}) with sigma "
                      f"{privacy['noise_multiplier']}, q {privacy['sample_rate']:.4g}, {privacy['steps']} steps, "
                      f"C {privacy['max_grad_norm']}, K {privacy['noise_multiplicity']}")
        if privacy.get("accountant_note"):
            console.print(f"accountant: {privacy['accountant_note']}")


@app.command()
def pretrain(
    out: Path = typer.Option(Path("runs/pretrain/tiny-sd-glyphs"), "--out", "-o",
                             help="Folder for the pre-trained pipeline (save_pretrained layout)."),
    config: Path = typer.Option(None, "--config", "-c",
                                help="YAML of recipe keys, e.g. vae_steps: 100 (the shipped recipe if omitted)."),
    num_glyphs: int = typer.Option(None, help="Override the recipe: glyph images."),
    vae_steps: int = typer.Option(None, help="Override the recipe: VAE steps."),
    unet_steps: int = typer.Option(None, help="Override the recipe: UNet steps."),
    seed: int = typer.Option(None, help="Override the recipe: seed."),
    device: str = device_option(),
    set_: list[str] = typer.Option(None, "--set", help="Any recipe key: key=value (repeatable)."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Pre-train the tiny base model on public glyphs (the shipped base's recipe by default)."""
    from privdiff.recipes.glyph_base import PretrainConfig
    from privdiff.recipes.glyph_base import pretrain as run_pretrain
    from privdiff.runtime import resolve_device

    cfg = build_config(config, {"num_glyphs": num_glyphs, "vae_steps": vae_steps, "unet_steps": unet_steps,
                                "seed": seed}, set_, kind=PretrainConfig)
    summary = run_pretrain(out, cfg, show_progress=not quiet, device=resolve_device(device or "auto"))
    console.print(f"base model: [bold]{out}[/]  (UNet loss {summary['unet_loss']:.4f}, "
                  f"VAE reconstruction {summary['vae_reconstruction_loss']:.4f})")


@app.command("early-stop")
def early_stop(
    run: Path = typer.Argument(..., help="A finished run with snapshots (e.g. plain LoRA, train.snapshots=8)."),
    match: Path = typer.Option(..., "--match", help="The run whose utility to match (e.g. an SMP-LoRA run)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder to write the matched snapshot to."),
    overwrite: bool = typer.Option(False, help="Replace an existing folder."),
    device: str = device_option(),
    precision: str = precision_option(),
    no_cache: bool = typer.Option(False, "--no-cache", help="Encode afresh; read and write no encoding cache."),
) -> None:
    """Stop RUN early at MATCH's utility: the snapshot whose held-out loss on the aux non-members is closest."""
    import json

    from privdiff.runtime import resolve_runtime
    from privdiff.training.early_stop import early_stop_like

    runtime = resolve_runtime(runtime_config(device, precision))
    folder = early_stop_like(run, match, out, overwrite=overwrite, runtime=runtime, cache=not no_cache)
    chosen = json.loads((folder / "summary.json").read_text())["early_stopped"]
    console.print(f"step {chosen['step']} of {chosen['of_steps']}: held-out loss {chosen['loss']:.4f} "
                  f"(target {chosen['target_loss']:.4f})")
    console.print(f"run folder: [bold]{folder}[/]")
