"""Settings of a split-learning run (split-controlnet.md §12 defaults), loaded like every other privdiff config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from privdiff.config import (
    DATASET_PATH,
    PATH,
    ConfigRoot,
    DataConfig,
    DataSelection,
    ModelConfig,
    RuntimeConfig,
    choice_checks,
    load_config,
    raise_first_failure,
)

Design = Literal["backward-free", "vanilla"]
DESIGNS: tuple[str, ...] = get_args(Design)


@dataclass
class SplitSelection(DataSelection):
    """What the split run adds to the selection: how the clients share it, and a held-out test set."""

    shard: Literal["iid", "colour"] = "iid"  # iid (by index) | colour (non-IID: by circle colour, fill only)
    test_examples: int = 256      # held-out triples for condition fidelity (a different seed)
    test_seed: int = 1


@dataclass
class SplitDataConfig(DataConfig, SplitSelection):
    """The finetune run's `DataConfig` with the split additions and its own defaults.

    Dataclass fields follow the reversed MRO (DataSelection, SplitSelection, DataConfig), so the
    additions sit before `max_image_pixels`, where a split run's config.yaml has always had them.
    """

    name: str = field(default="fill", metadata=DATASET_PATH)  # a built-in dataset with conditions, or an imagefolder
    num_examples: int = 2000      # training triples, sharded over the clients


@dataclass
class ProtocolConfig:
    design: Design = "backward-free"  # backward-free (nothing goes back) | vanilla (gradients go back)
    t_start: int = 5               # timestep policy: t ~ U{t_start, ..., T-1}
    activation: Literal["identity", "symsigmoid"] = "symsigmoid"  # on z_c + x_t (backward-free)
    precision: Literal["fp16", "fp32"] = "fp16"  # wire precision of h (backward-free)
    send: Literal["s0", "x_t"] = "s0"  # s0 (frozen conv_in(x_t), as the reference) | x_t (33x smaller)
    send_zero_text: bool = False   # true: send the reference's all-zero text tensor (byte parity)
    max_batch: int = 64            # B_max of the validation rules
    max_abs_value: float = 1.0e4
    # Hardened option (split-controlnet.md §10): off by default, i.e. the protocol as published.
    target_noise: float = 0.0      # s: send target n + η, η ~ N(0, s²I), instead of n (0 = off)
    latent_clip: float | None = None  # R: z0 <- z0·min(1, R/||z0||) per example (required with target_noise)
    condition_clip: float | None = None  # R_c: clip z_c per example, then add ξ ~ N(0, s_c²I)
    condition_noise: float = 0.0   # s_c (requires condition_clip)
    delta: float = 1.0e-5          # δ of the per-sample local-DP ε reported for the hardened option


@dataclass
class SplitTrainConfig:
    clients: int = 2
    request_size: int = 8          # examples each client sends per round ("batch per request")
    batch_size: int | None = None  # examples per server step; null = one step on the whole round
    passes: int = 1                # server steps over each round's examples (backward-free only):
                                   # amortises a slow transport's round trip (Flower: seconds)
    steps: int = 2000              # server optimiser steps
    learning_rate: float = 3.0e-3  # server AdamW; for the tiny base (split-controlnet.md §12 says 1e-4, which learned no
                                   # visible control within 500 steps here); SD-scale runs: ~1e-5 (reference)
    weight_decay: float = 1.0e-2
    client_learning_rate: float = 1.0e-4  # vanilla only: the client's hint block and conv_in
    checkpoint_every: int = 200
    log_every: int = 10
    seed: int = 0                  # server-side seed (model init); clients derive secret seeds


@dataclass
class SplitEvalConfig:
    num_samples: int = 256         # paired (same conditions and seeds) for trained and untrained
    num_inference_steps: int = 20
    guidance_scale: float = 1.0
    prompt: Literal["real", "zero"] = "real"  # what the UNet gets: real (the reference's inference: the prompt to
                                   # the UNet, zeros to the ControlNet) | zero (prompt-free, as trained)
    seed: int = 0


@dataclass
class SplitConfig(ConfigRoot):
    output_dir: str = field(default="runs/split", metadata=PATH)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: SplitDataConfig = field(default_factory=SplitDataConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    train: SplitTrainConfig = field(default_factory=SplitTrainConfig)
    eval: SplitEvalConfig = field(default_factory=SplitEvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)  # the CPU in fp32 for now (`require_cpu_fp32`)

    def validate(self) -> "SplitConfig":
        p, t, d = self.protocol, self.train, self.data
        checks = [
            *choice_checks(self),
            (0 <= p.t_start <= 998, "protocol.t_start must be in [0, 998]"),
            (p.design == "backward-free" or p.send == "s0", "protocol.send: x_t exists only in the backward-free design"),
            (p.max_batch >= 1, "protocol.max_batch must be >= 1"),
            (p.max_abs_value > 0, "protocol.max_abs_value must be > 0"),
            (p.target_noise >= 0 and p.condition_noise >= 0, "protocol.target_noise and condition_noise must be >= 0"),
            (p.target_noise == 0 or (p.latent_clip is not None and p.latent_clip > 0),
             "protocol.target_noise needs protocol.latent_clip R > 0 (the guarantee bounds ||z0|| by R)"),
            (p.condition_noise == 0 or (p.condition_clip is not None and p.condition_clip > 0),
             "protocol.condition_noise needs protocol.condition_clip R_c > 0"),
            (p.latent_clip is None or p.latent_clip > 0, "protocol.latent_clip must be > 0"),
            (p.condition_clip is None or p.condition_clip > 0, "protocol.condition_clip must be > 0"),
            (p.target_noise == 0 or p.design == "backward-free",
             "protocol.target_noise is a backward-free option (vanilla sends its gradients' inputs anyway)"),
            (0 < p.delta < 1, "protocol.delta must be in (0, 1)"),
            (t.clients >= 1, "train.clients must be >= 1"),
            (1 <= t.request_size <= p.max_batch, "train.request_size must be in [1, protocol.max_batch]"),
            (t.batch_size is None or t.batch_size >= 1, "train.batch_size must be >= 1 (or null)"),
            (t.passes >= 1, "train.passes must be >= 1"),
            (p.design == "backward-free" or (t.passes == 1 and t.batch_size is None),
             "vanilla makes one step per round (train.passes 1, train.batch_size null): "
             "each gradient goes back to the forward that made it"),
            (t.steps >= 1, "train.steps must be >= 1"),
            (t.learning_rate > 0 and t.client_learning_rate > 0, "learning rates must be > 0"),
            (t.weight_decay >= 0, "train.weight_decay must be >= 0"),
            (t.checkpoint_every >= 1 and t.log_every >= 1, "train.checkpoint_every and log_every must be >= 1"),
            (d.num_examples >= t.clients, "data.num_examples must be >= train.clients"),
            (d.test_examples >= 1, "data.test_examples must be >= 1"),
            (d.max_image_pixels >= 1, "data.max_image_pixels must be >= 1"),
            (d.image_size >= 8 and d.image_size % 8 == 0, "data.image_size must be a multiple of 8"),
            (self.eval.num_samples >= 1 and self.eval.num_inference_steps >= 1, "eval sizes must be >= 1"),
            (self.eval.guidance_scale >= 1, "eval.guidance_scale must be >= 1"),
        ]
        raise_first_failure(checks)
        return self


def load_split_config(path: str | None = None, overrides: list[str] | None = None) -> SplitConfig:
    return load_config(path, overrides, kind=SplitConfig)


__all__ = ["DESIGNS", "Design", "ProtocolConfig", "SplitConfig", "SplitDataConfig", "SplitEvalConfig",
           "SplitSelection", "SplitTrainConfig", "load_split_config"]
