"""DP-LoRA: DP-SGD on the LoRA adapter (dp-lora.md), with K draws averaged inside each example.

Per step: a Poisson(q) batch of the N training members; per-example gradients of the K-draw mean
loss (`privdiff.dp.per_example`), flat-clipped to C and summed by Opacus' DPOptimizer, plus
N(0, σ²C²) noise (also when the batch is empty), divided by the expected batch B; AdamW on the
result. Opacus' accountant records every step; ε is reported by PRV (or RDP) and cross-checked
by `dp-accounting`'s PLD. Across processes (torchrun), DPDDP syncs the replicas and Opacus'
DistributedDPOptimizer adds the noise once and all-reduces.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any

import torch
import torch.distributed as dist

from privdiff.config import RunConfig
from privdiff.diffusion.task import DiffusionTask
from privdiff.distributed import current_world
from privdiff.dp.accounting import (
    calibrate_noise,
    compute_epsilon,
    opacus_epsilon,
    pld_epsilon,
)
from privdiff.dp.noise import CPUNoiseDistributedDPOptimizer, CPUNoiseDPOptimizer
from privdiff.dp.per_example import ENGINES, ExampleDraws
from privdiff.dp.poisson import local_share, poisson_rows, secure_generator
from privdiff.errors import ConfigError, ModelError
from privdiff.seeding import derive_seed, generator
from privdiff.training.methods.base import METHODS, TrainBatch
from privdiff.training.methods.lora import LoRA


@dataclass(frozen=True)
class PrivacyPlan:
    """The resolved DP-SGD parameters of a run (fixed before any private gradient is seen)."""

    dataset_size: int
    expected_batch_size: int
    sample_rate: float
    steps: int
    delta: float
    noise_multiplier: float
    target_epsilon: float | None
    planned_epsilon: float
    planned_accountant: str  # whose ε `planned_epsilon` is (PLD when PRV would exceed the memory cap)


def plan_privacy(config: RunConfig, num_examples: int) -> PrivacyPlan:
    """Resolves B, q, δ, steps and σ (calibrated to the target ε) for N = `num_examples`.

    Raises:
        ConfigError: δ >= 1/N, B > N, batch-level clipping or LoRA dropout requested.
    """
    dp, n = config.dp, num_examples
    if config.train.max_grad_norm is not None:
        raise ConfigError("train.max_grad_norm (clipping the batch gradient) must be null for dp-lora: "
                          "per-example clipping (dp.max_grad_norm) is the only clipping")
    if config.lora.dropout != 0:
        raise ConfigError("lora.dropout must be 0 for dp-lora (its randomness is not accounted for)")
    batch = dp.expected_batch_size or max(1, min(64, n // 4))
    if batch > n:
        raise ConfigError(f"dp.expected_batch_size {batch} is larger than the {n} training members")
    delta = dp.delta if dp.delta is not None else min(1e-5, 0.1 / n)
    if delta >= 1 / n:
        raise ConfigError(f"dp.delta {delta:g} must be < 1/N = {1 / n:.3g} (N = {n} training members): "
                          f"a larger delta allows releasing an example outright")
    rate = batch / n
    steps = math.ceil(dp.epochs / rate - 1e-9) if dp.epochs is not None else config.train.steps
    if dp.target_epsilon is not None:
        calibration = calibrate_noise(dp.target_epsilon, rate, steps, delta, accountant=dp.accountant,
                                      eps_error=dp.eps_error)
        sigma, planned, accountant = calibration.noise_multiplier, calibration.epsilon, calibration.accountant
    else:
        sigma = dp.noise_multiplier
        planned_eps = compute_epsilon([(sigma, rate, steps)], delta, dp.accountant, dp.eps_error)
        planned, accountant = planned_eps.value, planned_eps.accountant
    return PrivacyPlan(dataset_size=n, expected_batch_size=batch, sample_rate=rate, steps=steps, delta=delta,
                       noise_multiplier=sigma, target_epsilon=dp.target_epsilon, planned_epsilon=planned,
                       planned_accountant=accountant)


def refuse_gradient_checkpointing(unet: torch.nn.Module) -> None:
    if getattr(unet, "is_gradient_checkpointing", False):
        raise ModelError("gradient checkpointing is on: it breaks per-example gradients (Opacus hooks "
                         "produce none, torch.func raises); disable it for dp-lora")


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


@METHODS.register
class DPLoRA(LoRA):
    """LoRA trained with DP-SGD; the released adapter is (ε, δ)-DP w.r.t. one training example."""

    name = "dp-lora"
    data_parallel = True
    plan: PrivacyPlan | None = None

    def check_inputs(self, num_examples: int, unet: torch.nn.Module) -> None:
        refuse_gradient_checkpointing(unet)
        self.plan = plan_privacy(self.config, num_examples)

    def total_steps(self) -> int:
        return self.plan.steps if self.plan else self.config.train.steps

    def batching(self) -> dict[str, Any]:
        return {"sampling": "poisson", "expected_batch_size": self.plan.expected_batch_size,
                "sample_rate": self.plan.sample_rate, "empty_batches": self.empty_batches}

    def prepare(self, task: DiffusionTask) -> None:
        from opacus.accountants import create_accountant
        from opacus.distributed import (
            DifferentiallyPrivateDistributedDataParallel as DPDDP,
        )

        refuse_gradient_checkpointing(task.unet)
        if self.plan is None or self.plan.dataset_size != task.num_examples:
            self.plan = plan_privacy(self.config, task.num_examples)
        dp, plan = self.config.dp, self.plan
        self.world = current_world()
        self.params = self.trainable_parameters(task)  # the UNet is on its device already (pitfall 1)
        self.names = [name for name, p in sorted(task.unet.named_parameters()) if p.requires_grad]
        model = DPDDP(task.unet) if self.world.distributed else task.unet  # broadcasts rank 0's weights
        self.engine = ENGINES[dp.engine](model, task.unet, dict(zip(self.names, self.params)), task.scheduler,
                                         ghost_norms=dp.ghost_norms)
        optimizer_class = CPUNoiseDistributedDPOptimizer if self.world.distributed else CPUNoiseDPOptimizer
        # Each process divides by B / W and the all-reduce averages over W: the update is Σ / B.
        self.optimizer = optimizer_class(
            torch.optim.AdamW(self.params, lr=self.config.train.learning_rate,
                              weight_decay=self.config.train.weight_decay),
            noise_multiplier=plan.noise_multiplier, max_grad_norm=dp.max_grad_norm,
            expected_batch_size=plan.expected_batch_size / self.world.size, loss_reduction="mean",
            secure_mode=dp.secure_rng)
        self.accountant = create_accountant(dp.accountant)
        self.optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=plan.sample_rate))
        self.unet = task.unet
        self.empty_batches = 0
        self.step_index = 0
        self.global_batch_size = 0
        self._privacy: dict[str, Any] | None = None

    def steps_per_epoch(self, num_examples: int) -> int:
        return max(1, round(1 / self.plan.sample_rate)) if self.plan else super().steps_per_epoch(num_examples)

    def batch_indices(self, step: int, num_examples: int, rng: torch.Generator) -> torch.Tensor:
        """This process's share of the step's Poisson batch (each example included w.p. q)."""
        self.step_index = step
        source = secure_generator() if self.config.dp.secure_rng else generator(self.config.train.seed, "poisson", step)
        rows = poisson_rows(num_examples, self.plan.sample_rate, source, self.world)
        self.global_batch_size = len(rows)
        return local_share(rows, self.world)

    def draws(self, task: DiffusionTask, batch: TrainBatch, chunk: slice) -> ExampleDraws:
        """K (noise, t) draws per example, keyed by (seed, step, row): the same on any process layout."""
        k, shape = self.config.dp.noise_multiplicity, batch.latents.shape[1:]
        noises, times = [], []
        for row in batch.indices[chunk].tolist():
            rng = generator(self.config.train.seed, "dp-draws", self.step_index, row)
            noises.append(torch.randn((k, *shape), generator=rng))
            times.append(torch.randint(0, task.scheduler.config.num_train_timesteps, (k,), generator=rng))
        device = batch.latents.device
        return ExampleDraws(latents=batch.latents[chunk], contexts=batch.contexts[chunk],
                            noise=torch.stack(noises).to(device), timesteps=torch.stack(times).to(device))

    def step(self, task: DiffusionTask, batch: TrainBatch, rng: torch.Generator) -> dict[str, float]:
        dp = self.config.dp
        task.unet.train()
        if not dp.secure_rng:  # noise stream keyed by step: a resumed run draws exactly the same noise
            self.optimizer.generator = torch.Generator().manual_seed(  # a CPU stream: see dp.noise
                derive_seed(self.config.train.seed, "dp-noise", self.step_index))
        count = len(batch.indices)
        losses = []
        self.optimizer.per_sample_norms = []  # the clipping fills it (one (n,) tensor per chunk)
        self.engine.check_parameters()
        before = self._adapter_snapshot()
        if count == 0:
            self.engine.set_empty()  # no forward: diffusers UNets fail on a 0-sized batch
            self.optimizer.step()  # noise-only update, one accountant step
        else:
            starts = list(range(0, count, dp.physical_batch_size))
            for j, start in enumerate(starts):
                chunk = slice(start, start + dp.physical_batch_size)
                draws = self.draws(task, batch, chunk)
                losses.append(self.engine.compute(draws))
                self.engine.check_grad_samples(draws.num_examples)
                if j < len(starts) - 1:
                    self.optimizer.signal_skip_step(do_skip=True)  # clip and accumulate only
                self.optimizer.step()
                if j < len(starts) - 1:
                    self.optimizer.zero_grad()  # keeps the accumulated clipped sum
        self.optimizer.zero_grad()
        self.empty_batches += int(self.global_batch_size == 0)
        self._check_adapter_moved(before)
        return self._step_metrics(losses, [n for n in self.optimizer.per_sample_norms if len(n)])

    def _step_metrics(self, losses: list[torch.Tensor], norms: list[torch.Tensor]) -> dict[str, float]:
        loss = torch.cat(losses) if losses else torch.zeros(0)
        norm = torch.cat(norms) if norms else torch.zeros(0)
        sums = torch.tensor([loss.sum().item(), norm.sum().item(),
                             (norm > self.config.dp.max_grad_norm).sum().item(), float(len(loss))],
                            dtype=torch.float64)
        if self.world.distributed:
            dist.all_reduce(sums)
        loss_sum, norm_sum, clipped, n = sums.tolist()
        mean = (lambda total: total / n) if n > 0 else (lambda total: math.nan)  # empty batch: no statistics
        metrics = {"loss": mean(loss_sum), "batch_size": float(self.global_batch_size),
                   "grad_norm": mean(norm_sum), "clipped_fraction": mean(clipped)}
        cfg = self.config.train
        if (self.step_index + 1) % cfg.log_every == 0 or self.step_index + 1 == self.total_steps():
            # RDP is a valid upper bound in milliseconds; the final ε is reported by PRV and PLD.
            eps = opacus_epsilon(self.accountant.history, self.plan.delta, "rdp")
            metrics["epsilon_rdp"] = eps if math.isfinite(eps) else math.nan
        return metrics

    def _adapter_snapshot(self) -> torch.Tensor:
        """The optimizer's LoRA tensors, flattened into one copy (the model holding exactly those
        tensors is checked before and after the step)."""
        with torch.no_grad():
            return torch.cat([p.detach().reshape(-1) for p in self.params])

    def _check_adapter_moved(self, before: torch.Tensor) -> None:
        """Every DP step must move the adapter the model uses (dp-lora.md §11): a PEFT or Opacus
        version that swaps parameters, or drops per-example gradients, fails here, not silently.
        The one legitimate standstill: no noise and an empty batch."""
        if self.plan.noise_multiplier == 0 and self.global_batch_size == 0:
            return
        if not self.engine.model_holds_parameters() or torch.equal(self._adapter_snapshot(), before):
            raise ModelError(f"DP step {self.step_index + 1} did not change the LoRA weights the model uses: "
                             f"the optimizer updates other tensors (the adapter was replaced after the optimizer "
                             f"was built, e.g. the model moved to its device after adding adapters), or the "
                             f"learning rate is too small to change float32 weights")

    def finish(self, task: DiffusionTask) -> None:
        """Detaches the per-example hooks; across processes, checks the replicas are identical."""
        self.engine.close()
        if self.world.distributed:
            digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in self.params)).digest()
            mine = torch.tensor(list(digest[:8]), dtype=torch.int64)
            gathered = [torch.zeros_like(mine) for _ in range(self.world.size)]
            dist.all_gather(gathered, mine)
            if any(not torch.equal(g, gathered[0]) for g in gathered):
                raise ModelError("DP replicas diverged across processes (adapter weights differ)")

    def privacy_spent(self) -> dict[str, Any]:
        if self._privacy is not None and self._privacy["steps"] == self.accountant_steps():
            return self._privacy
        dp, plan, history = self.config.dp, self.plan, self.accountant.history
        reported = compute_epsilon(history, plan.delta, dp.accountant, dp.eps_error)
        self._privacy = {
            "epsilon": _finite(reported.value),
            "delta": plan.delta,
            "noise_multiplier": plan.noise_multiplier,
            "sample_rate": plan.sample_rate,
            "steps": self.accountant_steps(),
            "noise_multiplicity": dp.noise_multiplicity,
            "max_grad_norm": dp.max_grad_norm,
            "accountant": reported.accountant,  # the one whose ε is reported (PLD when PRV was over the cap)
            "accountant_requested": dp.accountant,
            "accountant_note": reported.note,
            "clipping": "flat",
            "unit": "example",
            "neighbouring": "add-remove",
            "epsilon_pld": _finite(pld_epsilon(history, plan.delta)),
            "epsilon_rdp": _finite(opacus_epsilon(history, plan.delta, "rdp")),
            "eps_error": dp.eps_error,
            "target_epsilon": plan.target_epsilon,
            "expected_batch_size": plan.expected_batch_size,
            "physical_batch_size": dp.physical_batch_size,
            "dataset_size": plan.dataset_size,
            "empty_batches": self.empty_batches,
            "engine": dp.engine,
            "per_example_gradients": self._layer_choices(),
            "world_size": self.world.size,
            "opacus_version": metadata.version("opacus"),
            "dp_accounting_version": metadata.version("dp-accounting"),
            "secure_rng": dp.secure_rng,
            "dp_covered": {"adapter": True, "samples": True, "training_curves": False},
            "plan": asdict(plan),
        }
        return self._privacy

    def _layer_choices(self) -> dict[str, Any]:
        """Which LoRA layers materialised their per-example gradients and which used ghost norms."""
        engine = getattr(self, "engine", None)
        choices = engine.layer_choices() if engine is not None else {}
        ghost = sorted(name for name, how in choices.items() if how == "ghost")
        return {"ghost_norms": self.config.dp.ghost_norms if self.config.dp.engine == "lora" else "never",
                "ghost_layers": ghost, "materialised_layers": len(choices) - len(ghost) if choices else None}

    def accountant_steps(self) -> int:
        return sum(steps for _, _, steps in self.accountant.history)

    def adapter_metadata(self) -> dict[str, str]:
        """The shared header: the guarantee, and nothing about the data (dp-lora.md §10)."""
        privacy = self.privacy_spent()
        fields = ("epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "noise_multiplicity",
                  "max_grad_norm", "accountant", "clipping", "unit", "neighbouring")
        header = {"privdiff.method": self.name}
        for key in fields:
            value = privacy[key]
            header[f"privdiff.dp.{key}"] = "inf" if value is None else (repr(value) if isinstance(value, float)
                                                                         else str(value))
        return header

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "accountant": self.accountant.state_dict(),
                "empty_batches": self.empty_batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.accountant.load_state_dict(state["accountant"])
        self.empty_batches = state["empty_batches"]
