"""The weights-to-image attack as one object (weights-attack.md §5-7), with the phases of every
privdiff attack: `fit` on what the attacker may use (shadow fine-tunes of the public base), then
`reconstruct` from what it observes (one shared LoRA file).

- `fit`: the step-embedding paradigm trains the encoder on every step of every shadow run.
- `embed`: a file's LoRA layers -> the prompt embedding z (its mean, or a sample).
- `reconstruct`: the file's own fine-tuned UNet, prompted with z, generates the identity's images.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from privdiff.models.lora_math import LoRALayer, read_unet_lora
from privdiff.runs.files import atomic_write_json
from privdiff.weights.finetune import FinetuneBench, GenerationConfig
from privdiff.weights.paradigm import (
    EncoderTrainer,
    EncoderTrainingConfig,
    TrainedEncoder,
    embed_adapter,
    load_encoder,
    save_encoder,
)
from privdiff.weights.scoring import negative_context, victim_model
from privdiff.weights.shadow_runs import ShadowSource


class WeightsAttack:
    """Reads identities out of shared LoRA files with an encoder trained on shadow fine-tunes.

    Args:
        bench: the public base model and the victims' fine-tune recipe (the attacker knows both).
        training: how the encoder is trained (input mode, step token, budget...).
        init_seed: the default seeded LoRA initialisation granted to the attacker (`delta` mode).
    """

    name: ClassVar[str] = "step-embedding"

    def __init__(self, bench: FinetuneBench, training: EncoderTrainingConfig, *, init_seed: int) -> None:
        self.bench, self.training, self.init_seed = bench, training, init_seed
        self.encoder = None
        self.trainer: EncoderTrainer | None = None

    @property
    def step(self) -> int | None:
        """The step token given at attack time: the recipe's S (None for an encoder trained without it)."""
        return self.bench.recipe.steps if self.training.step_token else None

    @property
    def trained(self) -> TrainedEncoder:
        return self.encoder, self.training

    def fit(self, shadows: list[int], *, show_progress: bool = True, source: ShadowSource | None = None) -> dict:
        """Trains the encoder on fine-tunes of the `shadows` identities; returns the training summary.

        `source`: a shadow farm's reader (default: each shadow run is fine-tuned here when needed).
        """
        self.trainer = EncoderTrainer(self.bench, self.training, shadows)
        summary = self.trainer.train(show_progress=show_progress, source=source)
        self.encoder = self.trainer.encoder
        return summary

    def save(self, folder: Path) -> None:
        """The encoder and its configs, plus (after `fit`) its update log and the shadow runs it saw."""
        save_encoder(folder, self.encoder, self.training)
        if self.trainer is not None:
            with open(folder / "encoder_log.jsonl", "w") as fh:
                for row in self.trainer.updates:
                    fh.write(json.dumps(row) + "\n")
            atomic_write_json(folder / "runs.json", self.trainer.runs)

    @classmethod
    def load(cls, folder: Path, bench: FinetuneBench, *, init_seed: int) -> "WeightsAttack":
        """An attack whose encoder was trained and saved earlier (`save`, or a shipped one).

        Raises:
            ModelError: missing or mismatched encoder files.
        """
        encoder, training = load_encoder(folder, bench)
        attack = cls(bench, training, init_seed=init_seed)
        attack.encoder = encoder
        return attack

    def embed(self, layers: list[LoRALayer], *, sample: bool = False,
              rng: torch.Generator | None = None) -> torch.Tensor:
        """(1, L, D) prompt embedding of one adapter's layers.

        Raises:
            ModelError: the adapter's layout differs from the one the encoder was trained on.
        """
        return embed_adapter(self.encoder, layers, self.training.mode, self.step, sample=sample, rng=rng,
                             init_seed=self.init_seed)

    def reconstruct(self, adapter: Path, generation: GenerationConfig, rng: torch.Generator) -> np.ndarray:
        """(G, H, W, 3) uint8 images of the identity behind `adapter`, decoded by its own UNet."""
        z = self.embed(read_unet_lora(adapter))
        victim = victim_model(self.bench, adapter)
        return self.bench.generate(victim.unet, z, generation, rng, negative_context(self.bench, victim))


__all__ = ["WeightsAttack"]
