"""The one training loop: seeding, batches, progress, logging, atomic checkpoints and resume.

Methods plug in through `TrainingMethod`; the loop never branches on which method it runs.
Every step's randomness is derived from (seed, step), so a run resumed from a checkpoint at step
s continues exactly as the uninterrupted run would have. Under torchrun only the main process
writes checkpoints, and every process resumes from the main process's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from privdiff.diffusion.task import DiffusionTask
from privdiff.distributed import current_world
from privdiff.errors import OutOfMemory, ProcessGroupError
from privdiff.runs.files import load_checkpoint, save_checkpoint
from privdiff.seeding import generator
from privdiff.training.methods.base import TrainBatch, TrainingMethod

StepCallback = Callable[[int, dict[str, float]], None]


@dataclass
class TrainResult:
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    log: list[dict[str, float]] = field(default_factory=list)  # one row per step, one per epoch
    wall_time_s: float = 0.0
    resumed_from: int = 0


def json_safe(row: dict[str, float | None]) -> dict[str, float | None]:
    """NaN and infinities become null (strict JSON; e.g. the loss of an empty DP batch)."""
    return {k: (v if v is None or math.isfinite(v) else None) for k, v in row.items()}


def make_batch(task: DiffusionTask, indices: torch.Tensor, caption_dropout: float,
               rng: torch.Generator) -> TrainBatch:
    contexts = task.contexts[indices]
    if caption_dropout > 0:
        # One draw per example row, whatever the batch: a process's share sees the same drops.
        drop = (torch.rand(task.num_examples, generator=rng) < caption_dropout)[indices]  # (B,)
        contexts = torch.where(drop[:, None, None], task.null_context.expand_as(contexts), contexts)
    return TrainBatch(indices=indices, latents=task.latents[indices], contexts=contexts)


def snapshot_steps(total: int, count: int) -> list[int]:
    """`count` steps spread evenly over the run, the last one being `total`."""
    return sorted({max(1, round(total * i / count)) for i in range(1, count + 1)}) if count else []


def rows_since_last_epoch(log: list[dict[str, float]]) -> list[dict[str, float]]:
    """The step rows logged after the latest epoch row (the epoch being closed)."""
    rows = []
    for row in reversed(log):
        if "epoch" in row:
            break
        rows.append(row)
    return rows[::-1]


def epoch_row(epoch: int, step: int, rows: list[dict[str, float]]) -> dict[str, float]:
    """Means of the step metrics over one epoch (non-finite values left out)."""
    keys = [k for k in rows[0] if k not in ("step", "epoch")] if rows else []
    means = {}
    for key in keys:
        values = [r[key] for r in rows if r.get(key) is not None and math.isfinite(r[key])]
        means[key] = sum(values) / len(values) if values else None
    return {"epoch": epoch, "step": step, **means}


def train(task: DiffusionTask, method: TrainingMethod, run_dir: Path, *, resume: bool = False,
          show_progress: bool = True, on_step: StepCallback | None = None,
          on_snapshot: Callable[[int], None] | None = None, description: str = "training") -> TrainResult:
    """Trains `task.unet` with `method` for `config.train.steps` steps.

    Args:
        task: cached training inputs and the UNet.
        method: the training method (its `prepare` is called here).
        run_dir: where `checkpoint.pt` is written every `train.checkpoint_every` steps.
        resume: continue from `run_dir/checkpoint.pt` when it exists.
        show_progress: draw a rich progress bar.
        on_step: called after every step with (step, metrics); may raise to stop the run.
        on_snapshot: called (main process) at the method's snapshot steps to save the adapter.

    Returns:
        The step count, the logged history and the wall time of this call.
    """
    cfg = method.config.train
    world = current_world()
    method.prepare(task)
    total = method.total_steps()
    per_epoch = method.steps_per_epoch(task.num_examples)
    snapshots = set(snapshot_steps(total, method.num_snapshots()))
    history: list[dict[str, float]] = []
    log: list[dict[str, float]] = []
    start = 0
    running_saved: list[float] = []
    state = load_checkpoint(run_dir) if resume else None
    if state is not None:
        method.load_state_dict(state["method"])
        history, start = state["history"], state["step"]
        running_saved = state.get("running", [])
        log = state.get("log", [])
    began = time.perf_counter()
    progress = Progress(TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(),
                        disable=not (show_progress and world.is_main), transient=False)
    with progress:
        bar = progress.add_task(description, total=total, completed=start, loss=float("nan"))
        running: list[float] = list(running_saved)
        for step in range(start, total):
            rng = generator(cfg.seed, "step", step)
            indices = method.batch_indices(step, task.num_examples, rng)
            batch = make_batch(task, indices, cfg.caption_dropout, rng)
            try:
                metrics = method.step(task, batch, rng)
            except torch.OutOfMemoryError:
                raise OutOfMemory(f"out of memory on the device at step {step + 1}: lower dp.physical_batch_size "
                                  f"(--physical-batch-size; dp-lora) or train.batch_size (--batch-size); the last "
                                  f"checkpoint is intact, continue with --resume") from None
            except (dist.DistError, RuntimeError) as err:
                # gloo reports a dead peer as a RuntimeError from the collective the survivors wait in
                if not (world.distributed and (isinstance(err, dist.DistError) or "gloo" in str(err)
                                               or "NCCL" in str(err))):
                    raise
                raise ProcessGroupError(f"another process of the launch failed at step {step + 1} "
                                        f"({str(err).splitlines()[0][:160] if str(err) else type(err).__name__}); "
                                        f"the last checkpoint is intact, continue with --resume") from err
            log.append(json_safe({"step": step + 1, **metrics}))
            if (step + 1) % per_epoch == 0 or step + 1 == total:
                epoch = math.ceil((step + 1) / per_epoch)
                log.append(json_safe({**epoch_row(epoch, step + 1, rows_since_last_epoch(log)),
                                      **method.epoch_end(task, epoch, last=step + 1 == total)}))
            if math.isfinite(metrics["loss"]):  # an empty DP batch has no loss
                running.append(metrics["loss"])
            if (step + 1) % cfg.log_every == 0 or step + 1 == total:
                history.append(json_safe({"step": step + 1, **metrics,
                                          "loss_avg": sum(running) / len(running) if running else None}))
                running = []
            progress.update(bar, advance=1, loss=metrics["loss"])
            if ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == total) and world.is_main:
                save_checkpoint(run_dir, {"step": step + 1, "method": method.state_dict(),
                                          "history": history, "running": running, "log": log})
            if step + 1 in snapshots and world.is_main and on_snapshot is not None:
                on_snapshot(step + 1)
            if on_step is not None:
                on_step(step + 1, metrics)
    method.finish(task)
    return TrainResult(steps=total, history=history, log=log, wall_time_s=time.perf_counter() - began,
                       resumed_from=start)

