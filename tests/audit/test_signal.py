"""Signal (spec §9.8): on a LoRA over-fitted to a small private set, the best attack is far above chance.

The demo's own number (SimA AUC 0.906 [0.839, 0.955] at 56 + 48 test examples) is measured by
`privdiff demo`; this test reproduces the effect on the small test model in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from privdiff.audit.run import AuditConfig, run_audit
from privdiff.training.run import run_training
from tests.conftest import tiny_run_config


@pytest.mark.slow
def test_overfitted_lora_is_caught(tiny_pipeline_dir: Path, tmp_path: Path):
    targets = json.dumps(["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])
    cfg = tiny_run_config(tmp_path, tiny_pipeline_dir, **{
        "data.num_examples": 120, "train.steps": 400, "train.batch_size": 16, "train.learning_rate": 0.01,
        "lora.rank": 16, "lora.alpha": 8, "lora.target_modules": targets, "train.checkpoint_every": 1000,
        "train.log_every": 50})
    run = run_training(cfg, show_progress=False)
    audit = run_audit(run, AuditConfig(attacks=["loss", "pia", "sima"], bootstrap=200), show_progress=False)
    best = audit["attacks"][audit["best_attack"]]
    assert best["auc"] >= 0.8, (audit["best_attack"], best["auc"], best["auc_ci"])
    assert best["auc_ci"][0] > 0.5 + 2 * audit["null_auc_sd"]
