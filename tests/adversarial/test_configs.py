"""Hostile YAML configs: refused in one line before anything is written, and never executed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.adversarial.conftest import refused

CONFIGS = {
    "python_object_tag": ('train: !!python/object/apply:os.system ["touch {pwned}"]', "not valid YAML"),
    "python_name_tag": ("train:\n  steps: !!python/name:os.system", "not valid YAML"),
    "unknown_top_level_key": ("trian:\n  steps: 3", "unknown config key 'trian'"),
    "unknown_nested_key": ("train:\n  stepz: 3", "unknown config key 'train.stepz'"),
    "nan_learning_rate": ("train:\n  learning_rate: .nan", "'train.learning_rate' must be a finite number"),
    "inf_weight_decay": ("train:\n  weight_decay: .inf", "'train.weight_decay' must be a finite number"),
    "nan_target_epsilon": ("dp:\n  target_epsilon: .nan", "'dp.target_epsilon' must be a finite number"),
    "negative_steps": ("train:\n  steps: -5", "train.steps must be >= 1"),
    "negative_weight_decay": ("train:\n  weight_decay: -1", "train.weight_decay must be >= 0"),
    "negative_clip_norm": ("train:\n  method: dp-lora\ndp:\n  max_grad_norm: -0.001", "dp.max_grad_norm must be > 0"),
    "zero_delta": ("dp:\n  delta: 0", "dp.delta must be in (0, 1)"),
    "string_for_int": ("train:\n  steps: many", "'train.steps' has invalid value 'many'"),
    "int_out_of_range": ("train:\n  seed: 99999999999999999999999", "'train.seed' is out of range"),
    "scalar_for_section": ("train: 5", "train must be a mapping"),
    "list_at_top": ("- train\n- dp", "config must be a mapping"),
    "nested_list_for_modules": ("lora:\n  target_modules: [[to_q], [to_k]]", "'lora.target_modules' has invalid"),
    "alias_bomb": ("a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                   "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nlora:\n  target_modules: [*c, *c, *c]",
                   "unknown config key 'a'"),
    "deeply_nested": ("train: " + "[" * 20000 + "]" * 20000, "nested too deeply"),
    "duplicate_key": ("train:\n  steps: 3\n  steps: 5", "duplicate key 'steps'"),
    "syntax_error": ("train:\n  steps: [1, 2", "not valid YAML"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hostile_config_is_refused_in_one_line_and_writes_nothing(name: str, tmp_path: Path, capsys):
    text, message = CONFIGS[name]
    pwned = tmp_path / "PWNED"
    config = tmp_path / "config.yaml"
    config.write_text(text.replace("{pwned}", str(pwned)))
    out = tmp_path / "run"
    assert message in refused(["finetune", "--config", str(config), "--out", str(out), "--quiet"], capsys)
    assert not out.exists() and not pwned.exists()


def test_a_config_that_is_not_utf8_is_refused(tmp_path: Path, capsys):
    config = tmp_path / "config.yaml"
    config.write_bytes(b"train:\n  method: l\xf6ra\n")
    assert "not UTF-8" in refused(["finetune", "--config", str(config), "--out", str(tmp_path / "run")], capsys)


@pytest.mark.parametrize("override, message", [
    ("protocol.t_start=-1", "protocol.t_start must be in [0, 998]"),
    ("train.learning_rate=.nan", "must be a finite number"),
    ("data.max_image_pixels=0", "data.max_image_pixels must be >= 1"),
])
def test_hostile_split_settings_are_refused(override: str, message: str, tmp_path: Path, capsys):
    out = tmp_path / "split"
    assert message in refused(["split", "simulate", "--out", str(out), "--set", override], capsys)
    assert not out.exists()
