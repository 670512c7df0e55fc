"""The run-folder contract, written and read in one place: what each kind of run leaves on disk,
how a folder is created (or resumed, or replaced) under its writer lock, and how a finished one is
opened again.

A fine-tuning run folder:
    config.yaml                        the fully resolved config
    membership.json                    the membership manifest used
    checkpoint.pt                      latest training state (resume)
    history.json                       logged training metrics (training curves)
    train_log.jsonl                    every step's metrics and per-epoch rows (smp_log.jsonl for MP/SMP)
    snapshots/step-NNNNNN/             adapters saved during the run (early stopping, frontiers)
    pytorch_lora_weights.safetensors   the adapter, diffusers LoRA format
    samples.png                        a grid of generated samples
    metrics.json, eval/                written by `privdiff evaluate`
    audit/                             written by `privdiff audit`
    summary.json                       written last: method, steps, settings, seed, dataset, versions,
                                       git commit, wall time, metrics {}, privacy {}
A split-learning run folder: config.yaml, run.json, train_log.jsonl, server_checkpoint.pt,
controlnet/, keys/, flower/, summary.json. A split attack grid: split_attacks.json. A weights-attack
run: attack.json (kind "weights-attack").

Loading a finished run's dataset and adapted pipeline needs data and models, a layer up:
`privdiff.training.run.run_dataset` / `run_pipeline`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from privdiff.config import RunConfig, load_config
from privdiff.errors import ConfigError
from privdiff.runs.lock import LOCK_NAME, lock_run_folder

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default: what load_lora_weights looks for
MANIFEST_FILE = "membership.json"
CHECKPOINT_FILE = "checkpoint.pt"
FINETUNE_RUN_FILES = ("config.yaml", MANIFEST_FILE, CHECKPOINT_FILE, "history.json", LORA_WEIGHT_NAME,
                      "samples.png", "summary.json", "train_log.jsonl", "smp_log.jsonl", "snapshots",
                      "proxy_final.safetensors")
FINETUNE_OUTPUTS = FINETUNE_RUN_FILES + ("audit", "eval", "metrics.json", "report.html", "report.json")
SPLIT_CHECKPOINT_FILE = "server_checkpoint.pt"
SPLIT_RUN_FILES = ("config.yaml", "run.json", "summary.json", "train_log.jsonl", SPLIT_CHECKPOINT_FILE,
                   "controlnet", "keys", "flower", "simulated_clients.pt")
GRID_FILE = "split_attacks.json"
WEIGHTS_ATTACK_FILE = "attack.json"


def _without(values: dict, keys: tuple[str, ...]) -> dict:
    return {k: v for k, v in values.items() if k not in keys}


def prepare_run_dir(run_dir: Path, config, resume: bool, overwrite: bool,
                    known_files: tuple[str, ...] = FINETUNE_OUTPUTS, checkpoint: str = CHECKPOINT_FILE) -> bool:
    """Creates or checks a run folder and takes its writer lock; returns whether training resumes
    from a checkpoint. The caller releases the lock (`runs.lock.writing_run_folder`).

    `known_files`: what privdiff writes there; --overwrite refuses a folder holding anything else.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output path {run_dir} exists and is not a folder")
    lock_run_folder(run_dir)  # refuses a folder that another process is writing
    existing = [p for p in run_dir.iterdir() if p.name != LOCK_NAME]
    if existing and resume:
        saved = run_dir / "config.yaml"
        if not saved.exists():
            raise ConfigError(f"cannot resume: {run_dir} has no config.yaml")
        neutral = getattr(config, "RESULT_NEUTRAL", ())
        if _without(yaml.safe_load(saved.read_text()), neutral) != _without(config.to_dict(), neutral):
            raise ConfigError(f"cannot resume: the config differs from the one saved in {saved}")
        return (run_dir / checkpoint).exists()
    if existing and not overwrite:
        raise ConfigError(f"output folder {run_dir} is not empty: pass --resume to continue it or "
                          f"--overwrite to replace it")
    if existing:
        unknown = [p.name for p in existing if p.name not in known_files and not p.name.startswith(".")]
        if unknown:
            raise ConfigError(f"refusing to overwrite {run_dir}: it holds files privdiff did not write "
                              f"(e.g. {unknown[0]})")
        for path in existing:  # the folder itself stays: it carries the lock
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return False


def snapshot_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "snapshots" / f"step-{step:06d}" / LORA_WEIGHT_NAME


def read_json(path: Path) -> dict | list | None:
    """A JSON file of a run folder, or None when it is absent (invalid JSON is a ConfigError)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err.msg})") from None


@dataclass
class RunFolder:
    """A finished fine-tuning run: its resolved config and summary, and where its files are."""

    path: Path
    config: RunConfig
    summary: dict

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_FILE

    @property
    def adapter_path(self) -> Path:
        return self.path / LORA_WEIGHT_NAME

    @property
    def history(self) -> list[dict]:
        return read_json(self.path / "history.json") or []

    def epoch_log(self) -> list[dict]:
        """The per-epoch rows of the run's JSON-lines training log (empty for runs that predate it)."""
        for name in ("smp_log.jsonl", "train_log.jsonl"):
            path = self.path / name
            if path.is_file():
                try:
                    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                except json.JSONDecodeError as err:
                    raise ConfigError(f"{path} is not valid JSON lines ({err.msg})") from None
                return [row for row in rows if "epoch" in row]
        return []


def open_run(path: str | Path) -> RunFolder:
    """Opens a finished run folder.

    Raises:
        ConfigError: not a folder, or not finished (no summary.json), or an unreadable config.
    """
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"run folder not found: {path}")
    if not (path / "summary.json").is_file():
        raise ConfigError(f"{path} is not a finished run folder (no summary.json)")
    return RunFolder(path=path, config=load_config(path / "config.yaml"), summary=read_json(path / "summary.json"))


def load_grid(folder: str | Path) -> dict | None:
    """The split attack grid in `folder`, or None when it holds none."""
    return read_json(Path(folder) / GRID_FILE)


def load_weights_attack(folder: str | Path) -> dict | None:
    """The attack.json of a `privdiff attack weights` folder, or None for any other folder."""
    result = read_json(Path(folder) / WEIGHTS_ATTACK_FILE)
    return result if isinstance(result, dict) and result.get("kind") == "weights-attack" else None


__all__ = ["CHECKPOINT_FILE", "FINETUNE_OUTPUTS", "FINETUNE_RUN_FILES", "GRID_FILE", "LORA_WEIGHT_NAME",
           "MANIFEST_FILE", "RunFolder", "SPLIT_CHECKPOINT_FILE", "SPLIT_RUN_FILES", "WEIGHTS_ATTACK_FILE",
           "load_grid", "load_weights_attack", "open_run", "prepare_run_dir", "read_json", "snapshot_path"]
