"""Feature-space hijacking (spec §9.4; Pasquini, Ateniese, Bernaschi, arXiv 2012.02670).

A malicious server in the vanilla design does not have to push the task gradient back: it can push
any tensor of the right shape, and the client steps its own optimizer on it. FSHA uses that channel
to pull the client's hint block into a feature space the server chose and can invert:

- a pilot encoder f̃ (condition → feature) and its inverse f̃⁻¹ (feature → condition) are trained as
  an autoencoder on public conditions only;
- a critic D learns to tell the pilot's features f̃(public) from the client's features;
- the server pushes ∂(−D(client features))/∂control, so the client's optimizer moves its hint block
  towards features D takes for the pilot's; f̃⁻¹ then decodes the client's features.

The client's feature is taken as `control − s0` by default: the client's conv_in' starts as a copy of
the public UNet conv_in and s0 = UNet.conv_in(x_t) arrives in the same message, so the difference is
the hint block's output alone (exactly, until conv_in' drifts); the x_t term would otherwise be
noise the client could remove only by driving conv_in' to zero at its own learning rate.

Every round goes over the normal protocol: the server's forward.request, the real client's signed
forward.reply, the server's validation, and a `gradient.push` the client cannot tell from an honest
one (same name, dtype, shape, round). Not applicable to the backward-free design, whose client has no
downstream channel (`BackwardFreeClient.apply_gradient` refuses every push).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn

from privdiff.data.examples import ImageDataset, to_model_tensor
from privdiff.errors import ConfigError
from privdiff.seeding import generator
from privdiff.split.attacks.base import AttackData, Observation, Observer, Reconstruction, SplitAttack
from privdiff.split.messages import GRADIENT_PUSH, Message


def _stages(vae_factor: int) -> int:
    return int(math.log2(vae_factor))


class PilotEncoder(nn.Module):
    """f̃: condition (3, H, W) in [0, 1] → feature (C0, H/f, W/f), one stride-2 conv per factor 2.

    The output is `scale·tanh(·)`: the client reaches a feature distribution only as far as its own
    optimizer moves its weights, so the pilot's features are kept at a scale the client can reach.
    """

    def __init__(self, channels: int, vae_factor: int, width: int = 16, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.SiLU()]
        for _ in range(_stages(vae_factor)):
            layers += [nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU()]
            width *= 2
        layers.append(nn.Conv2d(width, channels, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.tanh(self.net(2 * condition - 1))


class PilotDecoder(nn.Module):
    """f̃⁻¹: feature → condition in [0, 1] (×2 nearest upsampling stages, sigmoid)."""

    def __init__(self, channels: int, vae_factor: int, width: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.SiLU()]
        for _ in range(_stages(vae_factor)):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, width // 2, 3, padding=1), nn.SiLU()]
            width //= 2
        layers.append(nn.Conv2d(width, 3, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(feature))

    def logits(self, feature: torch.Tensor) -> torch.Tensor:
        return self.net(feature)


class Critic(nn.Module):
    """D: feature → one score. No normalisation layers: the gradient penalty is per example."""

    def __init__(self, channels: int, side: int, width: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Flatten(), nn.Linear(2 * width * ((side + 1) // 2) ** 2, 1))

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.net(feature).squeeze(1)


def _conditions(dataset: ImageDataset) -> torch.Tensor:
    return (to_model_tensor(np.stack([ex.conditioning for ex in dataset.examples])) + 1) / 2


class FSHAAttack(SplitAttack):
    """The malicious vanilla server: fit the pilot on public conditions, then hijack the client
    round by round (`attack`), decoding its features with f̃⁻¹ (`reconstruct`).

    WGAN-GP, as in the FSHA paper: the critic's input gradient keeps a useful direction even while
    the client's features are far from the pilot's (at the start they are all zero, a point mass,
    where a saturated non-saturating GAN discriminator gives gradients of no use), and the penalty
    keeps it near unit norm, so the pushes stay well scaled over the whole run.
    """

    name = "fsha"
    designs = ("vanilla",)

    def __init__(self, *, batch_size: int = 32, pilot_lr: float = 3e-3, critic_lr: float = 1e-4,
                 gp_weight: float = 10.0, critic_steps: int = 2, pilot_steps: int = 1, pretrain_steps: int = 400,
                 residual: bool = True, feature_scale: float = 0.5) -> None:
        self.batch_size = batch_size
        self.pilot_lr = pilot_lr
        self.critic_lr = critic_lr
        self.gp_weight = gp_weight
        self.critic_steps = critic_steps      # critic updates per round (on that round's client features)
        self.pilot_steps = pilot_steps        # autoencoder updates per round after pretraining
        self.pretrain_steps = pretrain_steps  # autoencoder updates in `fit`, before any round
        self.residual = residual              # feature = control − s0 (else control itself)
        self.feature_scale = feature_scale
        self.step = 0

    # -- public data only ------------------------------------------------------------------------------
    def fit(self, data: AttackData) -> None:
        """Builds f̃, f̃⁻¹ and D and pretrains the autoencoder on the public conditions."""
        if data.design not in self.designs:
            raise ConfigError(f"fsha needs protocol.design=vanilla: the {data.design} client takes no "
                              "gradients from the server, so there is nothing to hijack (spec §9.4)")
        super().fit(data)
        models = data.models
        channels, side = models.stem_channels, models.latent_shape(data.config.data.image_size)[1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(data.seed)
            self.encoder = PilotEncoder(channels, models.vae_factor, scale=self.feature_scale)
            self.decoder = PilotDecoder(channels, models.vae_factor)
            self.critic = Critic(channels, side)
        self.public_conditions = _conditions(data.public)
        self.pilot_optimizer = torch.optim.Adam([*self.encoder.parameters(), *self.decoder.parameters()],
                                                lr=self.pilot_lr)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=self.critic_lr, betas=(0.5, 0.9))
        self.pretrain_loss = [self._pilot_step() for _ in range(self.pretrain_steps)]

    def _public_batch(self) -> torch.Tensor:
        g = generator(self.data.seed, "fsha-public", self.step)
        self.step += 1
        index = torch.randint(len(self.public_conditions), (self.batch_size,), generator=g)
        return self.public_conditions[index]

    def _pilot_step(self) -> float:
        condition = self._public_batch()
        # Cross-entropy, not MSE: thin white outlines on black are a few % of the pixels, and an MSE
        # autoencoder settles on the all-black image (measured: stuck at the black-image MSE).
        loss = nn.functional.binary_cross_entropy_with_logits(self.decoder.logits(self.encoder(condition)), condition)
        self.pilot_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.pilot_optimizer.step()
        return loss.item()

    def _critic_step(self, fake: torch.Tensor) -> float:
        with torch.no_grad():
            real = self.encoder(self._public_batch())
        n = min(len(real), len(fake))
        real, fake = real[:n], fake[:n]
        mix = torch.rand(n, 1, 1, 1, generator=generator(self.data.seed, "fsha-mix", self.step))
        between = (mix * real + (1 - mix) * fake).requires_grad_(True)
        slope = torch.autograd.grad(self.critic(between).sum(), between, create_graph=True)[0]
        penalty = ((slope.flatten(1).norm(dim=1) - 1) ** 2).mean()
        loss = self.critic(fake).mean() - self.critic(real).mean() + self.gp_weight * penalty
        self.critic_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.critic_optimizer.step()
        return loss.item()

    def feature(self, tensors: dict) -> torch.Tensor:
        """The client's feature in the pilot's space: control − s0 (or control)."""
        control = torch.as_tensor(tensors["control"]).float()
        return control - torch.as_tensor(tensors["s0"]).float() if self.residual else control

    def hijack_gradient(self, feature: torch.Tensor) -> torch.Tensor:
        """∂(−Σ D(feature))/∂control: what the client gets in place of ∂L/∂control (per example, so
        its size does not shrink with the batch)."""
        leaf = feature.detach().requires_grad_(True)
        (-self.critic(leaf).sum()).backward()
        return leaf.grad.detach()

    # -- the protocol ----------------------------------------------------------------------------------
    def round(self, server, transport) -> dict:
        """One hijacking round over the real protocol: request, validate, learn, push.

        `server` is a `SplitServer` of the vanilla design (used for its requests, validation and round
        counter only; its ControlNet is never trained), `transport` carries messages to the clients.
        """
        if server.design not in self.designs:
            raise ConfigError(f"fsha needs protocol.design=vanilla, the server runs {server.design}")
        replies = transport.exchange(server.requests())
        batches = [b for cid, item in replies if (b := server.receive(item, cid)) is not None]
        row = {"round": server.round, "clients": [b.client_id for b in batches]}
        if batches:
            features = [self.feature(b.tensors) for b in batches]
            fake = torch.cat(features)
            row["pilot_loss"] = [self._pilot_step() for _ in range(self.pilot_steps)][-1] if self.pilot_steps else None
            row["critic_loss"] = [self._critic_step(fake) for _ in range(self.critic_steps)][-1]
            pushes = [Message(GRADIENT_PUSH, b.client_id, server.round, server.round,
                              tensors={"gradient": self.hijack_gradient(f).contiguous().numpy()})
                      for b, f in zip(batches, features)]
            transport.push(pushes)
        server.end_round(row)
        return row

    def attack(self, server, transport, rounds: int, *, every: int = 0, holdout: ImageDataset | None = None,
               count: int = 64, victim: str | None = None, secret_seed: int = 0) -> dict:
        """Runs `rounds` hijacking rounds; every `every` rounds (and at 0 and the end) scores the
        condition reconstruction on the same held-out victim batch.

        The held-out batch is drawn by a fresh client on `holdout` that carries the victim's current
        weights (the experimenter's view, not the server's); its truth comes from the same draws.
        """
        from privdiff.split.attacks.scoring import references, score

        victim = victim or sorted(transport.clients)[0]
        history: list[dict] = []
        result = {"rounds": rounds, "victim": victim, "history": history}

        def evaluate(done: int, seconds: float) -> None:
            observation, truth = self.held_out(transport.clients[victim], holdout, count, secret_seed)
            if "references" not in result:
                result["references"] = {k: v["condition"]["all"]
                                        for k, v in references(truth, self.data.models, self.data.public).items()}
            condition = score(None, self.reconstruct(observation).conditions, truth)["condition"]["all"]
            history.append({"round": done, "seconds_per_round": seconds, **{m: condition[m]["value"]
                                                                            for m in ("ssim", "psnr", "mse")}})

        spent = 0.0
        if holdout is not None:
            evaluate(0, 0.0)
        for done in range(1, rounds + 1):
            started = time.perf_counter()
            self.round(server, transport)
            spent += time.perf_counter() - started
            if holdout is not None and (done == rounds or (every and done % every == 0)):
                evaluate(done, round(spent / done, 4))
        result["seconds_per_round"] = round(spent / max(rounds, 1), 4)
        return result

    def held_out(self, client, holdout: ImageDataset, count: int, secret_seed: int = 0):
        """(observation, truth) of `count` held-out examples through a copy of `client`'s weights."""
        observer = Observer(self.data.config, self.data.models, holdout, secret_seed)
        observer.client.trainable.load_state_dict(client.trainable.state_dict())
        return observer.next(count)

    @torch.no_grad()
    def reconstruct(self, observation: Observation) -> Reconstruction:
        feature = self.feature(observation.tensors)
        return Reconstruction(None, self.decoder(feature), {"feature_rms": float(feature.pow(2).mean().sqrt())})


__all__ = ["Critic", "FSHAAttack", "PilotDecoder", "PilotEncoder"]
