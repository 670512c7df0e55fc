"""Per-example gradients, clipping and sensitivity (dp-lora.md §5, §13.1-3)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.optimizers import DPOptimizer

from privdiff.diffusion import squared_error
from privdiff.dp.lora_grads import uses_ghost_norms
from privdiff.dp.noise import CPUNoiseDPOptimizer
from privdiff.dp.per_example import ENGINES, ExampleDraws, per_example_norms
from privdiff.errors import ModelError
from privdiff.models.lora import add_lora
from tests.dp.conftest import CONV_TARGETS, LINEAR_TARGETS, dp_config, fresh_task


def lora_params(task, targets):
    torch.manual_seed(0)  # peft draws lora_A from the global generator: the same A whatever ran before
    params = add_lora(task.unet, dp_config(targets).lora)
    names = [n for n, p in sorted(task.unet.named_parameters()) if p.requires_grad]
    with torch.no_grad():  # non-zero B, so that A has a gradient too
        for name, p in zip(names, params):
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return dict(zip(names, params))


def draws_for(task, rows, k, seed=0, identical=False) -> ExampleDraws:
    g = torch.Generator().manual_seed(seed)
    n = len(rows)
    noise = torch.randn(n, 1 if identical else k, *task.latents.shape[1:], generator=g)
    times = torch.randint(0, 1000, (n, 1 if identical else k), generator=g)
    if identical:  # all K draws of an example the same: its K row gradients are aligned
        noise, times = noise.expand(n, k, *noise.shape[2:]), times.expand(n, k)
    return ExampleDraws(latents=task.latents[rows], contexts=task.contexts[rows], noise=noise.contiguous(),
                        timesteps=times.contiguous())


def autograd_reference(task, params, draws):
    """Loop of single-example autograd gradients of l_i = mean over its K draws."""
    out = {name: [] for name in params}
    noisy, t, c, target = draws.rows(task.scheduler)
    k = draws.multiplicity
    for i in range(draws.num_examples):
        rows = slice(i * k, (i + 1) * k)
        for p in params.values():
            p.grad = None
        squared_error(task.unet, noisy[rows], t[rows], c[rows], target[rows]).mean().backward()
        for name, p in params.items():
            out[name].append(p.grad.detach().clone())
    return {name: torch.stack(g) for name, g in out.items()}


def assert_close_relative(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    assert got.shape == want.shape, name
    error, scale = torch.linalg.vector_norm(got - want), torch.linalg.vector_norm(want)
    assert error <= 1e-5 * scale + 1e-12, f"{name}: relative error {error / scale:.2e}"


@pytest.mark.parametrize("engine", sorted(ENGINES))
@pytest.mark.parametrize("targets", [LINEAR_TARGETS, CONV_TARGETS], ids=["linear", "conv"])
@pytest.mark.parametrize("k", [1, 3])
def test_engine_matches_per_example_autograd(make_task, engine, targets, k):
    task = make_task(6)
    params = lora_params(task, targets)
    draws = draws_for(task, torch.arange(4), k)
    reference = autograd_reference(task, params, draws)
    computed = ENGINES[engine](task.unet, task.unet, params, task.scheduler)
    computed.compute(draws)
    for name, p in params.items():
        assert p.grad_sample.shape == (4, *p.shape)
        assert_close_relative(p.grad_sample, reference[name], name)
    computed.close()


def engine_grad_samples(task, params, draws, engine: str) -> dict[str, torch.Tensor]:
    computed = ENGINES[engine](task.unet, task.unet, params, task.scheduler)
    computed.compute(draws)
    samples = {name: p.grad_sample.detach().clone() for name, p in params.items()}
    computed.close()  # the hooks engine removes grad_sample
    return samples


# linear: self-attention (attn1) and cross-attention (attn2, to_k/to_v on the caption states)
@pytest.mark.parametrize("targets", [LINEAR_TARGETS, CONV_TARGETS, ["proj_in", "proj_out", "ff.net.2"]],
                         ids=["attention", "conv", "proj-ff"])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("n", [0, 1, 5])
def test_lora_engine_matches_hooks_and_functorch(make_task, targets, k, n):
    """In float64, so that 1e-5 tests the closed forms rather than float32's summation order (in
    float32 the three engines differ from each other by up to ~1e-5 where a gradient cancels)."""
    task = make_task(6)
    params = lora_params(task, targets)
    task.unet.double()  # in place: the adapter's Parameter objects stay the same
    task.latents, task.contexts = task.latents.double(), task.contexts.double()
    assert all(p.dtype == torch.float64 for p in params.values())
    draws = draws_for(task, torch.arange(n), k, seed=n + 10 * k)
    draws.noise = draws.noise.double()
    by_engine = {engine: engine_grad_samples(task, params, draws, engine) for engine in ("lora", "hooks", "functorch")}
    for name, p in params.items():
        assert by_engine["lora"][name].shape == (n, *p.shape)
        for reference in ("hooks", "functorch"):
            assert_close_relative(by_engine["lora"][name], by_engine[reference][name], f"{name} vs {reference}")
    assert all(p.grad is None for p in params.values())  # DP-SGD reads grad_sample only


@pytest.mark.parametrize("rank", [1, 5])
def test_lora_engine_matches_hooks_at_other_ranks(make_task, rank):
    task = make_task(4)
    cfg = dp_config(LINEAR_TARGETS + CONV_TARGETS).lora
    cfg.rank, cfg.alpha = rank, 3.0
    torch.manual_seed(rank)  # peft draws lora_A from the global generator
    params = add_lora(task.unet, cfg)
    names = [n for n, p in sorted(task.unet.named_parameters()) if p.requires_grad]
    with torch.no_grad():
        for name, p in zip(names, params):
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    params = dict(zip(names, params))
    draws = draws_for(task, torch.arange(3), 2)
    lora, hooks = (engine_grad_samples(task, params, draws, e) for e in ("lora", "hooks"))
    for name in params:
        assert_close_relative(lora[name], hooks[name], name)


def test_lora_engine_leaves_plain_forward_and_model_untouched(make_task):
    """Outside `compute` the layers run peft's own forward; `close` removes the engine entirely."""
    task = make_task(4)
    params = lora_params(task, LINEAR_TARGETS)
    noisy, t, c, target = draws_for(task, torch.arange(2), 1).rows(task.scheduler)
    before = squared_error(task.unet, noisy, t, c, target).detach()
    engine = ENGINES["lora"](task.unet, task.unet, params, task.scheduler)
    torch.testing.assert_close(squared_error(task.unet, noisy, t, c, target).detach(), before, rtol=0, atol=0)
    engine.close()
    assert not any("forward" in vars(m) for m in task.unet.modules())


