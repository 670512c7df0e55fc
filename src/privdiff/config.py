"""Run configuration: dataclasses per room, composed into `RunConfig`.

Loaded from YAML with the safe loader, overridden by dotted keys (`train.steps=100`), validated
on load, and saved fully resolved next to every run's outputs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from privdiff.errors import ConfigError

# Field metadata of filesystem paths: made absolute on load, so that a config handed to another
# process (torchrun ranks, Flower apps, LiRA shadows) or saved in a run folder means the same files
# from any working directory. DATASET_PATH: a built-in dataset name stays a name.
PATH = {"path": "path"}
DATASET_PATH = {"path": "dataset"}
# The built-in datasets a config may name (their loaders: `privdiff.data.builtin`, which checks the two agree).
BUILTIN_DATASET_NAMES = ("digits", "faces", "glyphs", "fill", "identities")
# Images larger than this are refused before decoding (a 380 KB PNG can declare 20000 x 20000 pixels).
MAX_IMAGE_PIXELS = 40_000_000

Scheduler = Literal["ddim", "ddpm"]  # the samplers of `privdiff.models.generation`


class ConfigRoot:
    """A config `load_config` can load: a dataclass tree, saved as `to_dict()`, checked by `validate()`.

    Choices are `Literal` fields: a file or override outside them is refused while loading, and
    `validate` refuses one set in code through `choice_checks`.
    """

    # Top-level sections that change how a result is computed but never the result (the encoding
    # cache): a resumed run may change them.
    RESULT_NEUTRAL: ClassVar[tuple[str, ...]] = ()

    def validate(self) -> Any:
        """Raises ConfigError on the first invalid value; returns the config."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class DataSelection:
    """Which images, and how many: the first fields of every room's data section."""

    name: str = field(default="digits", metadata=DATASET_PATH)  # a built-in dataset name, or an imagefolder
    image_size: int = 32
    num_examples: int | None = 256  # seeded subset of the dataset; null = all of it
    seed: int = 0  # picks the subset


@dataclass
class DataConfig(DataSelection):
    max_image_pixels: int = MAX_IMAGE_PIXELS  # an image folder's images above this are refused, unread


@dataclass
class MembershipConfig:
    """Manifest proportions (smp-lora.md §2); defaults reproduce the 433/400, 200/233, 200/200 split."""

    manifest: str | None = field(default=None, metadata=PATH)  # an existing membership.json to reuse (paired results)
    seed: int = 0
    member_fraction: float = 0.52
    member_aux_fraction: float = 0.462
    nonmember_aux_fraction: float = 0.5


@dataclass
class ModelConfig:
    pretrained: str | None = field(default=None, metadata=PATH)  # local Stable Diffusion folder; null = the shipped tiny base


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 4.0  # scale alpha/rank = 0.5, as the reference recipe (smp-lora.md §3)
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    dropout: float = 0.0


@dataclass
class TrainConfig:
    method: str = "lora"
    steps: int = 600
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float | None = None  # gradient-norm clipping of the batch gradient (not DP)
    caption_dropout: float = 0.0  # probability of training on the empty prompt (for guidance)
    checkpoint_every: int = 100
    log_every: int = 10
    snapshots: int | None = None  # adapters saved evenly over the run; null = the method's default
    seed: int = 0


@dataclass
class DPConfig:
    """DP-SGD settings of `train.method: dp-lora` (dp-lora.md §9); N = number of training members."""

    target_epsilon: float | None = 8.0  # sigma is calibrated to it; null when noise_multiplier is given
    delta: float | None = None  # null = min(1e-5, 0.1/N); delta >= 1/N is refused
    noise_multiplier: float | None = None  # fixed sigma instead of a target epsilon (never both)
    max_grad_norm: float = 1e-3  # per-example clip norm C (flat, over all LoRA tensors)
    noise_multiplicity: int = 4  # K (t, noise) draws averaged inside each example before clipping
    expected_batch_size: int | None = None  # B; Poisson rate q = B/N; null = min(64, N // 4)
    physical_batch_size: int = 16  # examples per forward/backward chunk (memory), never changes the result
    epochs: float | None = 50.0  # steps = ceil(epochs / q); null = use train.steps
    accountant: Literal["prv", "rdp"] = "prv"  # prv (tight) | rdp (comparability with older work)
    eps_error: float = 1e-3  # PRV accuracy; its epsilon is an upper bound about this much above PLD
    engine: Literal["lora", "hooks", "functorch"] = "lora"  # per-example gradients: lora (closed form in the LoRA layers, fastest) | hooks (Opacus) | functorch (vmap)
    ghost_norms: Literal["auto", "never", "always"] = "auto"  # lora engine: per layer, materialise per-example gradients or keep them implicit (Gram-matrix norms) by cost | never | always (every linear LoRA)
    secure_rng: bool = False  # Opacus secure mode (needs torchcsprng) for noise and Poisson masks


