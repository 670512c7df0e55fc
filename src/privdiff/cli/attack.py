"""`privdiff attack weights`: what a shared LoRA file reveals about the identity it was trained on."""

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

console = Console(soft_wrap=True)
attack_app = typer.Typer(no_args_is_help=True, help="Attacks on shared artefacts (see also `privdiff audit`).")
app.add_typer(attack_app, name="attack")


@attack_app.command()
def weights(
    config: Path = typer.Option(None, "--config", "-c", help="YAML weights-attack config (defaults if omitted)."),
    out: str = typer.Option(None, "--out", "-o", help="Run folder (default runs/weights-attack)."),
    victims: int = typer.Option(None, help="Held-out victim identities attacked (default 24)."),
    budget: int = typer.Option(None, help="Shadow fine-tune steps for training the encoder (training.budget_steps)."),
    defence: list[str] = typer.Option(None, "--defence", help="NAME=KNOB[,KNOB...]: weight-noise, prune, rank or dp "
                                                              "(repeatable), e.g. --defence prune=0.9,0.99"),
    adaptive: bool = typer.Option(None, help="Also attack each post-hoc defence with an encoder re-trained on defended shadows."),
    device: str = device_option(),
    precision: str = precision_option(),
    set_: list[str] = typer.Option(None, "--set", help="Any config key: section.key=value (repeatable)."),
    overwrite: bool = typer.Option(False, help="Replace an existing attack.json."),
    quiet: bool = typer.Option(False, help="No progress bars."),
    adapter: Path = typer.Option(None, help="Attack this one LoRA file instead (with the shipped encoder for the "
                                            "face base, or --encoder)."),
    encoder: Path = typer.Option(None, help="With --adapter: the encoder folder of an earlier run (RUN/encoder) "
                                            "instead of the shipped one."),
    private: Path = typer.Option(None, help="With --adapter: an image folder of the identity, to score the images."),
) -> None:
    """Train the weights-to-image encoder on shadow fine-tunes and attack held-out victims' LoRA files.

    With --adapter: attack one file with an already trained encoder (what would sharing it show?);
    the shipped encoder fits files fine-tuned from the shipped face base, --encoder takes another."""
    from privdiff.errors import ConfigError
    from privdiff.runtime import require_cpu_fp32, resolve_runtime
    from privdiff.weights.config import WeightsAttackConfig
    from privdiff.metrics.estimate import format_estimate
    from privdiff.weights.run import attack_adapter, run_weights_attack

    if encoder is not None and adapter is None:
        raise ConfigError("--encoder goes with --adapter (the file to attack)")
    require_cpu_fp32(resolve_runtime(runtime_config(device, precision)),
                     "the weights attack")
    if adapter is not None:
        target = Path(out or "runs/weights-attack-adapter")
        result = attack_adapter(encoder, adapter, target, private=private, overwrite=overwrite)
        header = result["header"]
        console.print(f"header: {len(header['findings'])} finding(s)"
                      + (" — [bold red]it leaks[/]: run privdiff inspect --scrub" if header["leaks"] else ""))
        if "identity_similarity_to_private" in result:
            console.print(f"identity similarity of the attack images to {private}: "
                          f"{result['identity_similarity_to_private']:.3f}")
        console.print(f"attack images: [bold]{target / 'adapter_attack.png'}[/]  results: {target / 'adapter_attack.json'}")
        return

    flags = {"output_dir": out, "data.victims": victims, "training.budget_steps": budget,
             "defences.apply": list(defence) if defence else None, "defences.adaptive": adaptive,
             **runtime_flags(device, precision)}
    cfg = build_config(config, flags, set_, kind=WeightsAttackConfig)
    require_cpu_fp32(resolve_runtime(cfg.runtime), "the weights attack")
    result = run_weights_attack(cfg, show_progress=not quiet, overwrite=overwrite)
    agg = result["aggregate"]
    console.print(f"weights attack on {agg['victims']} held-out victims (gallery {result['gallery_size']}, "
                  f"chance retrieval {result['chance_retrieval']:.3f}):")
    for name, label in (("attack", "attack (file only)"), ("true_prompt", "true prompt (upper)"),
                        ("random_embedding", "random embedding (lower)"), ("base", "base 'a face' (lower)")):
        entry = agg[name]
        console.print(f"  {label:26s} identity similarity {format_estimate(entry['identity_similarity'])}  "
                      f"top-1 retrieval {format_estimate(entry['retrieval'])}")
    gap = "n/a (the upper bound is not above the lower)" if agg["gap_closed"] is None else f"{agg['gap_closed']:.2f}"
    console.print(f"  gap closed {gap}; attack − random {format_estimate(agg['attack_minus_random'])}")
    if "ablation" in result:
        console.print(f"  ablation ({result['ablation']['label']}): "
                      f"{format_estimate(result['ablation']['aggregate']['attack']['identity_similarity'])}; paradigm − ablation "
                      f"{format_estimate(result['ablation']['paradigm_minus_ablation'])}")
    meta = result["metadata_attack"]
    console.print(f"  metadata attack: trigger word found in {meta['recovered']} of {meta['of']} file headers")
    for point in result.get("defences", {}).get("points", []):
        if point["defence"] != "none":
            extra = f", adaptive {point['adaptive_attack']['value']:.3f}" if point.get("adaptive_attack") else ""
            console.print(f"  defence {point['defence']} {point['knob']:g}: utility {format_estimate(point['utility'])}, "
                          f"attack {format_estimate(point['attack'])}{extra}")
    timings = result["timings"]
    console.print(f"encoder training {timings['encoder_pairs_per_s']:.1f} pairs/s; shadow fine-tune "
                  f"{timings['shadow_finetune_s_per_step'] * 1000:.0f} ms/step")
    console.print(f"results: [bold]{Path(cfg.output_dir) / 'attack.json'}[/] (add the folder to `privdiff report`)")


__all__ = ["attack_app"]
