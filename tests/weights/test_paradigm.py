"""The encoder, its input modes and the step-embedding paradigm (weights-attack.md §11, tests 1-4)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from privdiff.data.identities import attack_split
from privdiff.models.load import load_pipeline
from privdiff.models.lora import add_lora, save_lora
from privdiff.weights.encoder import encoder_loss
from privdiff.weights.finetune import FinetuneBench, FinetuneRecipe
from privdiff.diffusion import draw_noise_and_timesteps
from privdiff.models.lora_math import initial_layers, live_layers, lora_modules, reset_lora
from privdiff.weights.inputs import batch_inputs, encoder_inputs
from privdiff.models.lora_math import LoRALayer, read_unet_lora, write_kohya
from privdiff.weights.paradigm import EncoderTrainer, EncoderTrainingConfig, build_encoder, embed_adapter

SHADOWS, VICTIMS = attack_split()


@pytest.fixture(scope="module")
def bench(tiny_pipeline_dir) -> FinetuneBench:
    torch.manual_seed(0)
    return FinetuneBench(load_pipeline(tiny_pipeline_dir), FinetuneRecipe(steps=4, prior_images=2), seed=0)


def _lora_params(unet: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in unet.named_parameters() if "lora_" in n}


def test_a_shadow_run_yields_one_pair_per_step_each_spent_once_with_clean_gradients(bench):
    trainer = EncoderTrainer(bench, EncoderTrainingConfig(budget_steps=4, pair_batch=3), SHADOWS[:1])
    base_state = {k: v.clone() for k, v in bench.pipe.unet.state_dict().items()}
    scratch_state = {k: v.clone() for k, v in trainer.scratch.state_dict().items()}
    encoder_start = [p.detach().clone() for p in trainer.params]
    pairs = trainer.shadow_run(SHADOWS[0], 4)
    assert [p.step for p in pairs] == [1, 2, 3, 4]
    # The fine-tune loss never reaches the encoder: no gradient, no change.
    assert all(p.grad is None for p in trainer.params)
    assert all(torch.equal(p, q) for p, q in zip(trainer.params, encoder_start))
    # Each pair holds its own theta_r: the fine-tune moved the adapter between steps.
    assert not torch.equal(pairs[0].layers[0].up, pairs[-1].layers[0].up)
    kept = [[(layer.down.clone(), layer.up.clone()) for layer in p.layers] for p in pairs]

    trainer.train_on(pairs)
    assert [u["pairs"] for u in trainer.updates] == [3, 1]
    assert sorted(r for u in trainer.updates for r in u["steps"]) == [1, 2, 3, 4]  # every pair exactly once
    assert trainer.pairs_used == 4
    # L_enc wrote no adapter gradient and changed no adapter: the pairs' theta_r, the scratch UNet
    # (every theta_r unloaded again) and the base are as before.
    assert all(p.grad is None for p in trainer.scratch.parameters())
    for pair, saved in zip(pairs, kept):
        assert all(torch.equal(layer.down, d) and torch.equal(layer.up, u) for layer, (d, u) in zip(pair.layers, saved))
    assert all(torch.equal(v, trainer.scratch.state_dict()[k]) for k, v in scratch_state.items())
    assert all(torch.equal(v, bench.pipe.unet.state_dict()[k]) for k, v in base_state.items())
    assert not all(torch.equal(p, q) for p, q in zip(trainer.params, encoder_start))  # the encoder learned


def test_the_batched_update_has_the_gradient_of_the_mean_pair_loss(bench):
    """The two-stage backward (dL/dz per pair, then through the encoder) equals plain autograd."""
    trainer = EncoderTrainer(bench, EncoderTrainingConfig(budget_steps=2, pair_batch=2), SHADOWS[:1])
    pairs = trainer.shadow_run(SHADOWS[0], 2)
    rng_state = trainer.rng.get_state()
    captured: list[torch.Tensor] = []
    trainer.optimizer.step = lambda: captured.extend(p.grad.clone() for p in trainer.params if p.grad is not None)
    trainer.update(pairs)

    # Reference: each pair on its own UNet copy, one ordinary backward of the mean loss.
    rng = torch.Generator().manual_seed(0)
    rng.set_state(rng_state)
    inputs = batch_inputs([encoder_inputs(p.layers, "delta", trainer.initial) for p in pairs])
    mu, logvar = trainer.encoder(inputs, torch.tensor([p.step for p in pairs]))
    z = trainer.encoder.sample(mu, logvar, rng)
    total = 0.0
    for k, pair in enumerate(pairs):
        unet = copy.deepcopy(trainer.scratch)
        for (_, m), layer in zip(lora_modules(unet), pair.layers):
            m.lora_A["default"].weight.data.copy_(layer.down)
            m.lora_B["default"].weight.data.copy_(layer.up)
        rows = torch.randint(0, len(pair.latents), (1,), generator=rng)
        noise, timesteps = draw_noise_and_timesteps(pair.latents[rows].shape, 1000, rng)
        noisy = bench.pipe.scheduler.add_noise(pair.latents[rows], noise, timesteps)
        total = total + F.mse_loss(unet(noisy, timesteps, encoder_hidden_states=z[k:k + 1]).sample, noise) / 2
    expected = [g for g in torch.autograd.grad(total, trainer.params, allow_unused=True) if g is not None]
    assert len(captured) == len(expected) > 0
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(captured, expected))


def test_end_of_run_pairs_use_full_runs_and_one_update_each(bench):
    trainer = EncoderTrainer(bench, EncoderTrainingConfig(budget_steps=8, pairs="end-of-run", step_token=False),
                             SHADOWS[:2])
    assert [run.steps for run in trainer.planned_runs()] == [4, 4]
    summary = trainer.train(show_progress=False)
    assert summary["pairs"] == 2 and summary["finetune_steps"] == 8
    assert [r["pairs"] for r in trainer.runs] == [1, 1]
    paradigm = EncoderTrainer(bench, EncoderTrainingConfig(budget_steps=8), SHADOWS[:2])
    lengths = [run.steps for run in paradigm.planned_runs()]
    assert sum(lengths) == 8 and all(1 <= s <= 4 for s in lengths)  # equal compute, s' ~ U{1..S}


def _saved_adapter(bench: FinetuneBench, tmp_path, steps: int = 3):
    unet = bench.finetune(VICTIMS[0], steps).unet
    path = tmp_path / "victim.safetensors"
    save_lora(path, unet, bench.recipe.lora_config())
    return unet, path


def test_encoder_has_one_tokenizer_per_matrix_and_prompt_shaped_output(bench, tmp_path):
    _, path = _saved_adapter(bench, tmp_path)
    layers = read_unet_lora(path)
    encoder = build_encoder(bench, EncoderTrainingConfig())
    assert sum(group.count for group in encoder.tokenizers) == 2 * len(layers) == len(encoder.config.matrix_shapes)
    z = embed_adapter(encoder, layers, "delta", bench.recipe.steps)
    pipe = bench.pipe
    assert z.shape == (1, pipe.tokenizer.model_max_length, pipe.unet.config.cross_attention_dim)
    # Each tokenizer reads its own matrix: changing one matrix changes the output.
    down = layers[0].down.clone()
    down[0, 0] += 1.0  # not a constant shift, which the tokenizers' instance norm removes
    bumped = [LoRALayer(layers[0].name, down, layers[0].up, layers[0].alpha)] + layers[1:]
    assert not torch.allclose(embed_adapter(encoder, bumped, "raw", 4), embed_adapter(encoder, layers, "raw", 4))


def test_diffusers_and_kohya_files_give_the_same_embedding(bench, tmp_path):
    _, path = _saved_adapter(bench, tmp_path)
    layers = read_unet_lora(path)
    kohya = write_kohya(tmp_path / "kohya.safetensors", layers)
    encoder = build_encoder(bench, EncoderTrainingConfig())
    for mode in ("delta", "raw", "canonical"):
        assert torch.allclose(embed_adapter(encoder, layers, mode, 4),
                              embed_adapter(encoder, read_unet_lora(kohya), mode, 4), atol=1e-6)


def test_delta_mode_is_zero_at_the_seeded_initialisation(bench):
    unet = copy.deepcopy(bench.pipe.unet)
    add_lora(unet, bench.recipe.lora_config())
    reset_lora(unet, bench.recipe.init_seed)
    layers = live_layers(unet)
    assert all(m.abs().max() == 0 for m in encoder_inputs(layers, "delta"))
    assert any(m.abs().max() > 0 for m in encoder_inputs(layers, "raw"))
    for live, start in zip(layers, initial_layers(layers, bench.recipe.init_seed)):
        assert torch.equal(live.down, start.down) and torch.equal(live.up, start.up)


def test_canonical_mode_ignores_the_lora_gauge(bench, tmp_path):
    unet, _ = _saved_adapter(bench, tmp_path)
    layers = live_layers(unet)
    gen = torch.Generator().manual_seed(3)
    rotated = []
    for layer in layers:
        m = torch.randn(layer.rank, layer.rank, generator=gen, dtype=torch.float64) + 3 * torch.eye(layer.rank, dtype=torch.float64)
        rotated.append(LoRALayer(layer.name, (m @ layer.down.double()).float(),
                                 (layer.up.double() @ torch.linalg.inv(m)).float(), layer.alpha))
    for a, b in zip(encoder_inputs(layers, "canonical"), encoder_inputs(rotated, "canonical")):
        # Singular vectors are unique up to sign; compare each row (one singular direction) up to sign.
        same = torch.minimum((a - b).abs().amax(1), (a + b).abs().amax(1))
        assert same.max() < 1e-3 * max(1.0, a.abs().max().item())
    assert not all(torch.allclose(a, b) for a, b in zip(encoder_inputs(layers, "raw"), encoder_inputs(rotated, "raw")))


def test_encoder_loss_is_the_noise_mse_without_kl_and_alignment():
    gen = torch.Generator().manual_seed(0)
    pred, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    mu, logvar = torch.randn(1, 16, 32, generator=gen), torch.randn(1, 16, 32, generator=gen)
    text = torch.randn(1, 16, 32, generator=gen)
    exact = F.mse_loss(pred, noise)
    assert torch.equal(encoder_loss(pred, noise, mu, logvar, 0.0, text, 0.0), exact)
    assert encoder_loss(pred, noise, mu, logvar, 1e-3, text, 0.0) > exact
    assert encoder_loss(pred, noise, mu, logvar, 0.0, text, 1.0) > exact