def clip_each(params, max_grad_norm):
    """Opacus' clipping applied to one example at a time: that example's clipped contribution."""
    optimizer = DPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=0.0, max_grad_norm=max_grad_norm,
                            expected_batch_size=1)
    samples = [p.grad_sample for p in params]
    n = len(samples[0])
    rows = []
    for i in range(n):
        for p, gs in zip(params, samples):
            p.grad_sample, p.summed_grad = gs[i:i + 1], None
        optimizer.clip_and_accumulate()
        rows.append(torch.cat([p.summed_grad.flatten() for p in params]))
    for p, gs in zip(params, samples):
        p.grad_sample, p.summed_grad = gs, None
    optimizer.clip_and_accumulate()  # the whole batch at once
    total = torch.cat([p.summed_grad.flatten() for p in params])
    for p in params:
        p.summed_grad = None
    return rows, total


@settings(max_examples=60, deadline=None, derandomize=True)
@given(n=st.sampled_from([0, 1, 2, 7]), shapes=st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=3),
                                                         min_size=1, max_size=4),
       max_grad_norm=st.sampled_from([1e-4, 1e-2, 1.0]), scale=st.floats(1e-6, 1e3), seed=st.integers(0, 10**6))
def test_clipped_per_example_norm_at_most_c_any_shapes(n, shapes, max_grad_norm, scale, seed):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.zeros(*shape)) for shape in shapes]
    for p in params:
        p.grad_sample = scale * torch.randn(n, *p.shape, generator=g)
    rows, total = clip_each(params, max_grad_norm)
    for row in rows:
        assert row.norm() <= max_grad_norm * (1 + 1e-6)
    expected = torch.stack(rows).sum(0) if rows else torch.zeros_like(total)
    # float32 sums in another order: equal to 1e-5 of the sum's scale (single elements may cancel)
    assert (total - expected).norm() <= 1e-5 * max(expected.norm().item(), max_grad_norm)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(n=st.sampled_from([1, 2, 7]), k=st.integers(1, 8), max_grad_norm=st.sampled_from([1e-4, 1e-2, 1.0]),
       seed=st.integers(0, 10**6), conv=st.booleans(),
       engine=st.sampled_from(["hooks", "lora"]))
