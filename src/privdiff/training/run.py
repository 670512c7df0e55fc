"""A fine-tuning run end to end, writing the run folder every later command reads, and the
finished run's dataset, manifest and adapted pipeline loaded back (evaluation, audit, early stopping).

The files it writes, and what each later command adds, are the contract in `privdiff.runs.folder`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from privdiff.config import RunConfig, RuntimeConfig, load_config
from privdiff.data import (
    ImageDataset,
    Manifest,
    build_manifest,
    load_dataset,
    load_manifest,
)
from privdiff.diffusion.cache import open_encoding_cache
from privdiff.diffusion.task import build_task
from privdiff.distributed import (
    current_world,
    decided_on_main,
    in_process_group,
    init_distributed,
    launched_by_torchrun,
    require_same_config,
)
from privdiff.errors import ConfigError, ModelError
from privdiff.models.generation import default_prompts, sample_images, save_grid
from privdiff.models.load import load_pipeline
from privdiff.models.lora import load_lora_into_unet, save_lora
from privdiff.runs.files import atomic_write_json, atomic_write_text, save_config
from privdiff.runs.folder import (
    LORA_WEIGHT_NAME,
    RunFolder,
    open_run,
    prepare_run_dir,
    snapshot_path,
)
from privdiff.runs.lock import writing_run_folder
from privdiff.runs.record import run_record
from privdiff.runtime import Runtime, resolve_runtime
from privdiff.seeding import seed_everything
from privdiff.training.loop import StepCallback, TrainResult, train
from privdiff.training.methods import METHODS, get_method
from privdiff.training.methods.base import TrainingMethod


@dataclass
class RunInputs:
    """Everything validated before the run folder is touched."""

    dataset: ImageDataset
    manifest: Manifest
    members: ImageDataset

    def splits(self, roles: tuple[str, ...]) -> dict[str, ImageDataset]:
        """The examples of each of `roles` that has any (e.g. a method's `extra_roles`)."""
        return {role: self.dataset.subset(ids) for role in roles if (ids := self.manifest.ids(role))}


def prepare_inputs(config: RunConfig) -> RunInputs:
    """Loads and validates the data and the manifest (raises before anything is written)."""
    dataset = load_dataset(config.data)
    if config.membership.manifest:
        manifest = load_manifest(Path(config.membership.manifest), dataset.content_hash)
    else:
        manifest = build_manifest([ex.id for ex in dataset.examples], dataset.name, dataset.content_hash,
                                  config.membership)
    members = dataset.subset(manifest.members)
    if not members.examples:
        raise ConfigError("the membership manifest has no training members")
    return RunInputs(dataset=dataset, manifest=manifest, members=members)


def run_training(config: RunConfig, *, resume: bool = False, overwrite: bool = False,
                 show_progress: bool = True, on_step: StepCallback | None = None,
                 distributed: bool = False) -> Path | None:
    """Fine-tunes per `config` and writes the run folder; returns its path.

    Args:
        distributed: this process is one of a `torchrun` launch (data parallel). Every process
            trains its share of each global batch; only the main process writes the run folder and
            its checkpoints (the others return None); with `resume`, every process loads the main
            process's checkpoint.

    Raises:
        PrivdiffError: invalid data, config or model, or processes started with different configs,
            before anything is written.
    """
    began = time.perf_counter()
    config.validate()
    if launched_by_torchrun() and not distributed and not in_process_group():
        raise ConfigError("started by torchrun: pass --distributed (otherwise every process writes the run)")
    world = init_distributed() if distributed else current_world()
    require_same_config(config.to_dict())
    method = get_method(config.train.method)(config)
    if world.distributed and not method.data_parallel:
        parallel = ", ".join(name for name in METHODS if METHODS.get(name).data_parallel)
        raise ConfigError(f"--distributed is not supported for --method {method.name} (only for {parallel})")
    inputs = prepare_inputs(config)
    for role in method.required_roles:
        if not inputs.manifest.ids(role):
            raise ConfigError(f"--method {method.name} needs '{role}' examples, and the membership manifest has none")
    runtime = resolve_runtime(config.runtime, training_method=method.name)
    pipe = load_pipeline(config.model.pretrained, device=runtime.device, dtype=runtime.dtype)
    method.check_inputs(len(inputs.members), pipe.unet)
    run_dir = Path(config.output_dir)
    if not world.is_main:  # the main process checks the folder; every process resumes if it does
        resuming = decided_on_main(lambda: False)
        return _train_into(run_dir, config, method, inputs, pipe, resuming=resuming, show_progress=show_progress,
                           on_step=on_step, began=began, runtime=runtime)
    with writing_run_folder(run_dir):
        resuming = decided_on_main(lambda: prepare_run_dir(run_dir, config, resume, overwrite))
        save_config(config, run_dir / "config.yaml")
        atomic_write_json(run_dir / "membership.json", inputs.manifest.to_json())
        return _train_into(run_dir, config, method, inputs, pipe, resuming=resuming, show_progress=show_progress,
                           on_step=on_step, began=began, runtime=runtime)


def _train_into(run_dir: Path, config: RunConfig, method: TrainingMethod, inputs: RunInputs, pipe, *,
                resuming: bool, show_progress: bool, on_step: StepCallback | None, began: float,
                runtime: Runtime) -> Path | None:
    """Trains and, on the main process, writes the run's outputs (its folder is prepared and locked)."""
    world = current_world()
    seed_everything(config.train.seed)
    task = build_task(pipe, inputs.members, inputs.splits(method.extra_roles),
                      cache=open_encoding_cache(config.cache.enabled, config.cache.dir))

    def save_snapshot(step: int) -> None:
        save_lora(snapshot_path(run_dir, step), pipe.unet, config.lora, method.adapter_metadata())

    result = train(task, method, run_dir, resume=resuming, show_progress=show_progress, on_step=on_step,
                   on_snapshot=save_snapshot, description=f"fine-tuning ({method.name})")
    if not world.is_main:
        return None
    save_lora(run_dir / LORA_WEIGHT_NAME, pipe.unet, config.lora, method.adapter_metadata())
    atomic_write_json(run_dir / "history.json", result.history)
    atomic_write_text(run_dir / method.log_name, "".join(json.dumps(row) + "\n" for row in result.log))
    method.save_artifacts(run_dir)
    prompts = config.sample.prompts or default_prompts(inputs.members.captions(), config.sample.num_images)
    save_grid(sample_images(pipe, prompts, config.sample, config.data.image_size), run_dir / "samples.png")
    atomic_write_json(run_dir / "summary.json",
                      {**build_summary(config, inputs, result, method, time.perf_counter() - began, task.unet,
                                       prompts, runtime), **method.run_summary()})
    return run_dir


def build_summary(config: RunConfig, inputs: RunInputs, result: TrainResult, method: TrainingMethod,
                  wall_time_s: float, unet: torch.nn.Module, prompts: list[str], runtime: Runtime) -> dict:
    """summary.json: what ran (not what the config's plain-training fields say), where and with what."""
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    return {
        "method": config.train.method,
        "steps": result.steps,
        "seed": config.train.seed,
        "settings": {"steps": result.steps, **method.batching(), "learning_rate": config.train.learning_rate,
                     "lora_rank": config.lora.rank, "lora_alpha": config.lora.alpha, "seed": config.train.seed,
                     "caption_dropout": config.train.caption_dropout},
        "dataset": {"name": inputs.dataset.name, "hash": inputs.dataset.content_hash,
                    "num_examples": len(inputs.dataset), "num_train_members": len(inputs.members),
                    "image_size": config.data.image_size},
        "membership": inputs.manifest.counts(),
        "pretrained": config.model.pretrained or "privdiff:tiny-sd-glyphs",
        "runtime": runtime.describe(),
        "num_trainable_params": trainable,
        "parallel": parallel_summary(method),
        "final_loss": result.history[-1]["loss_avg"] if result.history else None,
        "resumed_from_step": result.resumed_from,
        "sample_prompts": prompts,
        **run_record(),
        "wall_time_s": round(wall_time_s, 3),
        "metrics": {},
        "privacy": method.privacy_spent() or {},
    }


def parallel_summary(method: TrainingMethod) -> dict:
    """How many processes shared each step, the global (effective) batch and the learning rate."""
    batching, world = method.batching(), current_world()
    batch = batching.get("batch_size", batching.get("expected_batch_size"))
    return {"world_size": world.size, "effective_batch_size": batch,
            "per_process_batch_size": batch / world.size if batch is not None else None,
            "learning_rate": method.config.train.learning_rate,
            "note": "each step is the step of one process on the global batch (gradients summed across "
                    "processes, means over the global batch): the learning rate is not scaled"}


def runtime_overrides(runtime: Runtime | None) -> list[str]:
    """`runtime` as config overrides, for a run trained on behalf of another command."""
    return [] if runtime is None else [f"runtime.device={runtime.device}", f"runtime.precision={runtime.precision}"]


def run_manifest(run: RunFolder) -> Manifest:
    """The membership manifest the run was trained with."""
    return load_manifest(run.manifest_path)


def run_dataset(run: RunFolder) -> ImageDataset:
    """The run's dataset, checked against the hash its manifest was built on."""
    dataset = load_dataset(run.config.data)
    load_manifest(run.manifest_path, dataset.content_hash)
    return dataset


def run_pipeline(run: RunFolder, adapter: Path | None = None, runtime: Runtime | None = None) -> DiffusionPipeline:
    """The base pipeline with the run's adapter (or `adapter`, e.g. a snapshot) loaded into its UNet
    (eval mode), on `runtime` (None: the `auto` device and precision of this machine, not the run's).

    Raises:
        ModelError: the adapter file is missing or does not fit the base.
    """
    runtime = runtime or resolve_runtime(RuntimeConfig())
    pipe = load_pipeline(run.config.model.pretrained, device=runtime.device, dtype=runtime.dtype)
    adapter = adapter or run.adapter_path
    if not adapter.is_file():
        raise ModelError(f"{run.path}: no adapter file {LORA_WEIGHT_NAME}")
    load_lora_into_unet(pipe.unet, adapter, run.config.lora)
    pipe.unet.eval()
    return pipe


def train_like(run: RunFolder, folder: Path, manifest: Manifest, overrides: list[str] | None = None,
               show_progress: bool = True, runtime: Runtime | None = None) -> RunFolder:
    """Trains the run's recipe on another membership (a LiRA shadow, the canary run) into `folder`,
    reusing a finished one; its manifest is saved beside the folder. Sampling is cut to one image.
    `runtime`: where to train (None: the run's own runtime settings)."""
    manifest_path = folder.with_name(folder.name + ".membership.json")
    atomic_write_json(manifest_path, manifest.to_json())
    cfg = load_config(run.path / "config.yaml", [f"output_dir={folder}", f"membership.manifest={manifest_path}",
                                                 "sample.num_images=1", "sample.num_inference_steps=1",
                                                 "train.snapshots=0", *runtime_overrides(runtime),
                                                 *(overrides or [])])
    if not (folder / "summary.json").exists():
        run_training(cfg, overwrite=True, show_progress=show_progress)
    return open_run(folder)
