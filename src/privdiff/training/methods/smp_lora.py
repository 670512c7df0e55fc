"""MP-LoRA and SMP-LoRA: LoRA trained against a co-trained proxy membership attacker (smp-lora spec).

One LoRA step (smp-lora.md §6): the adaptation loss L at draw (t1, n1) and the proxy's member
cross-entropy CE_m on the element-wise squared error at an independent draw (t2, n2), with
gradients flowing through that feature into the LoRA weights; the LoRA steps on
J_MP = L - λ·CE_m or J_SMP = L / (β + λ·CE_m + 1e-5). Then k proxy Adam steps on balanced
auxiliary member / non-member batches, features computed without gradient from the current model.
The co-trained proxy is a training diagnostic only: protection is judged by `privdiff audit`,
whose attacks are retrained from scratch.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from privdiff.diffusion import draw_noise_and_timesteps, noisy_and_target, squared_error
from privdiff.diffusion.task import DiffusionTask, EncodedSplit
from privdiff.errors import ConfigError
from privdiff.metrics.heldout import heldout_losses
from privdiff.proxy import ProxyMLP
from privdiff.runs.files import atomic_replace
from privdiff.seeding import derive_seed, generator
from privdiff.training.methods.base import METHODS, TrainBatch
from privdiff.training.methods.lora import LoRA

Draw = tuple[torch.Tensor, torch.Tensor]  # (noise (B, C, h, w), timesteps (B,))
SMP_CONSTANT = 1e-5  # the reference's constant in the denominator
PROBE_CHUNK = 128
HELDOUT_SEED = 0  # the evaluation's default seed, so probes and `privdiff evaluate` see the same noises


@contextmanager
def seeded(seed: int, *keys: object) -> Iterator[None]:
    """A forked global RNG seeded from (seed, *keys): the proxy's dropout masks become reproducible
    (and resumable) without disturbing anyone else's global stream."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(derive_seed(seed, *keys) % 2**63)
        yield


