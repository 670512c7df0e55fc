"""Training the encoder on shadow fine-tunes: the step-embedding paradigm (weights-attack.md §5).

One shadow run = one public identity fine-tuned for s' ~ U{1..S} steps through the shared
training loop; after every fine-tune step r the loop's `on_step` hook records the pair
(theta_r, r). Each pair is spent in exactly one encoder update: z = Enc(Delta theta_r, r), and
L_enc is the noise-prediction error of the shadow's UNet at theta_r conditioned on z, on one of
the shadow's images. A run of s' steps thus yields s' supervised pairs for the cost of the
fine-tune the attacker runs anyway. The pairs of a few consecutive runs are shuffled together
and batched [D], so consecutive updates do not all see one identity.

Gradient hygiene (which the reference code gets wrong, §5): the encoder's gradient is taken
with `torch.autograd.grad` with respect to z and then the encoder's parameters only, so nothing
is written into any LoRA's `.grad`; the fine-tune loss never sees the encoder.

The ablation (i) of §7 is `pairs="end-of-run"` without the step token: full S-step runs and one
pair per run, at the same budget of shadow fine-tune steps.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from safetensors.torch import load_file, save_file

from privdiff.data.identities import attack_split
from privdiff.defences import defend_layers
from privdiff.diffusion import draw_noise_and_timesteps
from privdiff.diffusion.task import DiffusionTask
from privdiff.errors import ModelError
from privdiff.models.lora import add_lora
from privdiff.models.lora_math import (
    DEFAULT_INIT_SEED,
    LoRALayer,
    initial_layers,
    live_layers,
    lora_modules,
)
from privdiff.runs.files import atomic_replace, atomic_write_text
from privdiff.seeding import generator
from privdiff.weights.encoder import EncoderConfig, WeightEncoder, encoder_loss
from privdiff.weights.finetune import FinetuneBench
from privdiff.weights.inputs import (
    InputMode,
    batch_inputs,
    encoder_inputs,
    matrix_shapes,
)

ENCODER_WEIGHTS = "encoder.safetensors"
ENCODER_CONFIG = "encoder.json"
# The defences of `privdiff.defences` an encoder can train against (DP-LoRA changes training, not the file).
PostHocDefence = Literal["weight-noise", "prune", "rank"]


@dataclass(frozen=True)
class EncoderTrainingConfig:
    """How the attacker trains the encoder.

    Attributes:
        mode: what the encoder reads (`delta`, `raw`, `canonical`; §5).
        step_token: feed r to the encoder (False: the no-step-token ablations).
        pairs: `every-step` (the paradigm) or `end-of-run` (one pair per full S-step run).
        budget_steps: total shadow fine-tune steps: the compute unit compared across ablations.
            40,000 (about 200 shadow identities at S = 400): at 5,000 the encoder only reached
            the random-embedding bound on the face base; with the default recipe, 40,000 puts the
            attack's interval above the random bound's on 180 victims (docs/weights-attack.md).
        learning_rate, weight_decay: AdamW of the encoder (weights-attack.md §6: 5e-3, 5e-4).
        kl_weight, align_weight: beta_KL and lambda_align (0 and 0: the later reference code).
        encoder_images: instance images per pair in an update (spec: one).
        concurrent_runs: shadow runs whose pairs are pooled and shuffled before the encoder sees
            them (1: the reference's order, one shadow's pairs in sequence).
        pair_batch: pairs per encoder update (each pair is used once).
        conv_channels: width of the tokenizers' conv stages.
        defence, defence_knob: train against shadows whose adapters pass through this post-hoc
            defence (the adaptive attack of §8); None = undefended shadows.
        seed: seeds the run lengths, noise draws and the encoder's initialisation.
    """

    mode: InputMode = "delta"
    step_token: bool = True
    pairs: Literal["every-step", "end-of-run"] = "every-step"
    budget_steps: int = 40_000
    learning_rate: float = 5e-3
    weight_decay: float = 5e-4
    kl_weight: float = 0.0
    align_weight: float = 0.0
    encoder_images: int = 1
    concurrent_runs: int = 8
    pair_batch: int = 8
    conv_channels: int = 32
    defence: PostHocDefence | None = None
    defence_knob: float | None = None
    seed: int = 0

    @property
    def label(self) -> str:
        return (f"{self.pairs}, {'step token' if self.step_token else 'no step token'}, {self.mode}"
                + (f", adaptive to {self.defence} {self.defence_knob:g}" if self.defence else ""))


TrainedEncoder = tuple[WeightEncoder, EncoderTrainingConfig]  # an encoder with the settings it was trained under


@contextmanager
def loaded_layers(unet: torch.nn.Module, layers: list[LoRALayer]) -> Iterator[None]:
    """Temporarily writes `layers` into the UNet's adapter (canonical order), then restores it."""
    modules = lora_modules(unet)
    saved = [(m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone())
             for _, m in modules]
    with torch.no_grad():
        for (_, m), layer in zip(modules, layers, strict=True):
            m.lora_A["default"].weight.copy_(layer.down)
            m.lora_B["default"].weight.copy_(layer.up)
    try:
        yield
    finally:
        with torch.no_grad():
            for (_, m), (down, up) in zip(modules, saved):
                m.lora_A["default"].weight.copy_(down)
                m.lora_B["default"].weight.copy_(up)


