"""Scoring the weights attack: identity similarity and retrieval, with bounds (weights-attack.md §7).

For each victim the same victim model generates G images under four conditions:
- `attack`: z = mu of Enc(adapter, r = S), as prompt embedding (the attacker sees only the file);
- `true_prompt`: the victim's own prompt "a face of {trigger}", through the victim's own text
  encoder when its file adapts that too (upper bound);
- `random_embedding`: a Gaussian embedding with the per-dimension mean and std of real prompt
  embeddings (lower bound);
- `base`: the base model with the class prompt "a face" (second lower bound).
Identity similarity is the mean over generated g and private p of (cos(e(g), e(p)) + 1)/2; a
generated image is a retrieval hit when its nearest gallery entry (the mean embedding of each
victim's private images, over all held-out victims) is its own victim.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from privdiff.data.identities import identity_images
from privdiff.metrics.estimate import Estimate
from privdiff.metrics.identity import (
    embed_identities,
    identity_similarity,
    load_identity_embedder,
)
from privdiff.models.lora import load_lora_into_text_encoder, load_lora_into_unet
from privdiff.seeding import generator
from privdiff.weights.finetune import FinetuneBench, FineTuned, GenerationConfig

CONDITIONS = ("attack", "true_prompt", "random_embedding", "base")
ContextFor = Callable[[Path], torch.Tensor]  # adapter file -> (1, L, D) attack embedding


class IdentityJudge:
    """Embeds images with the shipped identity model and scores them against the victims.

    Args:
        victims: every held-out victim identity (the retrieval gallery; chance = 1/len).
        images_per_identity: private images per victim (renders 0..n-1).
    """

    def __init__(self, victims: list[int], images_per_identity: int) -> None:
        self.embedder = load_identity_embedder()
        self.victims = list(victims)
        self.private = {v: embed_identities(self.embedder, identity_images(v, images_per_identity)) for v in victims}
        gallery = torch.stack([e.mean(0) for e in self.private.values()])
        self.gallery = torch.nn.functional.normalize(gallery, dim=1)

    def score(self, identity: int, images: np.ndarray) -> dict[str, float]:
        """Identity similarity and retrieval hit rate of generated `images` for victim `identity`."""
        emb = embed_identities(self.embedder, images)
        similarity = float(identity_similarity(emb, self.private[identity]).mean())
        nearest = (emb @ self.gallery.T).argmax(1)
        hits = (nearest == self.victims.index(identity)).float()
        return {"identity_similarity": similarity, "retrieval": float(hits.mean())}


def victim_model(bench: FinetuneBench, adapter: Path) -> FineTuned:
    """The victim's model as the attacker rebuilds it: the public base plus the shared file (UNet
    adapter, and text-encoder adapter when the file has one)."""
    unet = copy.deepcopy(bench.pipe.unet)
    load_lora_into_unet(unet, adapter)
    text_encoder = copy.deepcopy(bench.pipe.text_encoder)
    if not load_lora_into_text_encoder(text_encoder, adapter):
        text_encoder = None
    return FineTuned(unet.eval(), None if text_encoder is None else text_encoder.eval())


def negative_context(bench: FinetuneBench, victim: FineTuned) -> torch.Tensor:
    """(1, L, D) guidance's empty negative prompt, as the victim's own pipeline encodes it."""
    return bench.null_context if victim.text_encoder is None else bench.contexts(victim, [""])


def evaluate_victims(bench: FinetuneBench, judge: IdentityJudge, adapters: dict[int, Path],
                     attack_context: ContextFor | None, generation: GenerationConfig,
                     prompt_stats: tuple[torch.Tensor, torch.Tensor], *, seed: int = 0,
                     conditions: tuple[str, ...] = CONDITIONS,
                     keep_images: int = 0) -> tuple[list[dict], dict[int, dict[str, np.ndarray]]]:
    """Generates and scores every victim under `conditions`.

    Returns:
        (one row per victim with the scores of each condition, generated images of the first
        `keep_images` victims for the grid).
    """
    rows, images = [], {}
    base_unet = bench.pipe.unet
    mean, std = prompt_stats
    for index, (identity, adapter) in enumerate(adapters.items()):
        victim = victim_model(bench, adapter)
        null = negative_context(bench, victim)
        contexts = {}
        if "attack" in conditions and attack_context is not None:
            contexts["attack"] = (victim.unet, attack_context(adapter), null)
        if "true_prompt" in conditions:
            contexts["true_prompt"] = (victim.unet, bench.contexts(victim, [bench.recipe.prompt(identity)]), null)
        if "random_embedding" in conditions:
            noise = torch.randn(mean.shape, generator=generator(seed, "random-embedding", identity))
            contexts["random_embedding"] = (victim.unet, (mean + std * noise)[None], null)
        if "base" in conditions:
            contexts["base"] = (base_unet, bench.class_context, bench.null_context)
        row: dict = {"identity": identity, "adapter": adapter.name}
        kept = {}
        for name, (model, context, negative) in contexts.items():
            # The same sampling noise for every condition of a victim: paired comparisons.
            out = bench.generate(model, context, generation, generator(seed, "generate", identity), negative)
            row[name] = judge.score(identity, out)
            kept[name] = out
        rows.append(row)
        if index < keep_images:
            images[identity] = kept
    return rows, images


def aggregate(rows: list[dict], conditions: tuple[str, ...] = CONDITIONS, *, seed: int = 0) -> dict:
    """Means over victims with bootstrap 95 % intervals (resampling victims), and the gap closed."""
    out: dict = {"victims": len(rows)}
    for name in conditions:
        if not rows or name not in rows[0]:
            continue
        entry = {}
        for metric in ("identity_similarity", "retrieval"):
            values = np.array([r[name][metric] for r in rows])
            entry[metric] = Estimate.of_mean(values, seed=seed, key=f"{name}-{metric}").to_json()
        out[name] = entry
    if all(k in out for k in ("attack", "true_prompt", "random_embedding")):
        attack = np.array([r["attack"]["identity_similarity"] for r in rows])
        upper = np.array([r["true_prompt"]["identity_similarity"] for r in rows])
        lower = np.array([r["random_embedding"]["identity_similarity"] for r in rows])
        gap = upper.mean() - lower.mean()
        out["gap_closed"] = float((attack.mean() - lower.mean()) / gap) if gap > 0 else None
        out["attack_minus_random"] = Estimate.of_mean(attack - lower, seed=seed, key="attack-minus-random").to_json()
    return out


def image_grid(path: Path, private: dict[int, np.ndarray], generated: dict[int, dict[str, np.ndarray]],
               columns: tuple[str, ...] = ("true_prompt", "attack", "random_embedding"), per_cell: int = 2) -> Path:
    """PNG: one row per victim: private | true prompt | attack | random embedding (`per_cell` each)."""
    tiles = []
    for identity, conditions in generated.items():
        row = list(private[identity][:per_cell])
        for name in columns:
            row += list(conditions.get(name, np.zeros((per_cell, 32, 32, 3), np.uint8))[:per_cell])
        tiles.append(np.concatenate([np.pad(t, ((1, 1), (1, 1), (0, 0)), constant_values=255) for t in row], axis=1))
    grid = np.concatenate(tiles, axis=0) if tiles else np.zeros((34, 34, 3), np.uint8)
    img = Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST)
    tmp = path.with_suffix(".tmp.png")
    img.save(tmp)
    tmp.replace(path)
    return path