@METHODS.register
class SMPLoRA(LoRA):
    """Stable membership-privacy LoRA: minimises L / (β + λ·CE_m + 1e-5)."""

    name = "smp-lora"
    extra_roles = ("member_aux", "nonmember_aux", "member_test", "nonmember_test")
    required_roles = ("member_aux", "nonmember_aux")
    log_name = "smp_log.jsonl"
    default_snapshots = 8

    def objective(self, loss: torch.Tensor, ce: torch.Tensor) -> torch.Tensor:
        smp = self.config.smp
        return loss / (smp.beta + smp.lam * ce + SMP_CONSTANT)

    def diverged(self) -> bool:
        return self.nonfinite_steps > 0

    # -- set-up ---------------------------------------------------------------------------------

    def prepare(self, task: DiffusionTask) -> None:
        check_data_hygiene(task)
        super().prepare(task)
        smp, seed = self.config.smp, self.config.train.seed
        self.device = task.latents.device
        self.scheduler = task.scheduler
        with seeded(seed, "smp-proxy-init"):
            self.proxy = ProxyMLP(task.latents[0].numel()).to(self.device)
        self.proxy_optimizer = torch.optim.Adam(self.proxy.parameters(), lr=smp.proxy_lr,
                                                weight_decay=smp.proxy_weight_decay)
        self.steps_done = 0
        self.initial_loss: float | None = None
        self.min_objective = float("inf")
        self.nonfinite_steps = 0
        self.proxy_seen_ids: set[str] = set()
        self.step_times: list[float] = []
        self.last_batch: TrainBatch | None = None
        self.plain_step_s: float | None = None

    # -- the two terms and one step -------------------------------------------------------------

    def draws(self, shape: torch.Size, rng: torch.Generator) -> tuple[Draw, Draw]:
        """(t1, n1) for the adaptation loss and an independent (t2, n2) for the proxy feature."""
        steps = self.num_train_timesteps
        return draw_noise_and_timesteps(shape, steps, rng), draw_noise_and_timesteps(shape, steps, rng)

    def terms(self, task: DiffusionTask, latents: torch.Tensor, contexts: torch.Tensor, first: Draw,
              second: Draw, dropout_key: object = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_ada, CE_m) on one batch of members: both draws go through one UNet call of 2B rows."""
        n = len(latents)
        noise = torch.cat([first[0], second[0]]).to(self.device)
        steps = torch.cat([first[1], second[1]]).to(self.device)
        noisy, target = noisy_and_target(task.scheduler, torch.cat([latents, latents]), noise, steps)
        error = squared_error(task.unet, noisy, steps, torch.cat([contexts, contexts]), target)
        loss = error[:n].mean()
        with seeded(self.config.train.seed, "smp-dropout", dropout_key) if dropout_key is not None else nullcontext():
            logits = self.proxy(error[n:].flatten(1))
        member = torch.ones(n, dtype=torch.long, device=self.device)
        return loss, F.cross_entropy(logits, member)

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def step(self, task: DiffusionTask, batch: TrainBatch, rng: torch.Generator) -> dict[str, float]:
        began = time.perf_counter()
        task.unet.train()
        self.proxy.train()
        first, second = self.draws(batch.latents.shape, rng)
        loss, ce = self.terms(task, batch.latents, batch.contexts, first, second, dropout_key=self.steps_done)
        objective = self.objective(loss, ce)
        self.optimizer.zero_grad(set_to_none=True)
        objective.backward()
        self.proxy.zero_grad(set_to_none=True)  # J must not train the attacker
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.train.max_grad_norm or float("inf"))
        finite = bool(torch.isfinite(objective)) and bool(torch.isfinite(grad_norm))
        if finite:
            self.optimizer.step()
        else:  # never write a NaN adapter: skip the update and flag the run
            self.nonfinite_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        proxy_ce = self.train_proxy(task)
        self.steps_done += 1
        if self.initial_loss is None:
            self.initial_loss = loss.item()
        self.min_objective = min(self.min_objective, objective.item())
        self.step_times.append(time.perf_counter() - began)
        self.last_batch = batch
        smp, loss_value, ce_value = self.config.smp, loss.item(), ce.item()
        return {"loss": loss_value, "ce_m": ce_value, "objective": objective.item(), **self.weights(loss_value, ce_value),
                "grad_norm": grad_norm.item(), "proxy_ce": proxy_ce, "proxy_lr_over_lora_lr":
                smp.proxy_lr / self.config.train.learning_rate}

    def weights(self, loss: float, ce: float) -> dict[str, float]:
        """The denominator D, the privacy-gradient weight λ·L/D² and the utility scale 1/D (smp-lora.md §5)."""
        smp = self.config.smp
        denominator = smp.beta + smp.lam * ce + SMP_CONSTANT
        return {"denominator": denominator, "privacy_weight": smp.lam * loss / denominator**2,
                "utility_scale": 1 / denominator}

    # -- the proxy ------------------------------------------------------------------------------

    def aux_rows(self, role: str, size: int, proxy_step: int, per_class: int) -> torch.Tensor:
        """Rows of proxy step `proxy_step` in `role`: the aux split cycled, reshuffled per cycle (seeded)."""
        orders: dict[int, torch.Tensor] = {}  # a batch spans at most a few cycles
        rows = []
        for position in range(proxy_step * per_class, (proxy_step + 1) * per_class):
            cycle, offset = divmod(position, size)
            if cycle not in orders:
                orders[cycle] = torch.randperm(size, generator=generator(self.config.train.seed, "smp-aux", role, cycle))
            rows.append(int(orders[cycle][offset]))
        return torch.tensor(rows)

    def proxy_batch(self, task: DiffusionTask, proxy_step: int) -> tuple[EncodedSplit, torch.Tensor]:
        """A balanced batch: `proxy_batch_per_class` aux members then as many aux non-members."""
        per_class = self.config.smp.proxy_batch_per_class
        splits = [task.splits["member_aux"], task.splits["nonmember_aux"]]
        batch = EncodedSplit.join(*(split.take(self.aux_rows(role, len(split), proxy_step, per_class))
                                    for role, split in zip(("member_aux", "nonmember_aux"), splits)))
        labels = torch.tensor([1] * per_class + [0] * per_class, device=self.device)
        return batch, labels

    @torch.no_grad()
    def features(self, task: DiffusionTask, examples: EncodedSplit, draw_rng: torch.Generator) -> torch.Tensor:
        """(n, d) element-wise squared errors of the current model at fresh (t, n), no gradient."""
        out = []
        for start in range(0, len(examples), PROBE_CHUNK):
            latents = examples.latents[start:start + PROBE_CHUNK]
            noise, steps = draw_noise_and_timesteps(latents.shape, self.num_train_timesteps, draw_rng)
            noise, steps = noise.to(self.device), steps.to(self.device)
            noisy, target = noisy_and_target(task.scheduler, latents, noise, steps)
            out.append(squared_error(task.unet, noisy, steps, examples.contexts[start:start + PROBE_CHUNK],
                                     target).flatten(1))
        return torch.cat(out)

    def train_proxy(self, task: DiffusionTask) -> float:
        """k Adam steps of the proxy on balanced aux batches; returns their mean cross-entropy."""
        smp, seed = self.config.smp, self.config.train.seed
        losses = []
        for j in range(smp.proxy_steps):
            proxy_step = self.steps_done * smp.proxy_steps + j
            batch, labels = self.proxy_batch(task, proxy_step)
            self.proxy_seen_ids.update(batch.ids)
            features = self.features(task, batch, generator(seed, "smp-proxy-draw", proxy_step))
            with seeded(seed, "smp-proxy-dropout", proxy_step):
                loss = F.cross_entropy(self.proxy(features), labels)
            self.proxy_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.proxy_optimizer.step()
            losses.append(loss.item())
        return sum(losses) / len(losses)

    # -- per-epoch probes, summary, files -------------------------------------------------------

    @torch.no_grad()
    def epoch_end(self, task: DiffusionTask, epoch: int, last: bool) -> dict[str, float]:
        """Proxy accuracy and CE on the aux and test splits (fresh draws) and the held-out loss on
        the aux non-members, every `smp.probe_every` epochs and at the end."""
        smp, seed = self.config.smp, self.config.train.seed
        if epoch % smp.probe_every and not last:
            return {}
        self.proxy.eval()
        out: dict[str, float] = {"probe_draws": smp.probe_draws}
        for name, roles in (("aux", ("member_aux", "nonmember_aux")), ("test", ("member_test", "nonmember_test"))):
            if not all(role in task.splits for role in roles):
                continue
            correct = cross_entropy = count = 0.0
            for role, label in zip(roles, (1, 0)):
                split = task.splits[role]
                for draw in range(smp.probe_draws):
                    logits = self.proxy(self.features(task, split, generator(seed, "smp-probe", epoch, role, draw)))
                    labels = torch.full((len(split),), label, device=self.device)
                    correct += (logits.argmax(1) == labels).sum().item()
                    cross_entropy += F.cross_entropy(logits, labels, reduction="sum").item()
                    count += len(split)
            out[f"proxy_acc_{name}"] = correct / count
            out[f"proxy_ce_{name}"] = cross_entropy / count
        held = task.splits.get("nonmember_aux")
        if held is not None:
            losses, _ = heldout_losses(task.unet, task.scheduler, held.latents, held.contexts, held.ids,
                                       seed=HELDOUT_SEED)
            out["heldout_loss_nonmember_aux"] = float(losses.mean())
        task.unet.train()
        self.proxy.train()
        return out

    def finish(self, task: DiffusionTask) -> None:
        """Times plain-LoRA forward+backward passes on the last batch, for the cost ratio."""
        if self.last_batch is None:
            return
        timings = []
        for _ in range(5):
            began = time.perf_counter()
            self.losses(task, self.last_batch, generator(0, "smp-timing")).mean().backward()
            timings.append(time.perf_counter() - began)
        self.optimizer.zero_grad(set_to_none=True)
        self.plain_step_s = statistics.median(timings)

    def run_summary(self) -> dict[str, Any]:
        smp = self.config.smp
        times = self.step_times[len(self.step_times) // 10:] or self.step_times
        step_s = statistics.median(times) if times else None
        return {"smp": {
            "method": self.name, "lambda": smp.lam, "beta": smp.beta, "constant": SMP_CONSTANT, "k": smp.proxy_steps,
            "proxy_lr": smp.proxy_lr, "proxy_lr_over_lora_lr": smp.proxy_lr / self.config.train.learning_rate,
            "proxy_batch_per_class": smp.proxy_batch_per_class, "proxy_weight_decay": smp.proxy_weight_decay,
            "max_grad_norm": self.config.train.max_grad_norm,
            "initial_loss": self.initial_loss, "min_objective": self.min_objective,
            "diverged": self.diverged(), "nonfinite_steps": self.nonfinite_steps,
            "proxy_ids_seen": len(self.proxy_seen_ids),
            "step_time_s": step_s, "plain_forward_backward_s": self.plain_step_s,
            "cost_ratio_vs_lora": step_s / self.plain_step_s if step_s and self.plain_step_s else None,
            "cost_ratio_note": "median step (incl. the proxy step) / median plain-LoRA forward+backward on "
                               "the last batch, in this run; benchmarks/bench_smp.py measures full steps side "
                               "by side",
            "proxy_note": "the co-trained proxy is a training diagnostic, never the privacy result",
        }}

    def save_artifacts(self, run_dir: Path) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.proxy.state_dict().items()}
        atomic_replace(Path(run_dir) / "proxy_final.safetensors", lambda tmp: save_file(
            tensors, str(tmp), metadata={"privdiff.kind": "co-trained proxy (diagnostic only)"}))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "proxy": self.proxy.state_dict(),
                "proxy_optimizer": self.proxy_optimizer.state_dict(),
                "counters": {"steps_done": self.steps_done, "initial_loss": self.initial_loss,
                             "min_objective": self.min_objective, "nonfinite_steps": self.nonfinite_steps},
                "proxy_seen_ids": sorted(self.proxy_seen_ids)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.proxy.load_state_dict(state["proxy"])
        self.proxy_optimizer.load_state_dict(state["proxy_optimizer"])
        for key, value in state["counters"].items():
            setattr(self, key, value)
        self.proxy_seen_ids = set(state["proxy_seen_ids"])


@METHODS.register
class MPLoRA(SMPLoRA):
    """Min-max membership-privacy LoRA: minimises L - λ·CE_m (unbounded below, smp-lora.md §5)."""

    name = "mp-lora"

    def objective(self, loss: torch.Tensor, ce: torch.Tensor) -> torch.Tensor:
        return loss - self.config.smp.lam * ce

    def weights(self, loss: float, ce: float) -> dict[str, float]:
        return {"denominator": None, "privacy_weight": self.config.smp.lam, "utility_scale": 1.0}

    def diverged(self) -> bool:
        """smp-lora.md §11: J below -10 x the initial L_ada, or a non-finite step."""
        initial = self.initial_loss or 0.0
        return self.nonfinite_steps > 0 or self.min_objective < -10 * initial


def check_data_hygiene(task: DiffusionTask) -> None:
    """The LoRA loader holds members only; the proxy's members are among them, its non-members not."""
    members = set(task.example_ids)
    aux_members = set(task.splits["member_aux"].ids)
    aux_nonmembers = set(task.splits["nonmember_aux"].ids)
    if not aux_members <= members:
        raise ConfigError("membership manifest: some member_aux examples are not training members")
    if aux_nonmembers & members:
        raise ConfigError("membership manifest: some nonmember_aux examples are training members")
    if "member_test" in task.splits and members != aux_members | set(task.splits["member_test"].ids):
        raise ConfigError("membership manifest: the training members are not member_aux + member_test")
