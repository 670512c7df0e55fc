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
from privdiff.weights.inputs import encoder_inputs, initial_layers, live_layers, reset_lora
from privdiff.weights.lora_math import LoRALayer, read_unet_lora, write_kohya
from privdiff.weights.paradigm import EncoderTrainer, EncoderTrainingConfig, build_encoder, embed_adapter

SHADOWS, VICTIMS = attack_split()


@pytest.fixture(scope="module")
def bench(tiny_pipeline_dir) -> FinetuneBench:
    torch.manual_seed(0)
    return FinetuneBench(load_pipeline(tiny_pipeline_dir), FinetuneRecipe(steps=4, prior_images=2), seed=0)


def _lora_params(unet: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in unet.named_parameters() if "lora_" in n}


def test_a_shadow_run_makes_one_encoder_update_per_step_with_clean_gradients(bench):
    trainer = EncoderTrainer(bench, EncoderTrainingConfig(budget_steps=4), SHADOWS[:1])
    base_state = {k: v.clone() for k, v in bench.pipe.unet.state_dict().items()}
    checks: list[dict] = []
    encoder_after: list[torch.Tensor] = []
    real_update = trainer.update

    def watched_update(unet, task, step, rng):
        lora = _lora_params(unet)
        record = {"step": step,
                  # The fine-tune loss never reaches the encoder: no gradient, and unchanged since its last update.
                  "encoder_grads_none": all(p.grad is None for p in trainer.params),
                  "encoder_untouched": (not encoder_after or all(torch.equal(p, q) for p, q in zip(trainer.params, encoder_after))),
                  "lora_grad_before": {n: None if p.grad is None else p.grad.clone() for n, p in lora.items()},
                  "lora_before": {n: p.detach().clone() for n, p in lora.items()},
                  "frozen": {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_" not in n}}
        loss = real_update(unet, task, step, rng)
        record["lora_grad_after"] = {n: None if p.grad is None else p.grad.clone() for n, p in lora.items()}
        record["lora_after"] = {n: p.detach().clone() for n, p in lora.items()}
        record["unet_frozen_same"] = all(torch.equal(p, record["frozen"][n]) for n, p in unet.named_parameters()
                                         if "lora_" not in n)
        encoder_after[:] = [p.detach().clone() for p in trainer.params]
        checks.append(record)
        return loss

    trainer.update = watched_update
    steps = trainer.shadow_run(SHADOWS[0], 4)
    assert steps == [1, 2, 3, 4]
    assert [u["step"] for u in trainer.updates] == [1, 2, 3, 4]
    for record in checks:
        assert record["encoder_grads_none"] and record["encoder_untouched"]
        for name, before in record["lora_grad_before"].items():
            after = record["lora_grad_after"][name]
            assert before is not None and torch.equal(before, after), name  # L_enc wrote no LoRA gradient
            assert torch.equal(record["lora_before"][name], record["lora_after"][name])
        assert record["unet_frozen_same"]
    # The fine-tune moved the adapter, and the encoder moved with every update.
    assert not torch.equal(checks[0]["lora_before"][next(iter(checks[0]["lora_before"]))],
                           checks[-1]["lora_after"][next(iter(checks[-1]["lora_after"]))])
    assert all(torch.equal(v, bench.pipe.unet.state_dict()[k]) for k, v in base_state.items())  # base untouched


def test_end_of_run_pairs_use_full_runs_and_one_update_each(bench):
    trainer = EncoderTrainer(bench, EncoderTrainingConfig(budget_steps=8, pairs="end-of-run", step_token=False),
                             SHADOWS[:2])
    assert trainer.run_lengths() == [4, 4]
    summary = trainer.train(show_progress=False)
    assert summary["pairs"] == 2 and summary["finetune_steps"] == 8
    paradigm = EncoderTrainer(bench, EncoderTrainingConfig(budget_steps=8), SHADOWS[:2])
    lengths = paradigm.run_lengths()
    assert sum(lengths) == 8 and all(1 <= s <= 4 for s in lengths)  # equal compute, s' ~ U{1..S}


def _saved_adapter(bench: FinetuneBench, tmp_path, steps: int = 3):
    unet = bench.finetune(VICTIMS[0], steps)
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
    bumped = [LoRALayer(layers[0].name, layers[0].down + 1.0, layers[0].up, layers[0].alpha)] + layers[1:]
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