def adapted_base(bench: FinetuneBench) -> torch.nn.Module:
    """A copy of the base UNet with a fresh adapter of the recipe's layout."""
    unet = copy.deepcopy(bench.pipe.unet)
    add_lora(unet, bench.recipe.lora_config())
    return unet


def reference_layers(bench: FinetuneBench) -> list[LoRALayer]:
    """The adapter layout of the recipe."""
    return live_layers(adapted_base(bench))


def build_encoder(bench: FinetuneBench, config: EncoderTrainingConfig,
                  layout: list[LoRALayer] | None = None) -> WeightEncoder:
    """A fresh encoder for the recipe's adapter layout, centred on real prompt embeddings
    ("a face of {trigger}" for the first 256 shadow identities; the attacker can encode any prompt).

    Args:
        layout: the recipe's adapter layers when the caller already has them (default: built on a
            copy of the base UNet).
    """
    pipe = bench.pipe
    enc_config = EncoderConfig(matrix_shapes=matrix_shapes(layout or reference_layers(bench)),
                               context_length=pipe.tokenizer.model_max_length,
                               context_dim=pipe.unet.config.cross_attention_dim,
                               hidden=pipe.text_encoder.config.hidden_size,
                               conv_channels=config.conv_channels, kl_weight=config.kl_weight)
    torch.manual_seed(config.seed)  # the encoder's initialisation
    encoder = WeightEncoder(enc_config, pipe.text_encoder)
    encoder.set_context_prior(*bench.prompt_statistics(attack_split()[0][:256]))
    return encoder


@dataclass
class Pair:
    """One supervised pair of the paradigm: a shadow's adapter after fine-tune step r."""

    step: int                  # r
    layers: list[LoRALayer]    # theta_r
    latents: torch.Tensor      # the shadow's instance latents (the denoising targets)
    context: torch.Tensor      # its true prompt embedding (only the alignment term reads it)


