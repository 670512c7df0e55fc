"""The DP-LoRA step: noise calibration, weights moving, empty batches, chunking, Poisson rate (§13.4, 8-10)."""

import math

import pytest
import torch

from privdiff.diffusion import squared_error
from privdiff.distributed import World
from privdiff.dp.poisson import poisson_rows
from privdiff.errors import ModelError
from privdiff.seeding import generator
from privdiff.training.loop import make_batch
from privdiff.training.methods.dp_lora import plan_privacy
from tests.dp.conftest import LINEAR_TARGETS, capture_updates, dp_config, prepared_method, run_step, zero_gradients


def test_zero_gradient_noise_std_is_sigma_c_over_b(make_task):
    """All per-example gradients zero: G/B is pure noise with std σC/B (within 5 %, 200 steps)."""
    task = make_task(16)
    cfg = dp_config(noise_multiplier=1.7, max_grad_norm=0.01, expected_batch_size=4, noise_multiplicity=1)
    cfg.train.log_every = 1000
    method = prepared_method(task, cfg)
    zero_gradients(method)
    updates = capture_updates(method)
    for step in range(200):
        run_step(method, task, step)
    values = torch.cat([torch.cat([g.flatten() for g in update]) for update in updates])
    expected = 1.7 * 0.01 / 4
    assert len(updates) == 200
    assert values.std().item() == pytest.approx(expected, rel=0.05)
    assert abs(values.mean().item()) < 0.05 * expected


def lora_tensors(method, kind):
    return {n: p.detach().clone() for n, p in zip(method.names, method.params) if kind in n}


def test_lora_b_moves_first_then_a(make_task):
    task = make_task(16)
    method = prepared_method(task, dp_config(noise_multiplier=0.0, expected_batch_size=8))
    a0, b0 = lora_tensors(method, "lora_A"), lora_tensors(method, "lora_B")
    run_step(method, task, 0, indices=torch.arange(8))
    a1, b1 = lora_tensors(method, "lora_A"), lora_tensors(method, "lora_B")
    assert all(not torch.equal(b0[n], b1[n]) for n in b0)  # every lora_B moved
    assert all(torch.equal(a0[n], a1[n]) for n in a0)  # ∂L/∂A = 0 while B = 0
    run_step(method, task, 1, indices=torch.arange(8))
    a2 = lora_tensors(method, "lora_A")
    assert all(not torch.equal(a1[n], a2[n]) for n in a1)


def test_with_noise_everything_moves_at_step_one(make_task):
    task = make_task(16)
    method = prepared_method(task, dp_config(noise_multiplier=1.0, expected_batch_size=8))
    before = [p.detach().clone() for p in method.params]
    run_step(method, task, 0, indices=torch.arange(8))
    assert all(not torch.equal(b, p) for b, p in zip(before, method.params))


@pytest.mark.parametrize("engine", ["hooks", "functorch", "lora"])
def test_adapters_replaced_after_the_optimizer_is_caught(make_task, engine):
    """Regression for the wrong build order: the model's LoRA tensors are no longer the optimizer's."""
    task = make_task(16)
    method = prepared_method(task, dp_config(noise_multiplier=1.0, expected_batch_size=8, engine=engine))
    for name in method.names:  # what a device move after `add_adapter` does: new Parameter objects
        owner, attr = name.rsplit(".", 1)
        module = task.unet.get_submodule(owner)
        setattr(module, attr, torch.nn.Parameter(getattr(module, attr).detach().clone()))
    with pytest.raises(ModelError, match="replaced"):
        run_step(method, task, 0, indices=torch.arange(8))


def test_a_step_that_does_not_move_the_adapter_stops_the_run_at_once(make_task):
    """§11.2, checked after every step: an optimizer that leaves the model's LoRA tensors as they were."""
    task = make_task(16)
    method = prepared_method(task, dp_config(noise_multiplier=1.0, expected_batch_size=8))
    method.optimizer.original_optimizer.step = lambda *a, **k: None  # updates silently lost
    with pytest.raises(ModelError, match="did not change"):
        run_step(method, task, 0, indices=torch.arange(8))


def test_parameters_swapped_inside_the_step_are_caught(make_task):
    """The optimizer updates its tensors while the UNet uses fresh copies (what a PEFT version that
    re-creates adapter parameters would do): the model's adapter did not move, so the step fails."""
    task = make_task(16)
    method = prepared_method(task, dp_config(noise_multiplier=1.0, expected_batch_size=8))
    inner = method.optimizer.original_optimizer
    real_step = inner.step

    def swap_then_step(*args, **kwargs):
        for name in method.names:
            owner, attr = name.rsplit(".", 1)
            module = task.unet.get_submodule(owner)
            setattr(module, attr, torch.nn.Parameter(getattr(module, attr).detach().clone()))
        return real_step(*args, **kwargs)
    inner.step = swap_then_step
    with pytest.raises(ModelError, match="did not change"):
        run_step(method, task, 0, indices=torch.arange(8))


def test_dropped_per_example_gradients_are_an_error(make_task):
    """An engine (or library version) that leaves no grad_sample must not become a noise-only step."""
    task = make_task(16)
    method = prepared_method(task, dp_config(noise_multiplier=1.0, expected_batch_size=8))

    def compute(draws):
        for p in method.params:
            p.grad_sample = None
        return torch.zeros(draws.num_examples)
    method.engine.compute = compute
    with pytest.raises(ModelError, match="no per-example gradient"):
        run_step(method, task, 0, indices=torch.arange(8))