@dataclass
class SMPConfig:
    """MP-LoRA / SMP-LoRA settings (smp-lora.md §4-§7, §10): the proxy attacker and the objective."""

    lam: float = 1.0  # λ, weight of the proxy's member cross-entropy CE_m
    beta: float = 1.0  # β > 0 in J_SMP = L / (β + λ·CE_m + 1e-5)
    proxy_steps: int = 1  # k proxy Adam steps per LoRA step
    proxy_lr: float = 1e-5  # the reference's; tiny models may need 1e-4..1e-3
    proxy_weight_decay: float = 1e-4
    proxy_batch_per_class: int = 1  # aux members + as many aux non-members per proxy step
    probe_every: int = 1  # epochs between probes (proxy accuracy on aux/test, held-out loss)
    probe_draws: int = 1  # fresh (t, noise) draws per example in a probe


@dataclass
class SampleConfig:
    num_images: int = 16
    num_inference_steps: int = 25
    scheduler: Scheduler = "ddim"
    guidance_scale: float = 3.0
    seed: int = 0
    prompts: list[str] | None = None  # null = captions of the private data, one per image


Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass
class RuntimeConfig:
    """Where models run (`privdiff.runtime` resolves and checks both against the machine)."""

    device: str = "auto"  # auto (this rank's GPU when CUDA is present, else the CPU) | cpu | cuda | cuda:N | mps
    precision: Precision = "auto"  # frozen weights only; auto = bf16 on CUDA devices that support it, else fp32


@dataclass
class CacheConfig:
    """The on-disk cache of VAE latents and caption states (`privdiff.diffusion.cache`): results are
    bit-identical with and without it."""

    enabled: bool = True  # false: encode everything afresh, read and write nothing (--no-cache)
    dir: str | None = field(default=None, metadata=PATH)  # null = $PRIVDIFF_CACHE or ~/.cache/privdiff/encodings