class EncoderTrainer:
    """Runs shadow fine-tunes and updates the encoder from their intermediate adapters.

    Every fine-tune step of a shadow run yields one pair (Delta theta_r, r), used in exactly one
    encoder update. The pairs of `concurrent_runs` consecutive runs are pooled and shuffled, and
    each update takes `pair_batch` of them [D]: updating on one shadow's pairs in sequence (the
    reference's order) makes the encoder output the current shadow's identity whatever the input,
    which measured below the random-embedding bound on held-out identities.

    Args:
        bench: the base model and fine-tune recipe (S = `bench.recipe.steps`).
        config: how the encoder is trained.
        shadows: the public identities the attacker fine-tunes (cycled in order).
    """

    def __init__(self, bench: FinetuneBench, config: EncoderTrainingConfig, shadows: list[int]) -> None:
        if not shadows:
            raise ValueError("no shadow identities to train the encoder on")
        self.bench, self.config, self.shadows = bench, config, list(shadows)
        # A frozen copy of the base with the recipe's adapter: each pair's theta_r is loaded into it.
        self.scratch = adapted_base(bench).requires_grad_(False).eval()
        layout = live_layers(self.scratch)
        self.encoder = build_encoder(bench, config, layout)
        # theta_0 is the same for every shadow run: drawn once, not at every update.
        self.initial = initial_layers(layout, bench.recipe.init_seed)
        self.params = self.encoder.trainable_parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=config.weight_decay,
                                           betas=(0.9, 0.999))
        self.rng = generator(config.seed, "encoder-updates")
        self.updates: list[dict[str, float]] = []  # one row per encoder update
        self.runs: list[dict[str, float]] = []     # one row per shadow run
        self.pairs_used = 0
        self.finetune_steps = 0
        self.encoder_seconds = 0.0
        self.finetune_seconds = 0.0

    def update(self, pairs: list[Pair]) -> float:
        """One encoder update on a batch of pairs; returns the batch's mean L_enc.

        z comes from one batched encoder pass; each pair's loss is computed on the scratch UNet
        holding that pair's theta_r and differentiated with respect to z only, and the summed
        dL/dz is then pushed through the encoder alone: no adapter ever receives a gradient.
        """
        began = time.perf_counter()
        cfg, rng, scheduler = self.config, self.rng, self.bench.pipe.scheduler
        layers = [defend_layers(p.layers, cfg.defence, cfg.defence_knob, rng) if cfg.defence else p.layers
                  for p in pairs]
        inputs = batch_inputs([encoder_inputs(each, cfg.mode, self.initial) for each in layers])
        mu, logvar = self.encoder(inputs, torch.tensor([p.step for p in pairs]) if cfg.step_token else None)
        z = self.encoder.sample(mu, logvar, rng)
        leaves = [t.detach().requires_grad_(True) for t in (z, mu, logvar)]
        totals = [torch.zeros_like(t) for t in leaves]
        loss_sum = 0.0
        for k, (pair, adapter) in enumerate(zip(pairs, layers)):
            z_k, mu_k, logvar_k = (leaf[k:k + 1] for leaf in leaves)
            rows = torch.randint(0, len(pair.latents), (cfg.encoder_images,), generator=rng)
            latents = pair.latents[rows]
            noise, timesteps = draw_noise_and_timesteps(latents.shape, scheduler.config.num_train_timesteps, rng)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            with loaded_layers(self.scratch, adapter):  # the gradient is taken before theta_r is unloaded
                pred = self.scratch(noisy, timesteps, encoder_hidden_states=z_k.expand(len(rows), -1, -1)).sample
                loss = encoder_loss(pred, noise, mu_k, logvar_k, cfg.kl_weight,
                                    pair.context if cfg.align_weight else None, cfg.align_weight,
                                    standardized_mu=self.encoder.standardized(mu_k) if cfg.kl_weight else None)
                grads = torch.autograd.grad(loss / len(pairs), leaves, allow_unused=True)
            for total, g in zip(totals, grads):
                if g is not None:
                    total += g
            loss_sum += loss.item()
        # The encoder only: nothing else is in the graph of (z, mu, logvar).
        grads = torch.autograd.grad((z, mu, logvar), self.params, grad_outputs=totals, allow_unused=True)
        for p, g in zip(self.params, grads):
            p.grad = g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        mean_loss = loss_sum / len(pairs)
        self.updates.append({"pairs": len(pairs), "steps": [p.step for p in pairs], "loss": mean_loss})
        self.pairs_used += len(pairs)
        self.encoder_seconds += time.perf_counter() - began
        return mean_loss

    def shadow_run(self, identity: int, steps: int) -> list[Pair]:
        """Fine-tunes `identity` for `steps` steps; returns its pairs (every step, or the last only)."""
        pairs: list[Pair] = []
        every = self.config.pairs == "every-step"

        def on_step(r: int, unet: torch.nn.Module, task: DiffusionTask) -> None:
            if every or r == steps:
                pairs.append(Pair(r, live_layers(unet), task.latents, task.contexts[:1]))

        began = time.perf_counter()
        self.bench.finetune(identity, steps, on_step=on_step, seed_key=("shadow", len(self.runs), identity))
        self.finetune_seconds += time.perf_counter() - began
        self.finetune_steps += steps
        self.runs.append({"identity": identity, "steps": steps, "pairs": len(pairs)})
        return pairs

    def train_on(self, pairs: list[Pair]) -> None:
        """Shuffles a pool of pairs and spends each in exactly one update of `pair_batch` pairs."""
        order = torch.randperm(len(pairs), generator=self.rng).tolist()
        batch = self.config.pair_batch
        for start in range(0, len(order), batch):
            self.update([pairs[i] for i in order[start:start + batch]])

    def run_lengths(self) -> list[int]:
        """The shadow runs' lengths: s' ~ U{1..S} (every-step) or S (end-of-run), summing to the budget."""
        S, budget = self.bench.recipe.steps, self.config.budget_steps
        rng = generator(self.config.seed, "run-lengths")
        lengths = []
        while sum(lengths) < budget:
            draw = int(torch.randint(1, S + 1, (1,), generator=rng)) if self.config.pairs == "every-step" else S
            lengths.append(min(draw, budget - sum(lengths)))
        return lengths

    @property
    def trained(self) -> TrainedEncoder:
        """(encoder, training config): what `load_encoder` returns for a saved one."""
        return self.encoder, self.config

    def train(self, *, show_progress: bool = True,
              on_run: Callable[[int, "EncoderTrainer"], None] | None = None) -> dict:
        """Runs the whole budget; returns a summary (pairs, pairs/s, seconds)."""
        lengths = self.run_lengths()
        self.encoder.train()
        began = time.perf_counter()
        columns = (TextColumn("[bold]training the encoder"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("L_enc {task.fields[loss]:.4f}"), TimeRemainingColumn())
        pool: list[Pair] = []
        with Progress(*columns, disable=not show_progress) as progress:
            bar = progress.add_task("encoder", total=sum(lengths), loss=float("nan"))
            for index, steps in enumerate(lengths):
                pool += self.shadow_run(self.shadows[index % len(self.shadows)], steps)
                if (index + 1) % self.config.concurrent_runs == 0 or index + 1 == len(lengths):
                    self.train_on(pool)
                    pool = []
                    progress.update(bar, loss=self.updates[-1]["loss"])
                progress.update(bar, advance=steps)
                if on_run is not None:
                    on_run(index + 1, self)
        self.encoder.eval()
        return self.summary(time.perf_counter() - began)

    def summary(self, wall: float) -> dict:
        pairs = self.pairs_used
        last = self.updates[-max(1, 400 // self.config.pair_batch):]
        return {"config": asdict(self.config), "label": self.config.label, "shadow_runs": len(self.runs),
                "distinct_shadows": len({r["identity"] for r in self.runs}), "pairs": pairs,
                "encoder_updates": len(self.updates),
                "finetune_steps": self.finetune_steps, "wall_time_s": wall,
                "encoder_seconds": self.encoder_seconds, "finetune_seconds": self.finetune_seconds,
                "pairs_per_s": pairs / wall if wall else None,
                "encoder_pairs_per_s": pairs / self.encoder_seconds if self.encoder_seconds else None,
                "finetune_s_per_step": self.finetune_seconds / max(1, self.finetune_steps),
                "final_loss": sum(u["loss"] for u in last) / len(last) if last else None}


@torch.no_grad()
def embed_adapter(encoder: WeightEncoder, layers: list[LoRALayer], mode: InputMode, step: int | None,
                  *, sample: bool = False, rng: torch.Generator | None = None,
                  init_seed: int = DEFAULT_INIT_SEED) -> torch.Tensor:
    """z for one adapter at attack time (1, L, D_ctx): the mean (default) or a sample.

    Raises:
        ModelError: the adapter's layout differs from the one the encoder was trained on.
    """
    shapes = matrix_shapes(layers)
    if shapes != encoder.config.matrix_shapes:
        raise ModelError(f"the adapter has {len(shapes)} matrices of shapes {_short(shapes)}, the encoder was "
                         f"trained on {len(encoder.config.matrix_shapes)} of {_short(encoder.config.matrix_shapes)}")
    encoder.eval()
    inputs = encoder_inputs(layers, mode, initial_layers(layers, init_seed) if mode == "delta" else None)
    mu, logvar = encoder(batch_inputs([inputs]), None if step is None else torch.tensor([step]))
    return encoder.sample(mu, logvar, rng) if sample else mu


def _short(shapes: tuple[tuple[int, int], ...]) -> str:
    distinct = sorted(set(shapes))
    return ", ".join(f"{r}x{d}" for r, d in distinct)


def save_encoder(folder: Path, encoder: WeightEncoder, training: EncoderTrainingConfig) -> None:
    """Writes the encoder (safetensors) and its configs (JSON) into `folder`, atomically each."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in encoder.state_dict().items()}
    atomic_replace(folder / ENCODER_WEIGHTS, lambda tmp: save_file(state, str(tmp)))
    atomic_write_text(folder / ENCODER_CONFIG, json.dumps(
        {"encoder": encoder.config.to_dict(), "training": asdict(training)}, indent=2))


def load_encoder(folder: Path, bench: FinetuneBench) -> TrainedEncoder:
    """Reads an encoder saved by `save_encoder` (the frozen backbone comes from `bench`'s base model).

    Raises:
        ModelError: missing or mismatched files.
    """
    try:
        raw = json.loads((folder / ENCODER_CONFIG).read_text())
        training = EncoderTrainingConfig(**raw["training"])
        encoder = WeightEncoder(EncoderConfig.from_dict(raw["encoder"]), bench.pipe.text_encoder)
        encoder.load_state_dict(load_file(str(folder / ENCODER_WEIGHTS)))
    except (OSError, KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ModelError(f"{folder}: not a usable encoder ({str(err).splitlines()[0]})") from None
    return encoder.eval(), training
