"""Reading a finished run folder back: its config, manifest, data and adapted pipeline.

Evaluation, the audit and the report all start here, so they see the run exactly as trained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from diffusers import StableDiffusionPipeline

from privdiff.config import RunConfig, load_config
from privdiff.data import ImageDataset, Manifest, load_dataset, load_manifest
from privdiff.errors import ConfigError, ModelError
from privdiff.models.lora import LORA_WEIGHT_NAME


@dataclass
class RunFolder:
    path: Path
    config: RunConfig
    summary: dict

    @property
    def manifest(self) -> Manifest:
        return load_manifest(self.path / "membership.json")

    @property
    def history(self) -> list[dict]:
        path = self.path / "history.json"
        return json.loads(path.read_text()) if path.exists() else []

    @property
    def name(self) -> str:
        return self.path.name

    def dataset(self) -> ImageDataset:
        """The run's dataset, checked against the hash its manifest was built on."""
        dataset = load_dataset(self.config.data)
        load_manifest(self.path / "membership.json", dataset.content_hash)
        return dataset

    def pipeline(self, adapter: Path | None = None) -> StableDiffusionPipeline:
        """The base pipeline with the run's adapter (or `adapter`, e.g. a snapshot) loaded into its
        UNet (eval mode)."""
        from privdiff.models.load import load_pipeline
        from privdiff.models.lora import load_lora_into_unet

        pipe = load_pipeline(self.config.model.pretrained)
        adapter = adapter or self.path / LORA_WEIGHT_NAME
        if not adapter.is_file():
            raise ModelError(f"{self.path}: no adapter file {LORA_WEIGHT_NAME}")
        load_lora_into_unet(pipe.unet, adapter, self.config.lora)
        pipe.unet.eval()
        return pipe


def open_run(path: str | Path) -> RunFolder:
    """Opens a finished run folder.

    Raises:
        ConfigError: not a folder, or not finished (no summary.json), or an unreadable config.
    """
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"run folder not found: {path}")
    summary_path = path / "summary.json"
    if not summary_path.is_file():
        raise ConfigError(f"{path} is not a finished run folder (no summary.json)")
    try:
        summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{summary_path} is not valid JSON ({err.msg})") from None
    return RunFolder(path=path, config=load_config(path / "config.yaml"), summary=summary)


def train_like(run: RunFolder, folder: Path, manifest: Manifest, overrides: list[str] | None = None,
               show_progress: bool = True) -> RunFolder:
    """Trains the run's recipe on another membership (a LiRA shadow, the canary run) into `folder`,
    reusing a finished one; its manifest is saved beside the folder. Sampling is cut to one image."""
    from privdiff.training.checkpoint import atomic_write_json
    from privdiff.training.run import run_training

    manifest_path = folder.with_name(folder.name + ".membership.json")
    atomic_write_json(manifest_path, manifest.to_json())
    cfg = load_config(run.path / "config.yaml", [f"output_dir={folder}", f"membership.manifest={manifest_path}",
                                                 "sample.num_images=1", "sample.num_inference_steps=1",
                                                 "train.snapshots=0", *(overrides or [])])
    if not (folder / "summary.json").exists():
        run_training(cfg, overwrite=True, show_progress=show_progress)
    return open_run(folder)
