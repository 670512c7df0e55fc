"""Condition fidelity of a split-trained ControlNet (evaluation.md §8), next to its floor and ceiling.

Generation runs on the trusted evaluator (the client side): the UNet gets the real prompt, the
ControlNet zero text (split-controlnet.md §6.3). The floor is the untrained ControlNet (zero convolutions, so
the base model alone) with the same seeds; the ceiling is the real target images.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline

from privdiff.data.examples import ImageDataset
from privdiff.metrics.condition import condition_fidelity
from privdiff.metrics.estimate import Estimate
from privdiff.split.config import SplitConfig
from privdiff.split.models import (
    BackwardFreeControlNet,
    PublicModels,
    build_split_controlnet,
)


def controlnet_pipeline(models: PublicModels, controlnet) -> StableDiffusionControlNetPipeline:
    pipe = StableDiffusionControlNetPipeline(
        vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer, unet=models.unet,
        controlnet=controlnet, scheduler=DDIMScheduler.from_config(models.scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe: StableDiffusionControlNetPipeline, dataset: ImageDataset, num_samples: int, steps: int,
             guidance_scale: float, seed: int, prompt: str = "zero",
             batch_size: int = 32) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(generated uint8 (N, H, W, 3), conditions uint8 (N, H, W, 3), captions) for the first N triples.

    `prompt`: "zero" gives the UNet the all-zero text context it was trained with (prompt-free
    generation); "real" gives it the caption's embedding.
    """
    examples = dataset.examples[:num_samples]
    images = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        conditions = torch.from_numpy(np.stack([ex.conditioning for ex in chunk])).permute(0, 3, 1, 2).float() / 255
        if prompt == "zero":
            length, width = pipe.tokenizer.model_max_length, pipe.unet.config.cross_attention_dim
            text = {"prompt_embeds": torch.zeros(len(chunk), length, width),
                    "negative_prompt_embeds": torch.zeros(len(chunk), length, width)}
        else:
            text = {"prompt": [ex.caption for ex in chunk]}
        out = pipe(**text, image=conditions, num_inference_steps=steps,
                   guidance_scale=guidance_scale, output_type="np",
                   generator=torch.Generator().manual_seed(seed + start))
        images.append((np.clip(out.images, 0, 1) * 255).round().astype(np.uint8))
    return (np.concatenate(images), np.stack([ex.conditioning for ex in examples]), [ex.caption for ex in examples])


def as_inference_controlnet(controlnet, config: SplitConfig, models: PublicModels):
    """The training ControlNet wrapped for the pipeline (backward-free: h computed from c and x_t)."""
    if config.protocol.design != "backward-free":
        return controlnet
    wrapped = BackwardFreeControlNet.from_config(controlnet.config)
    wrapped.load_state_dict(controlnet.state_dict())
    return wrapped.bind(models.vae, config.protocol.activation, config.protocol.precision).eval()


def evaluate_condition_fidelity(controlnet, config: SplitConfig, models: PublicModels, test: ImageDataset,
                                untrained: bool = True) -> dict:
    """Edge SSIM (plus disk IoU and colour accuracy on `fill`) of the trained ControlNet, the untrained
    floor and the real-image ceiling, on the same test conditions and seeds."""
    e = config.eval
    n = min(e.num_samples, len(test))

    def score(model) -> dict:
        pipe = controlnet_pipeline(models, as_inference_controlnet(model, config, models))
        generated, conditions, captions = generate(pipe, test, n, e.num_inference_steps, e.guidance_scale, e.seed,
                                                   e.prompt)
        return condition_fidelity(generated, conditions, captions, seed=e.seed)

    result = {"num_samples": n, "prompt": e.prompt, "trained": score(controlnet)}
    if untrained:
        result["untrained"] = score(build_split_controlnet(models.unet, models.vae_factor, config.train.seed))
        result["trained_minus_untrained"] = paired_difference(result["trained"], result["untrained"], e.seed)
    targets = np.stack([ex.image for ex in test.examples[:n]])
    result["ceiling"] = condition_fidelity(targets, np.stack([ex.conditioning for ex in test.examples[:n]]),
                                           [ex.caption for ex in test.examples[:n]], seed=e.seed)
    return result


def paired_difference(trained: dict, untrained: dict, seed: int) -> dict:
    """Mean per-image differences (same conditions, same seeds) of edge SSIM and, on `fill`, disk IoU,
    with bootstrap 95 % intervals."""
    out = {}
    for metric in ("edge_ssim", "disk_iou"):
        if metric not in trained or metric not in untrained:
            continue
        a = np.asarray([np.nan if v is None else v for v in trained[metric]["per_image"]], dtype=np.float64)
        b = np.asarray([np.nan if v is None else v for v in untrained[metric]["per_image"]], dtype=np.float64)
        diff = (a - b)[~(np.isnan(a) | np.isnan(b))]
        out[metric] = Estimate.of_mean(diff, resamples=1000, seed=seed, key=f"{metric}_difference").to_json()
    return out


__all__ = ["paired_difference", "as_inference_controlnet", "controlnet_pipeline", "evaluate_condition_fidelity", "generate"]
