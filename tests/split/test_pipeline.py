"""The trained ControlNet is saved with save_pretrained and loads into StableDiffusionControlNetPipeline
(split-controlnet.md §8.5), where it computes what the split training computed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionControlNetPipeline

from privdiff.errors import ModelError
from privdiff.split.activation import protect
from privdiff.split.models import (
    BackwardFreeControlNet,
    controlnet_residuals,
    load_split_controlnet,
)
from privdiff.split.run import build_simulation, train_rounds
from tests.split.conftest import split_config


def test_saved_controlnet_loads_into_the_diffusers_pipeline(tiny_pipeline_dir, public_models, tmp_path):
    server, transport = build_simulation(split_config(tiny_pipeline_dir), public_models)
    train_rounds(server, transport, tmp_path, steps=2, checkpoint_every=100)
    server.save_controlnet(tmp_path / "controlnet")
    controlnet = load_split_controlnet(tmp_path / "controlnet", public_models.vae)
    assert isinstance(controlnet, BackwardFreeControlNet)
    for (name, a), b in zip(server.controlnet.state_dict().items(), controlnet.state_dict().values()):
        assert torch.equal(a, b), name
    pipe = StableDiffusionControlNetPipeline.from_pretrained(str(tiny_pipeline_dir), controlnet=controlnet,
                                                             safety_checker=None, feature_extractor=None,
                                                             requires_safety_checker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    condition = torch.from_numpy(np.stack([ex.conditioning for ex in transport.clients["client-0"].shard.examples[:2]]))
    condition = condition.permute(0, 3, 1, 2).float() / 255
    images = pipe(prompt=["a red circle on a blue background"] * 2, image=condition, num_inference_steps=2,
                  guidance_scale=3.0, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()

    # inside the pipeline it does what training did: h from (E(2c - 1), x_t), zero text, no hint block
    x_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 700])
    prompt_embeds = torch.randn(2, *public_models.text_shape)
    with torch.no_grad():
        down, mid = controlnet(x_t, t, encoder_hidden_states=prompt_embeds, controlnet_cond=condition,
                               return_dict=False)
        z_c = public_models.vae.encode(2 * condition - 1).latent_dist.mode() * public_models.scaling_factor
        h = protect(z_c, x_t, "symsigmoid", "fp16").float()
        expected_down, expected_mid = controlnet_residuals(server.controlnet, h, t, torch.zeros_like(prompt_embeds),
                                                           skip_conv_in=False)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(down, expected_down))
    assert torch.allclose(mid, expected_mid, atol=1e-6)


def test_loading_a_plain_folder_is_refused(tmp_path):
    with pytest.raises(ModelError, match="not a privdiff split ControlNet"):
        load_split_controlnet(tmp_path, vae=None)
