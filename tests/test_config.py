import dataclasses
import functools
import re
from pathlib import Path

import pytest

from privdiff.audit.run import AuditConfig
from privdiff.config import DataConfig, RunConfig, config_yaml, load_config
from privdiff.errors import ConfigError
from privdiff.evaluation import EvalConfig
from privdiff.recipes.glyph_base import PretrainConfig
from privdiff.split.config import SplitConfig, SplitDataConfig
from privdiff.weights.config import WeightsAttackConfig


def test_defaults_validate():
    assert load_config(None).to_dict() == {**RunConfig().to_dict(), "output_dir": str(Path("runs/finetune").absolute())}


def test_paths_are_made_absolute_and_dataset_names_kept(tmp_path: Path, monkeypatch):
    """Configs travel to other processes (torchrun ranks, Flower apps, shadows) with other working
    directories: every path in them is absolute; built-in dataset names stay names."""
    (tmp_path / "my_images").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["output_dir=runs/x", "data.name=my_images", "model.pretrained=~/sd15",
                             "membership.manifest=m.json"])
    assert cfg.output_dir == str(tmp_path / "runs" / "x") and cfg.data.name == str(tmp_path / "my_images")
    assert cfg.model.pretrained == str(Path.home() / "sd15") and cfg.membership.manifest == str(tmp_path / "m.json")
    assert load_config(None, ["data.name=digits"]).data.name == "digits"
    assert load_config(None, ["data.name=no-such-folder"]).data.name == "no-such-folder"  # its error quotes it