@dataclass
class RunConfig(ConfigRoot):
    output_dir: str = field(default="runs/finetune", metadata=PATH)
    data: DataConfig = field(default_factory=DataConfig)
    membership: MembershipConfig = field(default_factory=MembershipConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    smp: SMPConfig = field(default_factory=SMPConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)

    RESULT_NEUTRAL = ("cache",)

    def validate(self) -> "RunConfig":
        """Raises ConfigError on the first invalid value."""
        checks = [
            *choice_checks(self),
            (self.data.image_size >= 8 and self.data.image_size % 8 == 0,
             "data.image_size must be a multiple of 8 and >= 8"),
            (self.data.num_examples is None or self.data.num_examples >= 4,
             "data.num_examples must be >= 4 (or null for all)"),
            (self.data.max_image_pixels >= 1, "data.max_image_pixels must be >= 1"),
            (0 < self.membership.member_fraction < 1, "membership.member_fraction must be in (0, 1)"),
            (0 < self.membership.member_aux_fraction < 1, "membership.member_aux_fraction must be in (0, 1)"),
            (0 < self.membership.nonmember_aux_fraction < 1,
             "membership.nonmember_aux_fraction must be in (0, 1)"),
            (self.lora.rank >= 1, "lora.rank must be >= 1"),
            (self.lora.alpha > 0, "lora.alpha must be > 0"),
            (bool(self.lora.target_modules), "lora.target_modules must not be empty"),
            (0 <= self.lora.dropout < 1, "lora.dropout must be in [0, 1)"),
            (self.train.steps >= 1, "train.steps must be >= 1"),
            (self.train.batch_size >= 1, "train.batch_size must be >= 1"),
            (self.train.learning_rate > 0, "train.learning_rate must be > 0"),
            (self.train.weight_decay >= 0, "train.weight_decay must be >= 0"),
            (self.train.max_grad_norm is None or self.train.max_grad_norm > 0,
             "train.max_grad_norm must be > 0 (or null)"),
            (0 <= self.train.caption_dropout < 1, "train.caption_dropout must be in [0, 1)"),
            (self.train.checkpoint_every >= 1, "train.checkpoint_every must be >= 1"),
            (self.train.log_every >= 1, "train.log_every must be >= 1"),
            (self.train.snapshots is None or self.train.snapshots >= 0, "train.snapshots must be >= 0 (or null)"),
            *self.dp_checks(),
            (self.smp.lam >= 0, "smp.lam (λ) must be >= 0"),
            (self.smp.beta > 0, "smp.beta (β) must be > 0: with β = 0 the SMP objective explodes as CE_m -> 0"),
            (self.smp.proxy_steps >= 1, "smp.proxy_steps (k) must be >= 1"),
            (self.smp.proxy_lr > 0, "smp.proxy_lr must be > 0"),
            (self.smp.proxy_weight_decay >= 0, "smp.proxy_weight_decay must be >= 0"),
            (self.smp.proxy_batch_per_class >= 1, "smp.proxy_batch_per_class must be >= 1"),
            (self.smp.probe_every >= 1, "smp.probe_every must be >= 1"),
            (self.smp.probe_draws >= 1, "smp.probe_draws must be >= 1"),
            (self.sample.num_images >= 1, "sample.num_images must be >= 1"),
            (self.sample.num_inference_steps >= 1, "sample.num_inference_steps must be >= 1"),
            (self.sample.guidance_scale >= 1, "sample.guidance_scale must be >= 1"),
        ]
        raise_first_failure(checks)
        return self

    def dp_checks(self) -> list[tuple[bool, str]]:
        """Checks that need no data; N-dependent ones (delta < 1/N, B <= N) run when N is known."""
        dp = self.dp
        return [
            (dp.target_epsilon is None or dp.target_epsilon > 0, "dp.target_epsilon must be > 0"),
            (dp.noise_multiplier is None or dp.noise_multiplier >= 0, "dp.noise_multiplier must be >= 0"),
            ((dp.target_epsilon is None) != (dp.noise_multiplier is None),
             "give either a target epsilon (dp.target_epsilon) or a noise multiplier (dp.noise_multiplier), "
             "not both" if dp.target_epsilon is not None else
             "give a target epsilon (dp.target_epsilon) or a noise multiplier (dp.noise_multiplier)"),
            (dp.delta is None or 0 < dp.delta < 1, "dp.delta must be in (0, 1)"),
            (dp.max_grad_norm > 0, "dp.max_grad_norm must be > 0"),
            (dp.noise_multiplicity >= 1, "dp.noise_multiplicity must be >= 1"),
            (dp.expected_batch_size is None or dp.expected_batch_size >= 1, "dp.expected_batch_size must be >= 1"),
            (dp.physical_batch_size >= 1, "dp.physical_batch_size must be >= 1"),
            (dp.epochs is None or dp.epochs > 0, "dp.epochs must be > 0 (or null to use train.steps)"),
            (0 < dp.eps_error < 1, "dp.eps_error must be in (0, 1)"),
        ]


def raise_first_failure(checks: list[tuple[bool, str]]) -> None:
    """Raises ConfigError with the message of the first (ok, message) check that failed."""
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    """Builds dataclass `cls` from a dict, refusing unknown keys and wrong types."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(values).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown config key '{_join(where, unknown[0])}'")
    kwargs = {}
    for key, value in values.items():
        hint = hints[key]
        path = _join(where, key)
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, path)
        else:
            kwargs[key] = _coerce(value, hint, path)
    for f in dataclasses.fields(cls):
        if f.metadata.get("path") and isinstance(kwargs.get(f.name), str):
            kwargs[f.name] = absolute_path(kwargs[f.name], dataset=f.metadata["path"] == "dataset")
    return cls(**kwargs)


def absolute_path(value: str, dataset: bool = False) -> str:
    """`value` as an absolute path (user folder expanded); a dataset name is kept when it is a
    built-in's or names nothing on disk (its error then quotes it as typed)."""
    if dataset and (value in BUILTIN_DATASET_NAMES or not os.path.exists(os.path.expanduser(value))):
        return value
    return os.path.abspath(os.path.expanduser(value)) if value else value


def literal_choices(hint: Any) -> tuple[Any, ...] | None:
    """The values of a `Literal[...]` hint, or of `Literal[...] | None`; None for any other hint."""
    if get_origin(hint) is Literal:
        return get_args(hint)
    if get_origin(hint) in (Union, types.UnionType):
        for arg in get_args(hint):
            if get_origin(arg) is Literal:
                return get_args(arg)
    return None


def _is_choice(value: Any, hint: Any, choices: tuple[Any, ...]) -> bool:
    if value is None:
        return type(None) in get_args(hint)
    # by type too: YAML's `1` is not the choice "1", nor `true` the choice 1
    return any(value == choice and type(value) is type(choice) for choice in choices)


def _choice_message(path: str, choices: tuple[Any, ...], value: Any) -> str:
    return f"config key '{path}' must be one of {', '.join(map(str, choices))} (got {value!r})"


def choice_checks(config: Any, where: str = "") -> list[tuple[bool, str]]:
    """One (ok, message) check per `Literal` field of a dataclass tree, for `validate`: loading
    refuses a value outside the choices, this also refuses one set in code."""
    hints = get_type_hints(type(config))
    checks = []
    for f in dataclasses.fields(config):
        value, path = getattr(config, f.name), _join(where, f.name)
        if dataclasses.is_dataclass(value):
            checks += choice_checks(value, path)
        elif (choices := literal_choices(hints[f.name])) is not None:
            checks.append((_is_choice(value, hints[f.name], choices), _choice_message(path, choices, value)))
    return checks


def _coerce(value: Any, hint: Any, path: str) -> Any:
    choices = literal_choices(hint)
    if choices is not None:
        if not _is_choice(value, hint, choices):
            raise ConfigError(_choice_message(path, choices, value))
        return value
    text = str(hint)
    if value is None:
        if "None" in text:
            return None
        raise ConfigError(f"config key '{path}' may not be null")
    if hint is bool or text.startswith("bool"):
        if isinstance(value, bool):
            return value
    elif "list" in text:
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
    elif hint is float or text.startswith("float"):
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # .nan / .inf: every float setting is a finite number
                raise ConfigError(f"config key '{path}' must be a finite number, got {value!r}")
            return number
    elif hint is int or text.startswith("int"):
        if isinstance(value, int) and not isinstance(value, bool):
            if not -(1 << 63) <= value < 1 << 63:
                raise ConfigError(f"config key '{path}' is out of range ({value})")
            return value
    elif hint is str or text.startswith("str"):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"config key '{path}' has invalid value {value!r} (expected {_type_name(hint)})")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    return _build(RunConfig, values, "").validate()


