"""The attacker's shadow fine-tunes (weights-attack.md §5) and, under torchrun, their farm.

A shadow run is one public identity fine-tuned with the recipe for s steps; it yields the pairs
(theta_r, r) after every step (or after the last only, for the end-of-run ablation). Run j's
identity, length and random stream depend on j only, so a run gives the same pairs in any process.

The farm (issue 32): run j is fine-tuned by rank j mod W into FOLDER/run-{j:05d}/ (its pairs as
safetensors, then the finished marker, each written atomically); a stopped farm reruns only the
runs without a marker, and the main process reads the runs back in index order while it trains
the encoder, so the encoder does not depend on the number of processes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import Progress
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from privdiff.diffusion.task import DiffusionTask
from privdiff.distributed import current_world, decided_on_main, run_farm
from privdiff.models.lora_math import LoRALayer, live_layers
from privdiff.runs.farm import (
    FINISHED_MARKER,
    claim_farm_folder,
    is_finished,
    mark_finished,
)
from privdiff.runs.files import atomic_replace
from privdiff.seeding import generator
from privdiff.weights.finetune import FinetuneBench

PAIRS_FILE = "pairs.safetensors"


@dataclass
class Pair:
    """One supervised pair of the paradigm: a shadow's adapter after fine-tune step r."""

    step: int                  # r
    layers: list[LoRALayer]    # theta_r
    latents: torch.Tensor      # the shadow's instance latents (the denoising targets)
    context: torch.Tensor      # its true prompt embedding (only the alignment term reads it)


@dataclass(frozen=True)
class ShadowRun:
    index: int     # j: names the run's random stream
    identity: int
    steps: int


# A shadow run -> its pairs and the seconds its fine-tune took.
ShadowSource = Callable[[ShadowRun], tuple[list[Pair], float]]


def plan_shadow_runs(shadows: list[int], recipe_steps: int, budget_steps: int, *, every_step: bool,
                     seed: int) -> list[ShadowRun]:
    """The runs of one encoder's budget: lengths s' ~ U{1..S} (every-step pairs) or S (end-of-run),
    summing to the budget, over the shadow identities in order (cycled)."""
    rng = generator(seed, "run-lengths")
    lengths: list[int] = []
    while sum(lengths) < budget_steps:
        draw = int(torch.randint(1, recipe_steps + 1, (1,), generator=rng)) if every_step else recipe_steps
        lengths.append(min(draw, budget_steps - sum(lengths)))
    return [ShadowRun(j, shadows[j % len(shadows)], steps) for j, steps in enumerate(lengths)]


def fine_tune_shadow(bench: FinetuneBench, run: ShadowRun, *, every_step: bool) -> tuple[list[Pair], float]:
    """Fine-tunes `run`; returns its pairs (every step, or the last only) and the seconds it took."""
    pairs: list[Pair] = []

    def on_step(r: int, unet: torch.nn.Module, task: DiffusionTask) -> None:
        if every_step or r == run.steps:
            pairs.append(Pair(r, live_layers(unet), task.latents, task.contexts[:1]))

    began = time.perf_counter()
    bench.finetune(run.identity, run.steps, on_step=on_step, seed_key=("shadow", run.index, run.identity))
    return pairs, time.perf_counter() - began


def save_pairs(path: Path, pairs: list[Pair]) -> None:
    """One run's pairs in one safetensors file (its latents and context once), written atomically."""
    tensors = {"latents": pairs[0].latents.contiguous(), "context": pairs[0].context.contiguous()}
    for k, pair in enumerate(pairs):
        for i, layer in enumerate(pair.layers):
            tensors[f"pair{k}.layer{i}.down"] = layer.down.contiguous()
            tensors[f"pair{k}.layer{i}.up"] = layer.up.contiguous()
    layout = [[layer.name, layer.alpha] for layer in pairs[0].layers]
    latents = pairs[0].latents
    # The VAE gives channels-last latents; the UNet's sums (so L_enc's last bits) follow the layout.
    channels_last = latents.dim() == 4 and not latents.is_contiguous() and latents.is_contiguous(
        memory_format=torch.channels_last)
    metadata = {"steps": json.dumps([p.step for p in pairs]), "layers": json.dumps(layout),
                "latents_channels_last": json.dumps(channels_last)}
    atomic_replace(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_pairs(path: Path) -> list[Pair]:
    with safe_open(str(path), "pt") as handle:
        header = handle.metadata()
    tensors = load_file(str(path))
    if json.loads(header["latents_channels_last"]):
        tensors["latents"] = tensors["latents"].contiguous(memory_format=torch.channels_last)
    layout = json.loads(header["layers"])
    return [Pair(step, [LoRALayer(name, tensors[f"pair{k}.layer{i}.down"], tensors[f"pair{k}.layer{i}.up"], alpha)
                        for i, (name, alpha) in enumerate(layout)],
                 tensors["latents"], tensors["context"])
            for k, step in enumerate(json.loads(header["steps"]))]


def farm_shadow_runs(bench: FinetuneBench, folder: Path, runs: list[ShadowRun], *, every_step: bool,
                     settings: dict, show_progress: bool = True) -> ShadowSource | None:
    """Fine-tunes `runs` as a farm into `folder` (this process: its share; finished runs are kept).

    Args:
        settings: what the fine-tunes depend on besides `runs` (base model, recipe, seed): recorded
            with the plan, so a folder of other fine-tunes is refused.

    Returns:
        On the main process, a source that reads each run back; None on the others.

    Raises:
        ConfigError: `folder` holds shadow runs made with other settings.
    """
    plan = {"settings": settings, "every_step": every_step,
            "runs": [[run.identity, run.steps] for run in runs]}
    decided_on_main(lambda: claim_farm_folder(folder / "plan.json", plan, "shadow fine-tunes"))
    folders = [folder / f"run-{run.index:05d}" for run in runs]
    world = current_world()
    with Progress(disable=not (show_progress and world.is_main), transient=True) as progress:
        bar = progress.add_task(f"shadow fine-tunes (this process's share of {len(runs)})",
                                total=len(range(world.rank, len(runs), world.size)))

        def fine_tune(j: int) -> None:
            pairs, seconds = fine_tune_shadow(bench, runs[j], every_step=every_step)
            save_pairs(folders[j] / PAIRS_FILE, pairs)
            mark_finished(folders[j], {"identity": runs[j].identity, "steps": runs[j].steps, "pairs": len(pairs),
                                       "finetune_seconds": seconds})
            progress.advance(bar)

        if not run_farm(len(runs), fine_tune, finished=lambda j: is_finished(folders[j])):
            return None

    def read_back(run: ShadowRun) -> tuple[list[Pair], float]:
        done = json.loads((folders[run.index] / FINISHED_MARKER).read_text())
        if (done["identity"], done["steps"]) != (run.identity, run.steps):
            raise ValueError(f"shadow run {run.index} of the farm is not the run the encoder asked for")
        return load_pairs(folders[run.index] / PAIRS_FILE), done["finetune_seconds"]

    return read_back
