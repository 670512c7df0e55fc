"""The server role: validates what arrives, trains the ControlNet, checkpoints atomically.

Backward-free (split-controlnet.md §6): the ControlNet minus its hint block runs on h with zero text context, the
frozen UNet runs from s0 (or from conv_in(x_t), computed here from the public weights), the loss is
the MSE to the received target and only the ControlNet learns; nothing is sent back.
Vanilla (split-controlnet.md §5): the ControlNet minus hint block and conv_in runs on the client's `control`; the
server returns ∂L/∂control to each client.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from privdiff.runs.files import atomic_replace
from privdiff.runs.folder import SPLIT_CHECKPOINT_FILE
from privdiff.split.config import SplitConfig
from privdiff.split.messages import (
    FORWARD_REPLY,
    FORWARD_REQUEST,
    GRADIENT_PUSH,
    Message,
    Received,
)
from privdiff.split.models import (
    PublicModels,
    build_split_controlnet,
    controlnet_residuals,
    save_split_controlnet,
    unet_from_stem,
)
from privdiff.split.validation import Limits, MessageValidator, Refused, TensorRule

log = logging.getLogger("privdiff.split")



def reply_rules(config: SplitConfig, models: PublicModels) -> dict[str, TensorRule]:
    """The allow-list of a forward.reply: exact names, dtypes and per-example shapes (split-controlnet.md §8.1)."""
    p = config.protocol
    latent = models.latent_shape(config.data.image_size)
    stem = (models.stem_channels, *latent[1:])
    if p.design == "vanilla":
        return {"control": TensorRule("float32", stem), "s0": TensorRule("float32", stem),
                "t": TensorRule("int64", ()), "text_embedding": TensorRule("float32", models.text_shape),
                "target": TensorRule("float32", latent)}
    rules = {"h": TensorRule("float16" if p.precision == "fp16" else "float32", latent),
             "t": TensorRule("int64", ()), "target": TensorRule("float32", latent)}
    rules["s0" if p.send == "s0" else "x_t"] = TensorRule("float32", stem if p.send == "s0" else latent)
    if p.send_zero_text:
        rules["text_embedding"] = TensorRule("float32", models.text_shape)
    return rules


@dataclass
class Batch:
    client_id: str
    tensors: dict[str, np.ndarray]


@dataclass
class StepResult:
    loss: float
    pushes: list[Message] = field(default_factory=list)


class SplitServer:
    def __init__(self, config: SplitConfig, models: PublicModels, keys: dict[str, bytes]) -> None:
        self.config = config
        self.models = models
        self.design = config.protocol.design
        self.controlnet = build_split_controlnet(models.unet, models.vae_factor, config.train.seed)
        client_side = ("controlnet_cond_embedding.",) + (("conv_in.",) if self.design == "vanilla" else ())
        trainable = []
        for name, param in self.controlnet.named_parameters():
            param.requires_grad_(not name.startswith(client_side))
            if param.requires_grad:
                trainable.append(param)
        self.trainable = trainable
        self.optimizer = torch.optim.AdamW(trainable, lr=config.train.learning_rate,
                                           weight_decay=config.train.weight_decay)
        limits = Limits(max_batch=config.protocol.max_batch, max_abs_value=config.protocol.max_abs_value,
                        t_min=config.protocol.t_start, t_max=models.num_train_timesteps - 1)
        self.validator = MessageValidator(FORWARD_REPLY, reply_rules(config, models), dict(keys), limits,
                                          zero_tensors=("text_embedding",) if self.design == "backward-free" else ())
        self.round = 0          # request rounds issued
        self.step = 0           # optimiser steps made
        self.log: list[dict] = []

    @property
    def client_ids(self) -> list[str]:
        return sorted(self.validator.keys)

    @property
    def max_message_bytes(self) -> int:
        return self.validator.max_bytes

    def requests(self) -> list[Message]:
        """One forward.request per client for the current round."""
        return [Message(FORWARD_REQUEST, cid, self.round, self.round,
                        meta={"batch_size": self.config.train.request_size}) for cid in self.client_ids]

    def receive(self, item: Received | Refused, client: object = "?") -> Batch | None:
        """A validated batch, or None after logging and counting the refusal (state untouched)."""
        if isinstance(item, Refused):
            self.validator.refuse(item, client)
            return None
        try:
            tensors = self.validator.validate(item, self.round)
        except Refused as refusal:
            self.validator.refuse(refusal, item.header.get("client_id", client))
            return None
        return Batch(item.header["client_id"], tensors)

    # -- training --------------------------------------------------------------------------------------
    def loss(self, batches: list[Batch]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The MSE of ε̂ on the concatenated batches, and (vanilla) the `control` leaves per batch."""
        t = torch.cat([torch.from_numpy(b.tensors["t"]) for b in batches])
        target = torch.cat([torch.from_numpy(b.tensors["target"]) for b in batches])
        size = target.shape[0]
        if self.design == "vanilla":
            leaves = [torch.from_numpy(b.tensors["control"]).requires_grad_(True) for b in batches]
            sample = torch.cat(leaves)
            context = torch.cat([torch.from_numpy(b.tensors["text_embedding"]) for b in batches])
            down, mid = controlnet_residuals(self.controlnet, sample, t, context, skip_conv_in=True)
        else:
            leaves = []
            sample = torch.cat([torch.from_numpy(b.tensors["h"]) for b in batches]).float()
            context = torch.zeros((size, *self.models.text_shape))
            down, mid = controlnet_residuals(self.controlnet, sample, t, context, skip_conv_in=False)
        if "s0" in batches[0].tensors:
            s0 = torch.cat([torch.from_numpy(b.tensors["s0"]) for b in batches])
        else:
            with torch.no_grad():
                s0 = self.models.unet.conv_in(torch.cat([torch.from_numpy(b.tensors["x_t"]) for b in batches]))
        prediction = unet_from_stem(self.models.unet, s0, t, context, down, mid)
        return torch.nn.functional.mse_loss(prediction.float(), target.float()), leaves

    def train_step(self, batches: list[Batch]) -> StepResult:
        """One optimiser step on every valid batch of the round; vanilla: the gradient pushes."""
        self.optimizer.zero_grad(set_to_none=True)
        loss, leaves = self.loss(batches)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        pushes = [Message(GRADIENT_PUSH, b.client_id, self.round, self.round,
                          tensors={"gradient": leaf.grad.contiguous().numpy()})
                  for b, leaf in zip(batches, leaves)]
        return StepResult(float(loss.detach()), pushes)

    def step_batches(self, batches: list[Batch]) -> list[list[Batch]]:
        """The server steps of one round: vanilla one step on everything; backward-free the round's
        examples in order, cut into `train.batch_size` pieces, `train.passes` times."""
        size, passes = self.config.train.batch_size, self.config.train.passes
        if self.design == "vanilla" or (size is None and passes == 1):
            return [batches]
        merged = {k: np.concatenate([b.tensors[k] for b in batches]) for k in batches[0].tensors}
        total = len(merged["t"])
        size = size or total
        pieces = [[Batch("+".join(b.client_id for b in batches), {k: v[i:i + size] for k, v in merged.items()})]
                  for i in range(0, total, size)]
        return pieces * passes

    def end_round(self, row: dict) -> None:
        self.log.append(row)
        self.round += 1

    # -- state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"controlnet": {k: v.detach().clone() for k, v in self.controlnet.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "round": self.round, "step": self.step,
                "validator": self.validator.state_dict(), "log": list(self.log)}

    def load_state_dict(self, state: dict) -> None:
        self.controlnet.load_state_dict(state["controlnet"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.round, self.step = int(state["round"]), int(state["step"])
        self.validator.load_state_dict(state["validator"])
        self.log = list(state["log"])

    def state_hash(self) -> str:
        """sha256 of the serialised training state (what a refused message must never change)."""
        buffer = io.BytesIO()
        torch.save(self.state_dict(), buffer)
        return hashlib.sha256(buffer.getvalue()).hexdigest()

    def save_checkpoint(self, folder: Path) -> None:
        atomic_replace(Path(folder) / SPLIT_CHECKPOINT_FILE, lambda tmp: torch.save(self.state_dict(), tmp))

    def load_checkpoint(self, folder: Path) -> bool:
        path = Path(folder) / SPLIT_CHECKPOINT_FILE
        if not path.exists():
            return False
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return True

    def save_controlnet(self, folder: Path) -> None:
        p = self.config.protocol
        save_split_controlnet(self.controlnet, Path(folder), {
            "design": p.design, "activation": p.activation, "precision": p.precision, "t_start": p.t_start,
            "send": p.send, "zero_text_context": self.design == "backward-free"})


__all__ = ["Batch", "SPLIT_CHECKPOINT_FILE", "SplitServer", "StepResult", "reply_rules"]
