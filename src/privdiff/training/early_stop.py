"""Plain LoRA stopped early at a defended run's utility (smp-lora.md §8.3 b).

A defence that slows learning leaks less for that reason alone. The fair comparison is the plain
LoRA snapshot whose held-out denoising loss on the auxiliary non-members is closest to the defended
run's final one (never matched on a test split). The chosen snapshot is written as a run folder of
its own, so `privdiff evaluate`, `privdiff audit` and the report treat it like any run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from privdiff.diffusion.cache import open_encoding_cache
from privdiff.diffusion.task import encode_split
from privdiff.errors import ConfigError
from privdiff.metrics.heldout import heldout_losses
from privdiff.models.lora import LORA_WEIGHT_NAME
from privdiff.runs.files import atomic_write_json, atomic_write_text
from privdiff.runs.folder import RunFolder, open_run
from privdiff.runs.record import run_record
from privdiff.runtime import Runtime
from privdiff.training.run import run_dataset, run_manifest, run_pipeline

MATCH_ROLE = "nonmember_aux"
MATCH_SEED = 0  # the evaluation's default seed: the fixed noises `privdiff evaluate` uses


def snapshot_adapters(run: RunFolder) -> dict[int, Path]:
    """Step -> adapter file, for every snapshot of the run and its final adapter."""
    found = {int(p.parent.name.removeprefix("step-")): p
             for p in (run.path / "snapshots").glob(f"step-*/{LORA_WEIGHT_NAME}")}
    found[int(run.summary["steps"])] = run.path / LORA_WEIGHT_NAME
    return dict(sorted(found.items()))


def matching_loss(run: RunFolder, adapter: Path, split, runtime: Runtime | None = None) -> float:
    """Mean held-out denoising loss of `adapter` on the auxiliary non-members (8 fixed timesteps)."""
    pipe = run_pipeline(run, adapter, runtime)
    losses, _ = heldout_losses(pipe.unet, pipe.scheduler, split.latents, split.contexts, split.ids, seed=MATCH_SEED)
    return float(losses.mean())


def early_stop_like(candidate_dir: str | Path, reference_dir: str | Path, out_dir: str | Path,
                    overwrite: bool = False, runtime: Runtime | None = None, cache: bool = True) -> Path:
    """Writes the snapshot of `candidate_dir` matched in utility to `reference_dir` as a run folder.

    Args:
        cache: read and write encodings in the reference run's encoding cache (false: --no-cache).

    Raises:
        ConfigError: different manifests or base models, no snapshots, or an occupied `out_dir`.
    """
    candidate, reference = open_run(candidate_dir), open_run(reference_dir)
    out = Path(out_dir)
    if run_manifest(candidate).roles != run_manifest(reference).roles:
        raise ConfigError(f"{candidate.path} and {reference.path} use different membership manifests: "
                          f"results would not be paired")
    if candidate.config.model.pretrained != reference.config.model.pretrained:
        raise ConfigError(f"{candidate.path} and {reference.path} fine-tune different base models")
    adapters = snapshot_adapters(candidate)
    if len(adapters) < 2:
        raise ConfigError(f"{candidate.path} has no snapshots to stop early at: train it with train.snapshots=8")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"output folder {out} is not empty: pass --overwrite to replace it")
    pipe = run_pipeline(reference, runtime=runtime)
    split = encode_split(pipe, run_dataset(reference).subset(run_manifest(reference).ids(MATCH_ROLE)),
                         cache=open_encoding_cache(cache, reference.config.cache.dir))
    if not len(split):
        raise ConfigError(f"{reference.path}: the manifest has no '{MATCH_ROLE}' examples to match utility on")
    target = matching_loss(reference, reference.path / LORA_WEIGHT_NAME, split, runtime)
    losses = {step: matching_loss(candidate, path, split, runtime) for step, path in adapters.items()}
    chosen = min(losses, key=lambda step: (abs(losses[step] - target), step))

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    config = candidate.config.to_dict()
    config["output_dir"], config["train"]["steps"], config["train"]["snapshots"] = str(out), chosen, 0
    atomic_write_text(out / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    shutil.copyfile(candidate.path / "membership.json", out / "membership.json")
    shutil.copyfile(adapters[chosen], out / LORA_WEIGHT_NAME)
    history = [row for row in candidate.history if row["step"] <= chosen]
    atomic_write_json(out / "history.json", history)
    match = {"from_run": str(candidate.path), "step": chosen, "of_steps": int(candidate.summary["steps"]),
             "matched_to": str(reference.path), "matched_on": f"mean held-out denoising loss on {MATCH_ROLE} "
             f"(8 fixed timesteps, seed {MATCH_SEED})", "target_loss": target, "loss": losses[chosen],
             "candidates": [{"step": s, "loss": v} for s, v in losses.items()]}
    summary = {**candidate.summary, "steps": chosen, "final_loss": history[-1]["loss_avg"] if history else None,
               "metrics": {}, "early_stopped": match, **run_record()}
    atomic_write_json(out / "summary.json", summary)
    return out