def test_clipped_example_gradients_of_the_unet_at_most_c(encoded_digits, n, k, max_grad_norm, seed, conv, engine):
    task = fresh_task(encoded_digits, 8)  # a fresh model per example (not a function-scoped fixture)
    params = lora_params(task, CONV_TARGETS if conv else LINEAR_TARGETS)
    ENGINES[engine](task.unet, task.unet, params, task.scheduler).compute(draws_for(task, torch.arange(n), k, seed))
    rows, _ = clip_each(list(params.values()), max_grad_norm)
    assert len(rows) == n
    for row in rows:
        assert row.norm() <= max_grad_norm * (1 + 1e-6)


def clipped_sum(task, params, draws, max_grad_norm, engine="hooks"):
    computed = ENGINES[engine](task.unet, task.unet, params, task.scheduler)
    computed.compute(draws)
    _, total = clip_each(list(params.values()), max_grad_norm)
    computed.close()
    return total


@pytest.mark.parametrize("engine", ["hooks", "lora"])
@pytest.mark.parametrize("identical", [False, True], ids=["random-draws", "aligned-draws"])
@pytest.mark.parametrize("k", [1, 2, 8])
def test_sensitivity_is_c_whatever_k(make_task, k, identical, engine):
    """σ = 0: the clipped sums over D and D without one example differ by at most C."""
    task = make_task(8)
    params = lora_params(task, LINEAR_TARGETS)
    c = 1e-3
    full = draws_for(task, torch.arange(5), k, identical=identical)
    removed = ExampleDraws(full.latents[:4], full.contexts[:4], full.noise[:4], full.timesteps[:4])
    gap = (clipped_sum(task, params, full, c, engine) - clipped_sum(task, params, removed, c, engine)).norm()
    assert gap <= c * (1 + 1e-6)
    assert gap >= 0.99 * c  # the example's gradient is far above C: it is clipped, not dropped


@pytest.mark.parametrize("k", [2, 8])
def test_naive_repeat_then_clip_reaches_k_times_c(make_task, k):
    """Negative control: clipping each of the K rows (the published code path) lets one example
    move the sum by K·C, and the sensitivity test above would catch it."""
    task = make_task(8)
    params = lora_params(task, LINEAR_TARGETS)
    c = 1e-3
    full = draws_for(task, torch.arange(5), k, identical=True)

    def as_rows(d: ExampleDraws) -> ExampleDraws:  # every draw its own "example"
        n = d.num_examples
        return ExampleDraws(d.latents.repeat_interleave(k, 0), d.contexts.repeat_interleave(k, 0),
                            d.noise.reshape(n * k, 1, *d.noise.shape[2:]), d.timesteps.reshape(n * k, 1))
    removed = ExampleDraws(full.latents[:4], full.contexts[:4], full.noise[:4], full.timesteps[:4])
    gap = (clipped_sum(task, params, as_rows(full), c) - clipped_sum(task, params, as_rows(removed), c)).norm()
    assert gap == pytest.approx(k * c, rel=1e-3)