class _StrictSafeLoader(yaml.SafeLoader):
    """The safe loader (no python/* tags), refusing a key given twice instead of keeping the last."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                base: Any = None, kind: type[ConfigRoot] = RunConfig) -> Any:
    """Loads a YAML config (safe loader) onto `base` (defaults of `kind`), applies `key=value` overrides.

    `kind` is the root dataclass, a `ConfigRoot`: RunConfig, or another room's (the split, weights
    attack, audit, evaluation or pre-training config).

    Raises:
        ConfigError: unreadable file, invalid YAML, unknown key, wrong type or invalid value.
    """
    values = (base or kind()).to_dict()
    if path is not None:
        try:
            loaded = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_StrictSafeLoader)
        except OSError as err:
            raise ConfigError(f"cannot read config {path}: {err.strerror}") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"config {path} is not UTF-8 text (byte {err.start})") from None
        except yaml.YAMLError as err:  # python/* tags included: the safe loader has no constructor for them
            raise ConfigError(f"config {path} is not valid YAML: {str(err).splitlines()[0]}") from None
        except RecursionError:
            raise ConfigError(f"config {path} is nested too deeply to be a privdiff config") from None
        _merge(values, loaded or {}, "")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        _merge(values, _nest(key.split("."), value), "")
    return _build(kind, values, "").validate()


def _nest(keys: list[str], value: Any) -> dict[str, Any]:
    out: Any = value
    for key in reversed(keys):
        out = {key: out}
    return out


def _merge(into: dict[str, Any], new: Any, where: str) -> None:
    if not isinstance(new, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping")
    for key, value in new.items():
        path = _join(where, str(key))
        if key not in into:
            raise ConfigError(f"unknown config key '{path}'")
        if isinstance(into[key], dict):
            _merge(into[key], value, path)
        else:
            into[key] = value


def config_yaml(config: Any) -> str:
    """The resolved config as YAML (what a run folder's config.yaml holds)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
