"""Accounting at its extremes (σ -> 0, ε -> 0, ε = 1e9, 10^5 steps): an answer or a one-line refusal,
within a minute and the 2 GiB memory cap."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from privdiff.dp.accounting import MEMORY_CAP_BYTES
from tests.adversarial.conftest import refused, run_isolated


@pytest.mark.parametrize("args, accountant", [
    (["-q", "0.25", "--sigma", "0.0001", "--steps", "100000"], "rdp"),  # σ -> 0: ε beyond 1e6, RDP's bound
    (["-q", "0.25", "--sigma", "0.5", "--steps", "100000"], "pld"),  # 10^5 steps, weak privacy
    (["-q", "0.01", "--sigma", "1", "--steps", "100000"], "pld"),
    (["-q", "0.25", "--target-epsilon", "1e5", "--steps", "100000"], "pld"),
    (["-q", "0.25", "--sigma", "0", "--steps", "10"], "prv"),  # no noise: ε = inf, said plainly
])
def test_extreme_histories_are_answered_within_the_caps(args, accountant, tmp_path: Path):
    out = tmp_path / "eps.json"
    code, err, peak = run_isolated(["epsilon", *args, "--json", str(out)])
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["reported"]["accountant"] == accountant
    assert result["reported"]["epsilon"] > 0 and peak <= MEMORY_CAP_BYTES


@pytest.mark.parametrize("args, message", [
    (["-q", "0.05", "--target-epsilon", "1e9", "--steps", "1000"], "no privacy worth calibrating"),
    (["-q", "0.05", "--target-epsilon", "1e-9", "--steps", "1000"], "cannot reach epsilon"),
    (["-q", "0.05", "--target-epsilon", "0", "--steps", "1000"], "target epsilon must be a finite number > 0"),
    (["-q", "0.05", "--sigma", "nan", "--steps", "10"], "--noise-multiplier must be a finite number"),
    (["-q", "0.05", "--sigma", "-1", "--steps", "10"], "--noise-multiplier must be a finite number"),
    (["-q", "0", "--sigma", "1", "--steps", "10"], "--sample-rate must be in (0, 1]"),
    (["-q", "0.05", "--sigma", "1", "--steps", "0"], "steps must be in [1, 1e8]"),
    (["-q", "0.05", "--sigma", "1", "--steps", "10", "--delta", "1"], "--delta must be in (0, 1)"),
    (["-q", "0.05", "--sigma", "1", "--target-epsilon", "1", "--steps", "10"], "one of them"),
])
def test_impossible_requests_are_refused_in_one_line(args, message, capsys):
    assert message in refused(["epsilon", *args], capsys)


@pytest.mark.parametrize("flags, message", [
    (["--target-epsilon", "1e9"], "no privacy worth calibrating"),
    (["--target-epsilon", "1e-9"], "cannot reach epsilon"),
])
def test_finetune_with_an_extreme_target_refuses_before_writing(flags, message, tmp_path: Path, capsys):
    out = tmp_path / "run"
    assert message in refused(["finetune", "--method", "dp-lora", "--num-examples", "64", "--out", str(out),
                               "--quiet", *flags], capsys)
    assert not out.exists()

