"""The weights attack measured end to end on the shipped face base (weights-attack.md §11.8, slow).

Small scale (8 held-out victims, 1,000 shadow fine-tune steps): what holds there is asserted,
with paired 95 % intervals over victims; the README reports the full run.
"""

from __future__ import annotations

import numpy as np
import pytest

from privdiff.config import load_config
from privdiff.metrics.intervals import mean_interval
from privdiff.weights.config import WeightsAttackConfig
from privdiff.weights.run import run_weights_attack


def _paired(rows: list[dict], a: str, b: str) -> tuple[float, float]:
    diff = np.array([r[a]["identity_similarity"] - r[b]["identity_similarity"] for r in rows])
    return mean_interval(diff, seed=0, key=f"{a}-{b}")


@pytest.mark.slow
def test_the_shared_file_reveals_the_identity_on_held_out_victims(tmp_path):
    config = load_config(None, [f"output_dir={tmp_path / 'run'}", "data.victims=8", "training.budget_steps=1000",
                                "eval.baseline_victims=0", "eval.grid_victims=4"], kind=WeightsAttackConfig)
    result = run_weights_attack(config, show_progress=False)
    rows = result["victims"]
    # The victim's weights carry the identity: its model beats the base model under the true prompt,
    # and the attack (the file alone) beats the base model too.
    assert _paired(rows, "true_prompt", "base")[0] > 0
    assert _paired(rows, "attack", "base")[0] > 0
    assert _paired(rows, "true_prompt", "random_embedding")[0] > 0
    assert result["ablation"]["encoder"]["finetune_steps"] == result["encoder"]["finetune_steps"] == 1000
    assert result["encoder"]["pairs"] == 1000 and result["ablation"]["encoder"]["pairs"] == 5
