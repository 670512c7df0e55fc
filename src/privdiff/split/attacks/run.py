"""Running one attack against one protocol configuration and scoring it (split-controlnet.md §9.5).

The victims are held-out triples (the `test` split of the run's dataset) sent by the real client
code with a secret seed the attacker never sees; the attacker fits on public triples of another seed.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from privdiff.errors import ConfigError
from privdiff.figures import plt, png_bytes
from privdiff.seeding import derive_seed
from privdiff.split.attacks import attack_class
from privdiff.split.attacks.base import (
    AttackData,
    Observer,
    Reconstruction,
    SplitAttack,
    Truth,
    public_triples,
)
from privdiff.split.attacks.scoring import references, score
from privdiff.split.config import SplitConfig
from privdiff.split.models import PublicModels
from privdiff.split.setup import load_triples


@dataclasses.dataclass
class AttackOutcome:
    result: dict                  # JSON-ready: scores, references, latent errors, timings
    reconstruction: Reconstruction
    truth: Truth


def _latent_errors(reconstruction: Reconstruction, truth: Truth) -> dict:
    latents = reconstruction.diagnostics.get("latents", {})
    out = {}
    for name, guess in latents.items():
        real = getattr(truth, name)
        out[name] = {"relative_error": float((guess - real).norm() / real.norm().clamp_min(1e-12)),
                     "error_std": float((guess - real).std())}
    return out


def _plain(value):
    """Diagnostics without tensors, for JSON."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not isinstance(v, torch.Tensor) and k != "latents"}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def evaluate_attack(attack: str | SplitAttack, config: SplitConfig, models: PublicModels, *, victims: int = 64,
                    public_examples: int = 512, seed: int = 0) -> AttackOutcome:
    """Fits `attack` on public data, observes `victims` held-out triples, scores the reconstructions."""
    attack = attack_class(attack)() if isinstance(attack, str) else attack
    if config.protocol.design not in attack.designs:
        raise ConfigError(f"attack '{attack.name}' targets the {' / '.join(attack.designs)} design, "
                          f"not {config.protocol.design}")
    private = load_triples(config, test=True)
    if victims > len(private):
        raise ConfigError(f"--victims {victims} exceeds the {len(private)} held-out triples (data.test_examples)")
    public = public_triples(config, public_examples)
    began = time.perf_counter()
    attack.fit(AttackData(config, models, public, seed))
    fitted = time.perf_counter()
    observer = Observer(config, models, private, derive_seed(seed, "victim-secret"))
    attack.engage(observer)  # a malicious server acts on the victim's training first (FSHA); others pass
    observation, truth = observer.next(victims)
    reconstruction = attack.reconstruct(observation)
    done = time.perf_counter()
    result = {
        "attack": attack.name, "design": config.protocol.design,
        "protocol": dataclasses.asdict(config.protocol), "victims": victims, "public_examples": public_examples,
        "seed": seed, "scores": score(reconstruction.images, reconstruction.conditions, truth, seed=seed),
        "references": references(truth, models, public, seed=seed),
        "latent_errors": _latent_errors(reconstruction, truth),
        "diagnostics": _plain(reconstruction.diagnostics),
        "fit_seconds": round(fitted - began, 2), "reconstruct_seconds": round(done - fitted, 2),
    }
    return AttackOutcome(result, reconstruction, truth)


def reconstruction_grid(outcome: AttackOutcome, count: int = 8) -> bytes:
    """PNG: rows truth image, reconstructed image, truth condition, reconstructed condition."""

    rec, truth = outcome.reconstruction, outcome.truth
    rows = [("image", truth.images), ("reconstructed", rec.images), ("condition", truth.conditions),
            ("reconstructed", rec.conditions)]
    rows = [(label, x) for label, x in rows if x is not None]
    count = min(count, len(truth.t))
    fig, axes = plt.subplots(len(rows), count, figsize=(1.2 * count, 1.3 * len(rows)), squeeze=False)
    for r, (label, tensor) in enumerate(rows):
        for c in range(count):
            ax = axes[r][c]
            ax.imshow(tensor[c].detach().clamp(0, 1).permute(1, 2, 0).numpy())
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=7)
            if r == 0:
                ax.set_title(f"t={int(truth.t[c])}", fontsize=7)
    fig.suptitle(f"{outcome.result['attack']} on {outcome.result['design']}", fontsize=8)
    fig.tight_layout()
    return png_bytes(fig)


__all__ = ["AttackOutcome", "evaluate_attack", "reconstruction_grid"]
