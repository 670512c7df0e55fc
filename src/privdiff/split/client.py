"""The client roles: they hold the private (image, condition, prompt) triples and the secret randomness.

`BackwardFreeClient` (default, split-controlnet.md §6) is frozen and forward-only: no parameter requires grad, it
holds no optimizer and never calls backward. `VanillaClient` (split-controlnet.md §5) trains the ControlNet's hint
block and conv_in and applies the gradient the server pushes back.

A client's whole state is a few integers plus, for vanilla, its small trainable part: `state_dict`
returns it so that a stateless transport (Flower handlers) can keep it between messages. Every
private draw (which examples, posterior samples, t, n) comes from `generator(secret_seed, ...)`;
the seed never leaves the client, and a forward can be recomputed from (secret seed, seq).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from privdiff.data.examples import ImageDataset, to_model_tensor
from privdiff.errors import PrivdiffError
from privdiff.seeding import generator
from privdiff.split.accounting import ReleaseLedger
from privdiff.split.activation import protect
from privdiff.split.config import ProtocolConfig
from privdiff.split.messages import (
    FORWARD_REPLY,
    FORWARD_REQUEST,
    GRADIENT_ACK,
    GRADIENT_PUSH,
    Message,
    Received,
)
from privdiff.split.models import PublicModels, build_split_controlnet
from privdiff.split.timesteps import TimestepPolicy

log = logging.getLogger("privdiff.split")


class ProtocolError(PrivdiffError):
    """A message the client will not act on (wrong type, size or shape from the server)."""


@dataclass
class ForwardDraws:
    """The private part of one forward: which examples and every random draw made on them."""

    indices: list[int]
    images: torch.Tensor       # (B, 3, H, W) in [-1, 1]
    conditions: torch.Tensor   # (B, 3, H, W) in [0, 1]
    z0: torch.Tensor           # (B, C, h, w) scaled image latents (posterior samples; clipped when hardened)
    t: torch.Tensor            # (B,) int64
    noise: torch.Tensor        # (B, C, h, w)
    x_t: torch.Tensor          # (B, C, h, w)
    target: torch.Tensor       # what is sent as the target: noise, or noise + η when hardened (split-controlnet.md §10)
    generator: torch.Generator  # continues the same secret stream (condition latent sample)


def clip_per_example(z: torch.Tensor, bound: float) -> torch.Tensor:
    """z·min(1, R/||z||₂) per example (the sensitivity bound of the hardened option)."""
    norms = z.flatten(1).norm(dim=1).clamp_min(1e-12)
    return z * (bound / norms).clamp(max=1.0).view(-1, *([1] * (z.dim() - 1)))


@dataclass
class Release:
    """One forward reply and the private draws it was made from (kept by the client side only)."""

    message: Message
    draws: ForwardDraws
    z_c: torch.Tensor | None  # the condition latent as used (backward-free); None for vanilla


class SplitClient:
    """Common part: data shard, secret streams, request parsing, the noisy latent."""

    def __init__(self, client_id: str, key: bytes, models: PublicModels, shard: ImageDataset,
                 protocol: ProtocolConfig, secret_seed: int) -> None:
        if any(ex.conditioning is None for ex in shard.examples):
            raise PrivdiffError(f"client {client_id}: every example needs a conditioning image")
        self.client_id = client_id
        self.key = key
        self.models = models
        self.shard = shard
        self.protocol = protocol
        self.secret_seed = secret_seed
        self.policy = TimestepPolicy(protocol.t_start, models.num_train_timesteps)
        self.seq = 0            # last seq sent
        self.position = 0       # examples consumed from the shard stream
        self.ledger = None
        if protocol.latent_clip is not None or protocol.condition_clip is not None:
            self.ledger = ReleaseLedger(models.scheduler.alphas_cumprod, target_noise=protocol.target_noise,
                                        latent_clip=protocol.latent_clip, condition_clip=protocol.condition_clip,
                                        condition_noise=protocol.condition_noise, delta=protocol.delta)
        self.images = to_model_tensor(np.stack([ex.image for ex in shard.examples]))            # (N, 3, H, W)
        self.conditions = (to_model_tensor(np.stack([ex.conditioning for ex in shard.examples])) + 1) / 2

    # -- state a stateless transport carries between messages -----------------------------------------
    def state_dict(self) -> dict:
        state = {"seq": self.seq, "position": self.position}
        if self.ledger is not None:
            state["ledger"] = self.ledger.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.seq, self.position = int(state["seq"]), int(state["position"])
        if self.ledger is not None and "ledger" in state:
            self.ledger.load_state_dict(state["ledger"])

    # -- protocol --------------------------------------------------------------------------------------
    def handle(self, request: Received) -> Message:
        """Answers one server message (forward.request, or gradient.push for vanilla)."""
        kind = request.header.get("type")
        if kind == FORWARD_REQUEST:
            batch_size = request.header.get("meta", {}).get("batch_size")
            round_ = request.header.get("round")
            if not (isinstance(batch_size, int) and 1 <= batch_size <= self.protocol.max_batch
                    and isinstance(round_, int)):
                raise ProtocolError(f"client {self.client_id}: malformed forward.request")
            return self.forward(round_, batch_size).signed(self.key)
        if kind == GRADIENT_PUSH:
            return self.apply_gradient(request).signed(self.key)
        raise ProtocolError(f"client {self.client_id}: unexpected message type {str(kind)[:40]!r}")

    def forward(self, round_: int, batch_size: int) -> Message:
        return self.release(round_, batch_size).message

    def release(self, round_: int, batch_size: int) -> Release:
        """The next forward reply, with the draws behind it (an experimenter's view for scoring attacks)."""
        raise NotImplementedError

    def apply_gradient(self, push: Received) -> Message:
        raise ProtocolError(f"client {self.client_id}: the {self.protocol.design} design takes no gradients")

    def abandon_forward(self) -> None:
        """Forgets a released forward that no gradient will answer (an observer's victims): nothing to
        forget in the backward-free design."""

    def _batch_indices(self, position: int, batch_size: int) -> list[int]:
        """The next examples of the client's secret shuffled stream (one permutation per epoch)."""
        n = len(self.shard)
        orders: dict[int, torch.Tensor] = {}  # one permutation per epoch the batch touches
        out = []
        for p in range(position, position + batch_size):
            epoch, offset = divmod(p, n)
            if epoch not in orders:
                orders[epoch] = torch.randperm(n, generator=generator(self.secret_seed, "order", epoch))
            out.append(int(orders[epoch][offset]))
        return out

    @torch.no_grad()
    def _draw(self, seq: int, position: int, batch_size: int) -> ForwardDraws:
        g = generator(self.secret_seed, "forward", seq)
        indices = self._batch_indices(position, batch_size)
        images, conditions = self.images[indices], self.conditions[indices]
        vae, scale = self.models.vae, self.models.scaling_factor
        z0 = vae.encode(images).latent_dist.sample(generator=g) * scale
        if self.protocol.latent_clip is not None:
            z0 = clip_per_example(z0, self.protocol.latent_clip)
        t = self.policy.sample(batch_size, g)
        noise = torch.randn(z0.shape, generator=g)
        x_t = self.models.scheduler.add_noise(z0, noise, t)
        target = noise
        if self.protocol.target_noise > 0:  # η drawn only when on: the published protocol's stream is unchanged
            target = noise + self.protocol.target_noise * torch.randn(z0.shape, generator=g)
        return ForwardDraws(indices, images, conditions, z0, t, noise, x_t, target, g)

    @torch.no_grad()
    def condition_latent(self, draws: ForwardDraws) -> torch.Tensor:
        """z_c = E(2c − 1)·scale (posterior sample); hardened: clipped to R_c plus ξ ~ N(0, s_c²I)."""
        vae, scale = self.models.vae, self.models.scaling_factor
        z_c = vae.encode(2 * draws.conditions - 1).latent_dist.sample(generator=draws.generator) * scale
        if self.protocol.condition_clip is not None:
            z_c = clip_per_example(z_c, self.protocol.condition_clip)
            if self.protocol.condition_noise > 0:
                z_c = z_c + self.protocol.condition_noise * torch.randn(z_c.shape, generator=draws.generator)
        return z_c

    def _reply(self, round_: int, tensors: dict[str, torch.Tensor]) -> Message:
        return Message(FORWARD_REPLY, self.client_id, round_, self.seq,
                       tensors={k: v.detach().cpu().contiguous().numpy() for k, v in tensors.items()},
                       meta={"design": self.protocol.design})


class BackwardFreeClient(SplitClient):
    """Forward only (split-controlnet.md §6): sends h, s0 (or x_t), t and the target noise; nothing comes back."""

    @torch.no_grad()
    def release(self, round_: int, batch_size: int) -> Release:
        self.seq += 1
        draws = self._draw(self.seq, self.position, batch_size)
        self.position += batch_size
        z_c = self.condition_latent(draws)
        if self.ledger is not None:
            self.ledger.record(draws.indices, draws.t.tolist())
        tensors = {"h": protect(z_c, draws.x_t, self.protocol.activation, self.protocol.precision),
                   "t": draws.t, "target": draws.target}
        if self.protocol.send == "s0":
            tensors["s0"] = self.models.unet.conv_in(draws.x_t)
        else:
            tensors["x_t"] = draws.x_t
        if self.protocol.send_zero_text:  # the reference's zeros_like(e(p)): shape only, no prompt
            tensors["text_embedding"] = torch.zeros((batch_size, *self.models.text_shape))
        return Release(self._reply(round_, tensors), draws, z_c)


class VanillaClient(SplitClient):
    """Vanilla split learning (split-controlnet.md §5): trains the hint block and conv_in from pushed gradients.

    The forward is recomputed from (secret seed, seq, position) when the gradient arrives, so the
    client keeps no activations between messages.
    """

    def __init__(self, *args, init_seed: int, learning_rate: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        template = build_split_controlnet(self.models.unet, self.models.vae_factor, init_seed)
        self.hint = template.controlnet_cond_embedding
        self.conv_in = template.conv_in
        self.trainable = torch.nn.ModuleDict({"hint": self.hint, "conv_in": self.conv_in})
        self.optimizer = torch.optim.AdamW(self.trainable.parameters(), lr=learning_rate)
        self.pending: tuple[int, int, int, int] | None = None  # (round, seq, position, batch) awaiting a gradient

    def state_dict(self) -> dict:
        return {**super().state_dict(), "trainable": self.trainable.state_dict(),
                "optimizer": self.optimizer.state_dict(), "pending": self.pending}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.trainable.load_state_dict(state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.pending = tuple(state["pending"]) if state["pending"] is not None else None

    def _control(self, draws: ForwardDraws) -> torch.Tensor:
        return self.conv_in(draws.x_t) + self.hint(draws.conditions)   # (B, C0, h, w)

    def _text(self, indices: list[int]) -> torch.Tensor:
        tok = self.models.tokenizer([self.shard.examples[i].caption for i in indices], padding="max_length",
                                    truncation=True, max_length=self.models.tokenizer.model_max_length,
                                    return_tensors="pt")
        with torch.no_grad():
            return self.models.text_encoder(tok.input_ids)[0]

    def release(self, round_: int, batch_size: int) -> Release:
        self.seq += 1
        draws = self._draw(self.seq, self.position, batch_size)
        self.pending = (round_, self.seq, self.position, batch_size)
        self.position += batch_size
        with torch.no_grad():
            tensors = {"control": self._control(draws), "s0": self.models.unet.conv_in(draws.x_t), "t": draws.t,
                       "text_embedding": self._text(draws.indices), "target": draws.target}
        return Release(self._reply(round_, tensors), draws, None)

    def apply_gradient(self, push: Received) -> Message:
        if self.pending is None:
            raise ProtocolError(f"client {self.client_id}: gradient without a pending forward")
        round_, seq, position, batch_size = self.pending
        expected = (batch_size, self.models.stem_channels, *self.models.latent_shape(self.shard.examples[0].image.shape[0])[1:])
        spec = push.specs.get("gradient")
        if (set(push.specs) != {"gradient"} or spec.dtype != "float32" or tuple(spec.shape) != expected
                or push.header.get("round") != round_):
            raise ProtocolError(f"client {self.client_id}: gradient push does not match the pending forward")
        gradient = torch.from_numpy(np.array(push.load("gradient")))
        if not torch.isfinite(gradient).all():
            raise ProtocolError(f"client {self.client_id}: non-finite gradient")
        draws = self._draw(seq, position, batch_size)
        self.optimizer.zero_grad(set_to_none=True)
        self._control(draws).backward(gradient)
        self.optimizer.step()
        self.pending = None
        self.seq += 1
        return Message(GRADIENT_ACK, self.client_id, round_, self.seq)

    def abandon_forward(self) -> None:
        """The pending forward will get no gradient: clear it and move the sequence on, as an
        acknowledged push would."""
        self.pending = None
        self.seq += 1


__all__ = ["BackwardFreeClient", "ForwardDraws", "Release", "clip_per_example", "ProtocolError", "SplitClient", "VanillaClient"]
