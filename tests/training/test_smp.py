"""MP-LoRA and SMP-LoRA (smp-lora.md §12): gradients, isolation, draws, data hygiene, bounds, runs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from privdiff.config import DataConfig, MembershipConfig, load_config
from privdiff.data import build_manifest, load_dataset
from privdiff.errors import ConfigError
from privdiff.models.load import load_pipeline
from privdiff.seeding import generator
from privdiff.training.loop import make_batch
from privdiff.training.methods import get_method
from privdiff.training.methods.smp_lora import SMP_CONSTANT
from privdiff.training.run import run_training
from privdiff.diffusion.task import DiffusionTask, build_task
from tests.conftest import tiny_run_config

ROLES = ("member_aux", "nonmember_aux", "member_test", "nonmember_test")


@pytest.fixture(scope="module")
def encoded(tiny_pipeline_dir: Path) -> tuple[DiffusionTask, object]:
    """32 digits split by the default manifest: members as the task, the other roles as splits."""
    dataset = load_dataset(DataConfig(name="digits", num_examples=32))
    manifest = build_manifest([e.id for e in dataset.examples], dataset.name, dataset.content_hash,
                              MembershipConfig())
    pipe = load_pipeline(tiny_pipeline_dir)
    task = build_task(pipe, dataset.subset(manifest.members),
                      {role: dataset.subset(manifest.ids(role)) for role in ROLES})
    return task, manifest


def smp_config(method: str = "smp-lora", **values: object):
    values = {"train.method": method, "train.learning_rate": 0.01, "lora.rank": 2, "lora.alpha": 2.0,
              "smp.proxy_lr": 1e-3, "smp.proxy_batch_per_class": 3, **values}
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


def prepared(encoded, method: str = "smp-lora", **values: object):
    base, _ = encoded
    task = DiffusionTask(unet=copy.deepcopy(base.unet), scheduler=base.scheduler, latents=base.latents,
                         contexts=base.contexts, null_context=base.null_context, example_ids=base.example_ids,
                         splits=base.splits)
    m = get_method(method)(smp_config(method, **values))
    torch.manual_seed(0)
    m.prepare(task)
    return m, task


def batch_of(m, task, step: int = 0):
    rng = generator(m.config.train.seed, "step", step)
    return make_batch(task, m.batch_indices(step, task.num_examples, rng), 0.0, rng), rng


def flat_grad(value: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])


def terms_at_fixed_draws(m, task):
    batch, rng = batch_of(m, task)
    first, second = m.draws(batch.latents.shape, rng)
    m.proxy.eval()  # fixed dropout: the identity is about the objective, not the masks
    return m.terms(task, batch.latents, batch.contexts, first, second)


@pytest.mark.parametrize("lam,beta", [(1.0, 1.0), (0.3, 2.0)])
def test_smp_gradient_identity(encoded, lam: float, beta: float):
    m, task = prepared(encoded, **{"smp.lam": lam, "smp.beta": beta})
    loss, ce = terms_at_fixed_draws(m, task)
    d = beta + lam * ce.detach() + SMP_CONSTANT
    expected = flat_grad(loss, m.params) / d - (lam * loss.detach() / d**2) * flat_grad(ce, m.params)
    actual = flat_grad(m.objective(loss, ce), m.params)
    assert expected.norm() > 0
    assert (actual - expected).norm() <= 1e-5 * expected.norm()


def test_mp_gradient(encoded):
    m, task = prepared(encoded, "mp-lora", **{"smp.lam": 0.7})
    loss, ce = terms_at_fixed_draws(m, task)
    expected = flat_grad(loss, m.params) - 0.7 * flat_grad(ce, m.params)
    actual = flat_grad(m.objective(loss, ce), m.params)
    assert (actual - expected).norm() <= 1e-5 * expected.norm()


def test_gradient_flows_through_the_feature(encoded):
    m, task = prepared(encoded)
    # lora_B starts at zero, so ∂/∂lora_A vanishes at init: take one step first.
    m.step(task, *batch_of(m, task, 0))
    _, ce = terms_at_fixed_draws(m, task)
    grads = torch.autograd.grad(ce, m.params)
    assert all(torch.isfinite(g).all() for g in grads)
    assert all(g.abs().max() > 0 for g in grads)  # every LoRA tensor, A and B


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_isolation_of_the_lora_and_proxy_steps(encoded):
    m, task = prepared(encoded)
    base = {k: v for k, v in _snapshot(task.unet).items() if "lora_" not in k}
    lora_before, proxy_before = [p.detach().clone() for p in m.params], _snapshot(m.proxy)
    calls = []
    real_train_proxy = m.train_proxy

    def lora_step_only(t):  # the LoRA half of a step, with the proxy step recorded separately
        calls.append((_snapshot(m.proxy), [p.detach().clone() for p in m.params]))
        real_train_proxy(t)
        calls.append((_snapshot(m.proxy), [p.detach().clone() for p in m.params]))
        return 0.0

    m.train_proxy = lora_step_only
    m.step(task, *batch_of(m, task, 0))
    (proxy_mid, lora_mid), (proxy_after, lora_after) = calls
    # The LoRA step changed LoRA and left the proxy alone (J's gradients on ω are discarded) ...
    assert all(torch.equal(proxy_before[k], proxy_mid[k]) for k in proxy_before)
    assert any(not torch.equal(a, b) for a, b in zip(lora_before, lora_mid))
    # ... the proxy step changed the proxy and left LoRA alone ...
    assert any(not torch.equal(proxy_mid[k], proxy_after[k]) for k in proxy_mid)
    assert all(torch.equal(a, b) for a, b in zip(lora_mid, lora_after))
    # ... and neither touched a base weight.
    after = _snapshot(task.unet)
    assert all(torch.equal(base[k], after[k]) for k in base)


def test_independent_and_reproducible_draws(encoded):
    m, task = prepared(encoded)
    batch, rng = batch_of(m, task, 3)
    (n1, t1), (n2, t2) = m.draws(batch.latents.shape, rng)
    assert not torch.equal(n1, n2) and not torch.equal(t1, t2)
    _, again = batch_of(m, task, 3)
    (m1, s1), (m2, s2) = m.draws(batch.latents.shape, again)
    assert torch.equal(n1, m1) and torch.equal(t1, s1) and torch.equal(n2, m2) and torch.equal(t2, s2)


def test_data_hygiene_and_balanced_proxy_batches(encoded):
    m, task = prepared(encoded, **{"smp.proxy_steps": 2})
    _, manifest = encoded
    assert set(task.example_ids) == set(manifest.members)  # the LoRA loader holds members only
    seen_batches = []
    real = m.proxy_batch

    def spy(t, proxy_step):
        batch, labels = real(t, proxy_step)
        seen_batches.append((batch.ids, labels.tolist()))
        return batch, labels

    m.proxy_batch = spy
    for step in range(4):
        batch, rng = batch_of(m, task, step)
        assert {task.example_ids[i] for i in batch.indices} <= set(manifest.members)
        m.step(task, batch, rng)
    assert len(seen_batches) == 8  # k = 2 proxy steps per LoRA step
    for ids, labels in seen_batches:
        assert labels == [1] * 3 + [0] * 3
        assert {manifest.roles[i] for i in ids[:3]} == {"member_aux"}
        assert {manifest.roles[i] for i in ids[3:]} == {"nonmember_aux"}
    assert {manifest.roles[i] for i in m.proxy_seen_ids} == {"member_aux", "nonmember_aux"}


def test_aux_loaders_cycle_through_every_example(encoded):
    m, task = prepared(encoded)
    size = len(task.splits["member_aux"])
    rows = torch.cat([m.aux_rows("member_aux", size, s, 3) for s in range(size)])  # 3 full cycles
    for cycle in range(3):
        assert sorted(rows[cycle * size:(cycle + 1) * size].tolist()) == list(range(size))


def test_manifest_that_mixes_roles_is_refused(encoded):
    base, _ = encoded
    splits = dict(base.splits)
    splits["nonmember_aux"] = splits["member_aux"]  # members posing as non-members
    task = DiffusionTask(unet=copy.deepcopy(base.unet), scheduler=base.scheduler, latents=base.latents,
                         contexts=base.contexts, null_context=base.null_context, example_ids=base.example_ids,
                         splits=splits)
    with pytest.raises(ConfigError, match="nonmember_aux examples are training members"):
        get_method("smp-lora")(smp_config()).prepare(task)


def test_beta_must_be_positive_and_lambda_non_negative():
    with pytest.raises(ConfigError, match="smp.beta"):
        smp_config(**{"smp.beta": 0})
    with pytest.raises(ConfigError, match="smp.lam"):
        smp_config(**{"smp.lam": -1})
    with pytest.raises(ConfigError, match="smp.proxy_steps"):
        smp_config(**{"smp.proxy_steps": 0})


@pytest.fixture(scope="module")
def smp_run(tiny_pipeline_dir: Path, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("smp")
    cfg = tiny_run_config(tmp, tiny_pipeline_dir, **{"train.method": "smp-lora", "train.steps": 16,
                                                     "smp.proxy_lr": 1e-3, "smp.probe_every": 2})
    return run_training(cfg, show_progress=False)


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "smp_log.jsonl").read_text().splitlines()]


def test_smp_run_outputs_and_bounds(smp_run: Path):
    summary = json.loads((smp_run / "summary.json").read_text())
    smp = summary["smp"]
    assert smp["method"] == "smp-lora" and smp["lambda"] == 1.0 and smp["beta"] == 1.0 and smp["k"] == 1
    assert smp["diverged"] is False and smp["cost_ratio_vs_lora"] > 1
    assert (smp_run / "proxy_final.safetensors").is_file()
    assert len(list((smp_run / "snapshots").glob("step-*/pytorch_lora_weights.safetensors"))) == 8
    rows = _log(smp_run)
    steps = [r for r in rows if "epoch" not in r]
    epochs = [r for r in rows if "epoch" in r]
    assert [r["step"] for r in steps] == list(range(1, 17))
    for r in steps:  # smp-lora.md §12.9: 0 <= J_SMP <= L_ada / β at every step
        assert 0 <= r["objective"] <= r["loss"] / 1.0
        assert r["utility_scale"] == pytest.approx(1 / r["denominator"])
        assert r["privacy_weight"] == pytest.approx(r["loss"] / r["denominator"] ** 2)
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4]  # 17 members, batch 4: 4 steps per epoch
    probed = [e for e in epochs if "proxy_acc_aux" in e]
    assert [e["epoch"] for e in probed] == [2, 4]
    for e in probed:
        assert 0 <= e["proxy_acc_aux"] <= 1 and 0 <= e["proxy_acc_test"] <= 1
        assert e["heldout_loss_nonmember_aux"] > 0 and e["probe_draws"] == 1
    assert epochs[0]["loss"] == pytest.approx(sum(r["loss"] for r in steps[:4]) / 4)


class Crash(RuntimeError):
    pass


@pytest.mark.slow
def test_smp_resume_matches_uninterrupted_run(smp_run: Path, tiny_pipeline_dir: Path, tmp_path: Path):
    cfg = load_config(smp_run / "config.yaml", [f"output_dir={tmp_path / 'b'}"])

    def crash(step: int, metrics: dict) -> None:
        if step == 7:
            raise Crash

    with pytest.raises(Crash):
        run_training(cfg, show_progress=False, on_step=crash)
    resumed = run_training(cfg, resume=True, show_progress=False)
    from safetensors.torch import load_file

    for name in ("pytorch_lora_weights.safetensors", "proxy_final.safetensors"):
        a, b = load_file(smp_run / name), load_file(resumed / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert _log(resumed) == _log(smp_run)


def test_mp_divergence_flag(encoded):
    m, _ = prepared(encoded, "mp-lora")
    m.initial_loss, m.min_objective = 0.1, -1.5
    assert m.diverged()  # J below -10 x the initial L_ada
    m.min_objective = -0.5
    assert not m.diverged()
    m.nonfinite_steps = 1
    assert m.diverged()


def test_missing_aux_nonmembers_is_refused(tiny_pipeline_dir: Path, tmp_path: Path):
    dataset = load_dataset(DataConfig(name="digits", num_examples=32))
    ids = [e.id for e in dataset.examples]
    from privdiff.data.manifest import Manifest
    from privdiff.runs.files import atomic_write_json

    roles = {i: ("member_aux" if k < 20 else "nonmember_test") for k, i in enumerate(ids)}
    manifest = Manifest(roles=roles, seed=0, dataset=dataset.name, dataset_hash=dataset.content_hash,
                        proportions={})
    atomic_write_json(tmp_path / "m.json", manifest.to_json())
    cfg = tiny_run_config(tmp_path, tiny_pipeline_dir, **{"train.method": "smp-lora",
                                                          "membership.manifest": str(tmp_path / "m.json")})
    with pytest.raises(ConfigError, match="needs 'nonmember_aux' examples"):
        run_training(cfg, show_progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_audit_retrains_the_proxy_from_scratch(smp_run: Path, monkeypatch):
    """smp-lora.md §12.10: the audit never loads the co-trained proxy. Its proxy scores are the same when
    proxy_final.safetensors is replaced by garbage, and no loader ever opens that file."""
    import safetensors.torch

    from privdiff.audit.run import AuditConfig, run_audit

    opened: list[str] = []
    for name in ("load_file", "safe_open"):
        if hasattr(safetensors.torch, name):
            real = getattr(safetensors.torch, name)
            monkeypatch.setattr(safetensors.torch, name,
                                lambda path, *a, _real=real, **k: (opened.append(str(path)), _real(path, *a, **k))[1])
    cfg = AuditConfig(attacks=["proxy"], bootstrap=20)
    first = run_audit(smp_run, cfg, show_progress=False)["attacks"]["proxy"]
    proxy_file = smp_run / "proxy_final.safetensors"
    saved = proxy_file.read_bytes()
    try:
        proxy_file.write_bytes(b"not a proxy")
        second = run_audit(smp_run, cfg, show_progress=False)["attacks"]["proxy"]
    finally:
        proxy_file.write_bytes(saved)
    assert first["auc"] == second["auc"] and first["fitted"]["epochs"] == second["fitted"]["epochs"]
    assert first["fitted"]["epochs"] >= 1  # trained here, from a fresh initialisation
    assert not any("proxy_final" in path for path in opened)


@pytest.mark.slow
def test_lira_shadows_of_an_smp_run_are_trained_with_smp(smp_run: Path, tmp_path: Path):
    """smp-lora.md §8.1: shadow models are trained with the same method (adaptive attacker)."""
    from privdiff.audit.shadows import train_shadows
    from privdiff.runs.folder import open_run

    shadows = train_shadows(open_run(smp_run), 2, 0, tmp_path / "shadows", show_progress=False)
    assert len(shadows.models) == 2
    for j in range(2):
        summary = json.loads((tmp_path / "shadows" / f"shadow-{j:02d}" / "summary.json").read_text())
        assert summary["method"] == "smp-lora" and summary["smp"]["proxy_ids_seen"] > 0
        assert not (tmp_path / "shadows" / f"shadow-{j:02d}" / "snapshots").exists()  # shadows keep no snapshots