def test_yaml_and_overrides_apply_in_order(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 50\n  learning_rate: 0.01\nlora:\n  rank: 4\n")
    cfg = load_config(path, ["train.steps=7", "lora.target_modules=[to_q, to_v]", "data.num_examples=null"])
    assert cfg.train.steps == 7 and cfg.train.learning_rate == 0.01 and cfg.lora.rank == 4
    assert cfg.lora.target_modules == ["to_q", "to_v"] and cfg.data.num_examples is None


def test_integer_accepted_for_float_but_not_reverse():
    assert load_config(None, ["train.learning_rate=1"]).train.learning_rate == 1.0
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(None, ["train.steps=1.5"])


@pytest.mark.parametrize("override, message", [
    ("train.stepz=3", "unknown config key 'train.stepz'"),
    ("nosection.x=1", "unknown config key 'nosection'"),
    ("train.steps=0", "train.steps must be >= 1"),
    ("train.steps=ten", "train.steps"),
    ("lora.alpha=-1", "lora.alpha must be > 0"),
    ("sample.scheduler=euler", "config key 'sample.scheduler' must be one of ddim, ddpm (got 'euler')"),
    ("train.steps", "must look like section.key=value"),
    ("train=3", "train must be a mapping"),
])
def test_invalid_values_raise_clear_errors(override: str, message: str):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_yaml_is_loaded_safely(tmp_path: Path):
    path = tmp_path / "evil.yaml"
    path.write_text("train: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_missing_config_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")


ROOTS = [RunConfig, SplitConfig, WeightsAttackConfig, AuditConfig, EvalConfig, PretrainConfig]


@pytest.mark.parametrize("kind", ROOTS, ids=lambda kind: kind.__name__)
def test_every_config_root_loads_saves_and_loads_back(kind, tmp_path: Path):
    """Issue 27: every config root goes through `load_config` like the finetune run's, to and from YAML."""
    default = kind()
    if hasattr(default, "output_dir"):  # the only path with a default: made absolute on load
        default = dataclasses.replace(default, output_dir=str(Path(default.output_dir).absolute()))
    loaded = load_config(None, kind=kind)
    assert type(loaded) is kind and loaded == default
    saved = tmp_path / "config.yaml"
    saved.write_text(config_yaml(loaded))
    assert load_config(saved, kind=kind) == loaded
    with pytest.raises(ConfigError) as error:
        load_config(None, ["no_such_key=1"], kind=kind)
    assert str(error.value) == "unknown config key 'no_such_key'"
    saved.write_text("no_such_key: 1\n")
    with pytest.raises(ConfigError, match="^unknown config key 'no_such_key'$"):
        load_config(saved, kind=kind)


@pytest.mark.parametrize("kind, key, choices", [
    (RunConfig, "sample.scheduler", "ddim, ddpm"),
    (RunConfig, "dp.accountant", "prv, rdp"),
    (RunConfig, "dp.engine", "lora, hooks, functorch"),
    (SplitConfig, "protocol.design", "backward-free, vanilla"),
    (SplitConfig, "protocol.activation", "identity, symsigmoid"),
    (SplitConfig, "protocol.precision", "fp16, fp32"),
    (SplitConfig, "protocol.send", "s0, x_t"),
    (SplitConfig, "data.shard", "iid, colour"),
    (SplitConfig, "eval.prompt", "real, zero"),
    (WeightsAttackConfig, "training.mode", "delta, raw, canonical"),
    (WeightsAttackConfig, "training.pairs", "every-step, end-of-run"),
    (WeightsAttackConfig, "training.defence", "weight-noise, prune, rank"),
    (EvalConfig, "scheduler", "ddim, ddpm"),
])
def test_choices_are_literals_refused_with_the_key_and_the_choices(kind, key, choices):
    for choice in choices.split(", "):  # every choice loads as itself
        assert functools.reduce(getattr, key.split("."), load_config(None, [f"{key}={choice}"], kind=kind)) == choice
    for wrong, shown in (("euler", "'euler'"), ("16", "16"), ("null", "None")):
        if key == "training.defence" and wrong == "null":
            continue  # the one nullable choice: null = undefended shadows
        with pytest.raises(ConfigError) as error:
            load_config(None, [f"{key}={wrong}"], kind=kind)
        assert str(error.value) == f"config key '{key}' must be one of {choices} (got {shown})"


def test_a_choice_set_in_code_is_refused_by_validate():
    run = RunConfig()
    run.sample.scheduler = "euler"
    with pytest.raises(ConfigError, match=re.escape("config key 'sample.scheduler' must be one of ddim, ddpm "
                                                    "(got 'euler')")):
        run.validate()
    with pytest.raises(ConfigError, match=re.escape("config key 'scheduler' must be one of ddim, ddpm (got 'x')")):
        EvalConfig(scheduler="x").validate()
    weights = WeightsAttackConfig()
    with pytest.raises(ConfigError, match=re.escape("config key 'training.defence' must be one of weight-noise, "
                                                    "prune, rank (got 'dp')")):
        dataclasses.replace(weights, training=dataclasses.replace(weights.training, defence="dp")).validate()
    assert load_config(None, ["training.defence=prune", "training.defence_knob=0.9"],
                       kind=WeightsAttackConfig).training.defence == "prune"


def test_the_split_data_config_is_the_data_config_with_additions():
    """Composed, not re-declared: the split run's data section is a DataConfig with its own defaults,
    its fields in the order its config.yaml has always had."""
    assert issubclass(SplitDataConfig, DataConfig)
    assert list(SplitConfig().to_dict()["data"]) == ["name", "image_size", "num_examples", "seed", "shard",
                                                     "test_examples", "test_seed", "max_image_pixels"]
    assert list(RunConfig().to_dict()["data"]) == ["name", "image_size", "num_examples", "seed", "max_image_pixels"]
    split = load_config(None, kind=SplitConfig).data
    assert (split.name, split.num_examples) == ("fill", 2000) and RunConfig().data.name == "digits"
    with pytest.raises(ConfigError, match="config key 'data.num_examples' may not be null"):
        load_config(None, ["data.num_examples=null"], kind=SplitConfig)
    with pytest.raises(ConfigError, match="data.num_examples must be >= train.clients"):
        load_config(None, ["data.num_examples=1"], kind=SplitConfig)


@pytest.mark.parametrize("kind, overrides, message", [
    (AuditConfig, ["attacks=[gsa9]"], "unknown attack 'gsa9' (choose from loss, "),
    (AuditConfig, ["attacks=[]"], "audit: no attacks selected"),
    (AuditConfig, ["attacks=[lira-online]", "shadows=3"], "audit: --shadows must be even and >= 2 for LiRA, got 3"),
    (AuditConfig, ["bootstrap=5"], "audit: bootstrap must be >= 20 resamples"),
    (EvalConfig, ["num_samples=1"], "evaluate: num_samples must be >= 10"),
    (EvalConfig, ["kid_subsets=1"], "evaluate: KID needs >= 2 subsets of >= 2"),
    (PretrainConfig, ["vae_steps=0"], "num_glyphs, vae_steps and unet_steps must be >= 1"),
    (PretrainConfig, ["caption_dropout=1"], "caption_dropout must be in [0, 1)"),
])
def test_audit_evaluation_and_pretraining_settings_are_validated_on_load(kind, overrides, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        load_config(None, overrides, kind=kind)
