"""The weights-attack run's configuration (YAML + `--set section.key=value`, like every privdiff run)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import get_args

from privdiff.config import PATH, ConfigRoot, RuntimeConfig, choice_checks, raise_first_failure
from privdiff.errors import ConfigError
from privdiff.weights.finetune import FinetuneRecipe, GenerationConfig
from privdiff.weights.paradigm import EncoderTrainingConfig, PostHocDefence

DEFENCE_NAMES = (*get_args(PostHocDefence), "dp")


@dataclass
class AttackDataConfig:
    """Which identities play which part (all from the `attack` pool, split 80/20 by identity)."""

    shadows: int | None = None        # shadow identities used (null: all 720 minus validation)
    validation_shadows: int = 20      # held back from the shadows (recipe tuning, progress checks)
    victims: int = 24                 # held-out victims attacked (the gallery always has all 180)


@dataclass
class AttackEvalConfig:
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    sample_z: bool = False            # use a sample of z instead of its mean (the reference samples)
    grid_victims: int = 8             # victims drawn in the image grid
    ablation: bool = True             # ablation (i): no step token, end-of-run pairs, equal compute
    baseline_victims: int = 8         # victims attacked by update matching (the slow baseline); 0 = off
    baseline_iterations: int = 60
    seed: int = 0


@dataclass
class DefenceConfig:
    """Defences and their knobs, e.g. ["weight-noise=0.3,1,3", "prune=0.9,0.99", "rank=1,2", "dp=1,8"]."""

    apply: list[str] = field(default_factory=list)
    adaptive: bool = False            # also re-train the encoder on defended shadows (post-hoc defences)

    def parsed(self) -> list[tuple[str, float]]:
        out = []
        for item in self.apply:
            name, sep, knobs = item.partition("=")
            try:
                values = [float(k) for k in knobs.split(",") if k.strip()]
            except ValueError:
                values = []
            if not sep or not values:
                raise ConfigError(f"defences.apply: '{item}' must look like NAME=KNOB[,KNOB...], e.g. prune=0.9,0.99")
            out += [(name.strip(), v) for v in values]
        return out


@dataclass
class WeightsAttackConfig(ConfigRoot):
    output_dir: str = field(default="runs/weights-attack", metadata=PATH)
    base_model: str | None = field(default=None, metadata=PATH)  # diffusers folder; null = the shipped tiny-sd-identities
    seed: int = 0
    recipe: FinetuneRecipe = field(default_factory=FinetuneRecipe)
    training: EncoderTrainingConfig = field(default_factory=EncoderTrainingConfig)
    data: AttackDataConfig = field(default_factory=AttackDataConfig)
    eval: AttackEvalConfig = field(default_factory=AttackEvalConfig)
    defences: DefenceConfig = field(default_factory=DefenceConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)  # the CPU in fp32 for now (`require_cpu_fp32`)

    def validate(self) -> "WeightsAttackConfig":
        r, t, d = self.recipe, self.training, self.data
        checks = [
            *choice_checks(self),
            (r.rank >= 1 and r.alpha > 0, "recipe.rank must be >= 1 and recipe.alpha > 0"),
            (r.steps >= 1 and r.learning_rate > 0, "recipe.steps must be >= 1 and recipe.learning_rate > 0"),
            (1 <= r.images_per_identity <= 40, "recipe.images_per_identity must be in [1, 40]"),
            (r.prior_images >= 0, "recipe.prior_images must be >= 0"),
            (r.text_encoder_rank >= 0 and r.text_encoder_alpha > 0,
             "recipe.text_encoder_rank must be >= 0 (0 = off) and recipe.text_encoder_alpha > 0"),
            ("{}" in r.prompt_template, "recipe.prompt_template must contain {} (the trigger word)"),
            (t.budget_steps >= r.steps, "training.budget_steps must be >= recipe.steps (one full shadow run)"),
            (t.learning_rate > 0 and t.encoder_images >= 1, "training.learning_rate > 0 and encoder_images >= 1"),
            (t.concurrent_runs >= 1 and t.pair_batch >= 1, "training.concurrent_runs and pair_batch must be >= 1"),
            (d.victims >= 1 and d.validation_shadows >= 0, "data.victims must be >= 1"),
            (d.shadows is None or d.shadows >= 1, "data.shadows must be >= 1 (or null)"),
            (self.eval.generation.images >= 1 and self.eval.generation.inference_steps >= 1,
             "eval.generation sizes must be >= 1"),
        ]
        raise_first_failure(checks)
        for name, knob in self.defences.parsed():
            raise_first_failure([(name in DEFENCE_NAMES, f"defences.apply: unknown defence '{name}' "
                                                         f"(choose from: {', '.join(DEFENCE_NAMES)})"),
                                 (knob > 0, f"defences.apply: {name} knob must be > 0")])
        return self
