"""Update matching: the gradient-inversion baseline of weights-attack.md §7.

Geiping et al. (*Inverting Gradients*, arXiv 2003.14053) optimise dummy data so that the update
it would cause matches the observed one. Here the observed update is the victim's adapter minus
theta_0 (the attacker's `delta`-mode assumption); the dummies are up to 5 image latents and one
prompt embedding; the simulation is `simulate_steps` plain gradient steps of the LoRA from
theta_0 on the dummies (differentiable, through `torch.func`); the mismatch is 1 - cosine
(scale-free, so the unknown number of steps and learning rate drop out) or the squared error.
With one simulated step this is the DLG-style match of Zhu, Liu, Han (arXiv 1906.08797).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor
from torch.func import functional_call

from privdiff.models.lora import add_lora
from privdiff.models.lora_math import LoRALayer, initial_layers, lora_modules
from privdiff.seeding import generator
from privdiff.weights.finetune import FinetuneBench


@dataclass(frozen=True)
class UpdateMatchingConfig:
    images: int = 5
    simulate_steps: int = 1
    simulate_lr: float = 1e-2
    iterations: int = 100
    learning_rate: float = 0.05
    loss: Literal["cosine", "l2"] = "cosine"
    draws: int = 2        # (noise, timestep) draws per dummy image in the simulated loss


@dataclass
class UpdateMatchingResult:
    images: np.ndarray          # (n, H, W, 3) uint8 decoded dummy images
    prompt: torch.Tensor        # (1, L, D) dummy prompt embedding
    history: list[float]


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def update_matching(bench: FinetuneBench, observed: list[LoRALayer], config: UpdateMatchingConfig,
                    seed: int = 0) -> UpdateMatchingResult:
    """Recovers dummy images and a prompt embedding whose simulated update matches `observed`."""
    unet = copy.deepcopy(bench.pipe.unet)
    unet.set_attn_processor(AttnProcessor())  # plain attention: SDPA on CPU has no double backward
    add_lora(unet, bench.recipe.lora_config())
    unet.requires_grad_(False)
    modules = lora_modules(unet)
    start = initial_layers(observed, bench.recipe.init_seed)
    names = []
    theta0 = {}
    for (name, _), layer in zip(modules, start, strict=True):
        theta0[f"{name}.lora_A.default.weight"] = layer.down
        theta0[f"{name}.lora_B.default.weight"] = layer.up
        names += [f"{name}.lora_A.default.weight", f"{name}.lora_B.default.weight"]
    target = _flat([t for o, s in zip(observed, start) for t in (o.down - s.down, o.up - s.up)])
    rng = generator(seed, "update-matching")
    shape = (config.images, *bench.latent_shape())
    latents = torch.randn(shape, generator=rng).requires_grad_(True)
    prompt = bench.class_context.clone().requires_grad_(True)
    noise = torch.randn((config.draws, *shape), generator=rng)
    steps = torch.randint(0, bench.pipe.scheduler.config.num_train_timesteps, (config.draws, config.images), generator=rng)
    optimiser = torch.optim.Adam([latents, prompt], lr=config.learning_rate, amsgrad=True)
    scheduler = bench.pipe.scheduler
    history = []
    for _ in range(config.iterations):
        params = {k: v.clone().requires_grad_(True) for k, v in theta0.items()}
        for _ in range(config.simulate_steps):
            loss = 0.0
            for d in range(config.draws):
                noisy = scheduler.add_noise(latents, noise[d], steps[d])
                pred = functional_call(unet, params, (noisy, steps[d]),
                                       {"encoder_hidden_states": prompt.expand(config.images, -1, -1)}).sample
                loss = loss + F.mse_loss(pred, noise[d])
            grads = torch.autograd.grad(loss / config.draws, [params[n] for n in names], create_graph=True)
            params = {n: params[n] - config.simulate_lr * g for n, g in zip(names, grads)}
        simulated = _flat([params[n] - theta0[n] for n in names])
        if config.loss == "cosine":
            # The observed update points downhill, the simulated one is minus a gradient: same direction.
            mismatch = 1 - F.cosine_similarity(simulated, target, dim=0)
        else:
            mismatch = (simulated - target).square().sum()
        optimiser.zero_grad(set_to_none=True)
        mismatch.backward()
        optimiser.step()
        history.append(mismatch.item())
    with torch.no_grad():
        decoded = bench.pipe.vae.decode(latents.detach() / bench.pipe.vae.config.scaling_factor).sample
    images = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return UpdateMatchingResult(images=images, prompt=prompt.detach(), history=history)