def test_norms_helper_matches_flat_norm(make_task):
    task = make_task(4)
    params = lora_params(task, LINEAR_TARGETS)
    ENGINES["hooks"](task.unet, task.unet, params, task.scheduler).compute(draws_for(task, torch.arange(3), 2))
    flat = torch.cat([p.grad_sample.reshape(3, -1) for p in params.values()], dim=1)
    torch.testing.assert_close(per_example_norms(list(params.values())), flat.norm(dim=1))


def test_lora_engine_refuses_layers_without_a_closed_form(make_task):
    task = make_task(2)
    cfg = dp_config(LINEAR_TARGETS).lora
    cfg.dropout = 0.1  # dropout's mask is not in the closed form (and dp-lora refuses it anyway)
    params = add_lora(task.unet, cfg)
    names = [n for n, p in sorted(task.unet.named_parameters()) if p.requires_grad]
    with pytest.raises(ModelError, match="plain LoRA only"):
        ENGINES["lora"](task.unet, task.unet, dict(zip(names, params)), task.scheduler)


def ghost_clip(task, params, draws, max_grad_norm, ghost_norms):
    """The lora engine with a ghost-norm policy, then privdiff's clipping: (per-example norms, clipped sum)."""
    engine = ENGINES["lora"](task.unet, task.unet, params, task.scheduler, ghost_norms=ghost_norms)
    engine.compute(draws)
    engine.check_grad_samples(draws.num_examples)
    optimizer = CPUNoiseDPOptimizer(torch.optim.SGD(list(params.values()), lr=0.0), noise_multiplier=0.0,
                                    max_grad_norm=max_grad_norm, expected_batch_size=1)
    optimizer.clip_and_accumulate()
    total = torch.cat([p.summed_grad.flatten() for p in params.values()])
    for p in params.values():
        p.summed_grad, p.grad_sample = None, None
    choices = engine.layer_choices()
    engine.close()
    return optimizer.per_sample_norms[0], total, choices


@pytest.mark.parametrize("targets", [LINEAR_TARGETS, LINEAR_TARGETS + CONV_TARGETS], ids=["attention", "with-conv"])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("max_grad_norm", [1e-3, 1e9], ids=["clipped", "unclipped"])
def test_ghost_norms_equal_materialised_norms_and_clipped_sums(make_task, targets, k, n, max_grad_norm):
    """Gram-matrix norms and the row-weighted clipped sum equal the materialised ones (attention and
    cross-attention linears; conv layers stay materialised beside them)."""
    task = make_task(8)
    params = lora_params(task, targets)
    with torch.no_grad():  # non-zero B, so that A's gradients are not zero
        for name, p in params.items():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    draws = draws_for(task, torch.arange(n), k, seed=3)
    norms, total, choices = ghost_clip(task, params, draws, max_grad_norm, "never")
    ghost_norms, ghost_total, ghost_choices = ghost_clip(task, params, draws, max_grad_norm, "always")
    assert set(choices.values()) == {"materialise"}
    assert {how for name, how in ghost_choices.items() if "conv" not in name} == {"ghost"}
    assert all(how == "materialise" for name, how in ghost_choices.items() if "conv" in name)
    assert_close_relative(ghost_norms, norms, "norms")
    assert_close_relative(ghost_total, total, "clipped sum")


def test_ghost_rule_compares_gram_size_with_materialised_size():
    # cross-attention at SD-1.5 size: 77 text tokens, rank 8, 768 -> 320: 77² = 5929 < 8·1088
    assert uses_ghost_norms("auto", tokens=77, rank=8, d_in=768, d_out=320)
    # self-attention on a 64x64 latent: 4096 tokens
    assert not uses_ghost_norms("auto", tokens=4096, rank=8, d_in=320, d_out=320)
    assert not uses_ghost_norms("never", tokens=1, rank=8, d_in=768, d_out=320)
    assert uses_ghost_norms("always", tokens=4096, rank=8, d_in=320, d_out=320)
