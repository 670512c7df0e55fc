from pathlib import Path

import pytest

from privdiff.config import RunConfig, load_config
from privdiff.errors import ConfigError


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
    ("sample.scheduler=euler", "sample.scheduler"),
    ("train.steps", "must look like section.key=value"),
    ("train=3", "train must be a mapping"),
])
def test_invalid_values_raise_clear_errors(override: str, message: str):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(None, [override])


def test_yaml_is_loaded_safely(tmp_path: Path):
    path = tmp_path / "evil.yaml"
    path.write_text("train: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_missing_config_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")
