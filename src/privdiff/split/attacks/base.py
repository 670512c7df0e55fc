"""What every attack on split learning shares (split-controlnet.md §9): the server's view, the truth it is scored
against, and one interface.

Victims are drawn by the real client code: an `Observer` runs a client on a dataset, sends real
forward replies through the wire format and decodes them as the server would (`Observation`), and
keeps the private draws the client made them from for scoring (`Truth`, from `SplitClient.release`). An attacker
builds its own training pairs the same way on public data with a seed of its own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from privdiff.data.builtin import BUILTIN_DATASETS
from privdiff.data.examples import ImageDataset
from privdiff.errors import ConfigError, PrivdiffError
from privdiff.registry import Registry
from privdiff.split.config import SplitConfig
from privdiff.split.messages import encode, parse
from privdiff.split.models import PublicModels
from privdiff.split.setup import make_client

PUBLIC_SEED = 7919  # the attacker's auxiliary fill triples: same generator, another seed (split-controlnet.md §3)


@dataclass
class Observation:
    """What the server received for a batch: the decoded forward-reply tensors (float32, t int64)."""

    design: str
    tensors: dict[str, torch.Tensor]

    @property
    def t(self) -> torch.Tensor:
        return self.tensors["t"]

    def __len__(self) -> int:
        return int(self.t.shape[0])


@dataclass
class Truth:
    """The client's private side of the same batch (never available to an attack)."""

    images: torch.Tensor      # (B, 3, H, W) in [0, 1]
    conditions: torch.Tensor  # (B, 3, H, W) in [0, 1]
    z0: torch.Tensor          # scaled image latent actually used (clipped when hardened)
    z_c: torch.Tensor | None  # condition latent actually used (clipped and noised when hardened); vanilla: None
    x_t: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor


@dataclass
class Reconstruction:
    """An attack's output: images and/or conditions in [0, 1], and anything it measured on the way."""

    images: torch.Tensor | None = None
    conditions: torch.Tensor | None = None
    diagnostics: dict = field(default_factory=dict)


@dataclass
class AttackData:
    """Everything public: frozen models, the protocol (its settings are public), auxiliary triples."""

    config: SplitConfig
    models: PublicModels
    public: ImageDataset
    seed: int = 0

    @property
    def design(self) -> str:
        return self.config.protocol.design


class SplitAttack:
    """One attack on what the server receives, in three phases: `fit` uses only public data;
    `engage` acts on the victim's training before the observation (a malicious server, e.g. FSHA;
    honest-but-curious attacks do nothing there); `reconstruct` reads one observation (plus whatever
    the earlier phases learned)."""

    name: ClassVar[str]
    designs: ClassVar[tuple[str, ...]] = ("backward-free", "vanilla")

    def fit(self, data: AttackData) -> None:
        self.data = data

    def engage(self, observer: "Observer") -> dict | None:
        """Acts as the victim's server before it is observed; returns what it measured (None: passive)."""
        return None

    def reconstruct(self, observation: Observation) -> Reconstruction:
        raise NotImplementedError


SPLIT_ATTACKS: Registry[type[SplitAttack]] = Registry("split attack")  # the key is the CLI word (`--attack`)


def check_observation(attack: SplitAttack, observation: Observation) -> None:
    """Refuses an observation the fitted attack cannot read (not fitted, other design, other tensors)."""
    data = getattr(attack, "data", None)
    if data is None:
        raise PrivdiffError(f"{attack.name}: call fit(data) before reconstruct")
    if observation.design != data.design:
        raise ConfigError(f"{attack.name}: fitted for the {data.design} design, observation is {observation.design}")
    wanted = {"s0" if data.config.protocol.send == "s0" else "x_t", "t", "target",
              "h" if data.design == "backward-free" else "control"}
    if missing := sorted(wanted - set(observation.tensors)):
        raise ConfigError(f"{attack.name}: observation lacks {', '.join(missing)} (protocol settings differ from fit)")


def public_triples(config: SplitConfig, count: int) -> ImageDataset:
    """The attacker's auxiliary data: fill triples from a seed no client uses."""
    return BUILTIN_DATASETS[config.data.name](config.data.image_size, count, PUBLIC_SEED)


class Observer:
    """Runs the real client on `dataset` and returns (what the server saw, what was true) per batch."""

    def __init__(self, config: SplitConfig, models: PublicModels, dataset: ImageDataset, secret_seed: int) -> None:
        self.config = config
        self.client = make_client(config, models, "victim", b"k" * 32, dataset, secret_seed)

    def next(self, batch_size: int, round_: int = 0) -> tuple[Observation, Truth]:
        parts = []
        for start in range(0, batch_size, self.config.protocol.max_batch):
            parts.append(self._one(min(self.config.protocol.max_batch, batch_size - start), round_))
        if len(parts) == 1:
            return parts[0]
        observation = Observation(parts[0][0].design, {k: torch.cat([p[0].tensors[k] for p in parts])
                                                       for k in parts[0][0].tensors})
        truth = Truth(**{f.name: None if getattr(parts[0][1], f.name) is None
                         else torch.cat([getattr(p[1], f.name) for p in parts]) for f in dataclasses.fields(Truth)})
        return observation, truth

    def _one(self, batch_size: int, round_: int) -> tuple[Observation, Truth]:
        client = self.client
        release = client.release(round_, batch_size)
        received = parse(encode(release.message), 1 << 40)
        tensors = {}
        for name in received.specs:
            array = np.array(received.load(name))
            tensors[name] = torch.from_numpy(array if name == "t" else array.astype(np.float32))
        draws = release.draws
        truth = Truth(images=(draws.images + 1) / 2, conditions=draws.conditions, z0=draws.z0, z_c=release.z_c,
                      x_t=draws.x_t, noise=draws.noise, t=draws.t)
        client.abandon_forward()  # nobody pushes a gradient for an observed forward
        return Observation(self.config.protocol.design, tensors), truth


__all__ = ["AttackData", "Observation", "Observer", "PUBLIC_SEED", "Reconstruction", "SPLIT_ATTACKS", "SplitAttack", "Truth",
           "check_observation", "public_triples"]