def test_no_noise_and_an_empty_batch_is_the_one_legitimate_standstill(make_task):
    task = make_task(16)
    method = prepared_method(task, dp_config(noise_multiplier=0.0, expected_batch_size=1))
    empty = next(step for step in range(100)
                 if len(method.batch_indices(step, task.num_examples, generator(0, "step", step))) == 0)
    run_step(method, task, empty)  # a Poisson draw with no example: nothing moves, and that is right
    assert method.empty_batches == 1


def test_empty_batch_is_a_noise_only_step_without_forward(make_task):
    task = make_task(16)
    method = prepared_method(task, dp_config(noise_multiplier=1.0, expected_batch_size=8))
    calls = []
    task.unet.register_forward_pre_hook(lambda *args: calls.append(1))
    updates = capture_updates(method)
    metrics = run_step(method, task, 0, indices=torch.zeros(0, dtype=torch.long))
    assert calls == []
    assert len(updates) == 1 and all(g.abs().sum() > 0 for g in updates[0])  # noise was added
    assert method.accountant_steps() == 1
    assert math.isnan(metrics["loss"])


def test_empty_batches_are_counted_in_a_real_run(make_task):
    task = make_task(4)
    # q = 1/4 over 4 examples: P(empty) = (3/4)^4 ≈ 0.32 per step.
    cfg = dp_config(noise_multiplier=1.0, expected_batch_size=1)
    cfg.train.log_every = 1000
    method = prepared_method(task, cfg)
    for step in range(12):
        run_step(method, task, step)
    assert method.empty_batches > 0
    assert method.accountant_steps() == 12
    assert method.privacy_spent()["empty_batches"] == method.empty_batches


def test_physical_chunks_give_the_same_update(make_task):
    updates = {}
    for physical in (16, 3):
        task = make_task(16)
        method = prepared_method(task, dp_config(noise_multiplier=0.0, expected_batch_size=8,
                                                          physical_batch_size=physical, noise_multiplicity=2))
        captured = capture_updates(method)
        run_step(method, task, 0, indices=torch.arange(10))
        updates[physical] = torch.cat([g.flatten() for g in captured[0]])
    assert len(captured) == 1  # one optimizer step per logical batch, whatever the chunks
    # float32 sums in another order: equal to 1e-6 of the update's norm (single elements may cancel)
    assert (updates[3] - updates[16]).norm() <= 1e-6 * updates[16].norm()


def test_only_lora_tensors_are_trainable(make_task):
    task = make_task(8)
    method = prepared_method(task, dp_config(targets=LINEAR_TARGETS))
    trainable = [n for n, p in task.unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    in_optimizer = {id(p) for group in method.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for n, p in task.unet.named_parameters() if p.requires_grad}


def test_poisson_inclusion_rate_matches_q():
    n, q, steps = 50, 0.2, 400
    counts = torch.zeros(n)
    for step in range(steps):
        counts[poisson_rows(n, q, generator(0, "poisson", step), World())] += 1
    total = counts.sum().item()
    expected, sd = n * steps * q, math.sqrt(n * steps * q * (1 - q))
    assert abs(total - expected) < 4 * sd
    assert counts.min() > 0  # every example gets its chance


def test_plan_resolves_the_spec_defaults():
    plan = plan_privacy(dp_config(target_epsilon=8.0, noise_multiplier=None, epochs=50.0), 104)
    assert plan.expected_batch_size == 26 and plan.sample_rate == 0.25
    assert plan.steps == 200
    assert plan.delta == 1e-5  # min(1e-5, 0.1/N)
    assert 0.99 * 8 <= plan.planned_epsilon <= 8
    assert plan_privacy(dp_config(), 5000).delta == 1e-5
    assert plan_privacy(dp_config(), 20).delta == 1e-5
    assert plan_privacy(dp_config(expected_batch_size=64), 20_000).delta == pytest.approx(5e-6)
    small = plan_privacy(dp_config(), 12)
    assert small.expected_batch_size == 3


@pytest.mark.parametrize("engine", ["hooks", "lora", "lora-ghost"])
def test_without_noise_or_clipping_the_dp_update_is_the_plain_gradient(make_task, engine):
    """σ = 0 and C = ∞: G/B is the ordinary gradient of the mean loss on the same draws (to 1e-5: float32
    sums in another order; both engines are about 2e-6 off)."""
    task = make_task(8)
    method = prepared_method(task, dp_config(LINEAR_TARGETS + ["conv1"], noise_multiplier=0.0, max_grad_norm=1e9,
                                             expected_batch_size=5, noise_multiplicity=2,
                                             engine=engine.split("-")[0],
                                             ghost_norms="always" if engine.endswith("ghost") else "never"))
    with torch.no_grad():  # non-zero B, so that A has a gradient too
        for p in method.params:
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    updates = capture_updates(method)
    rng = generator(method.config.train.seed, "step", 0)
    method.batch_indices(0, task.num_examples, rng)
    batch = make_batch(task, torch.arange(5), 0.0, rng)
    method.step(task, batch, rng)
    noisy, t, c, target = method.draws(task, batch, slice(None)).rows(task.scheduler)
    method.engine.close()
    for p in method.params:
        p.grad = None
    squared_error(task.unet, noisy, t, c, target).mean().backward()
    for update, p in zip(updates[0], method.params):
        assert torch.linalg.vector_norm(update - p.grad) <= 1e-5 * torch.linalg.vector_norm(p.grad) + 1e-12
