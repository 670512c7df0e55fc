"""The demo's orchestration: which runs the default and --full demos make, demo.json's phases and claims.

Training, evaluation, audits and the report are replaced by fakes that write what the real ones
write (summary.json, audit.json), so the test takes milliseconds; the real demo is the long test in
tests/cli/test_cli.py and benchmarks/bench_demo.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from privdiff import demo


def _audit(best: str, aucs: dict[str, tuple[float, float, float]]) -> dict:
    return {"best_attack": best, "null_auc_sd": 0.057, "n_members_test": 56, "n_nonmembers_test": 48,
            "attacks": {n: {"auc": {"value": v, "ci": [lo, hi], "n": 104}, "tpr_at_fpr": {"0.05": {"value": 0.5}}}
                        for n, (v, lo, hi) in aucs.items()}}


@pytest.fixture
def fakes(monkeypatch) -> list[str]:
    calls = []

    def train(cfg, **_):
        out = Path(cfg.output_dir)
        out.mkdir(parents=True)
        privacy = {"epsilon": 7.999, "delta": 1e-5, "accountant": "prv", "epsilon_pld": 7.998, "noise_multiplier": 2.3,
                   "sample_rate": 0.25, "steps": 3, "noise_multiplicity": 2} if cfg.train.method == "dp-lora" else {}
        (out / "summary.json").write_text(json.dumps({"privacy": privacy, "final_loss": 0.1, "steps": 3,
                                                      "metrics": {}}))
        (out / "membership.json").write_text("{}")
        calls.append(f"train {out.name}")
        return out

    def early_stop(candidate, reference, out, **_):
        Path(out).mkdir()
        (Path(out) / "summary.json").write_text(json.dumps({"privacy": {}, "final_loss": 0.1, "steps": 2,
                                                            "metrics": {}}))
        calls.append(f"early-stop {Path(out).name}")
        return Path(out)

    def audit(path, cfg, **_):
        folder = Path(path) / "audit" / ("control" if cfg.control else "")
        folder.mkdir(parents=True, exist_ok=True)
        caught = Path(path).name == "lora" and not cfg.control
        record = _audit("sima", {"sima": (0.906, 0.839, 0.955) if caught else (0.51, 0.40, 0.62),
                                 "loss": (0.55, 0.44, 0.66)})
        (folder / "audit.json").write_text(json.dumps(record))
        calls.append(f"audit {Path(path).name}{' control' if cfg.control else ''}")

    def report(paths, out):
        Path(out).write_text("<html></html>")
        return Path(out)

    monkeypatch.setattr(demo, "run_training", train)
    monkeypatch.setattr(demo, "early_stop_like", early_stop)
    monkeypatch.setattr(demo, "evaluate_run", lambda path, cfg, **_: calls.append(f"evaluate {Path(path).name}"))
    monkeypatch.setattr(demo, "run_audit", audit)
    monkeypatch.setattr(demo, "write_report", report)
    return calls


def test_the_default_demo_is_plain_and_dp_lora_with_the_control(tmp_path: Path, fakes: list[str]):
    result = demo.run_demo(tmp_path, show_progress=False)
    assert fakes == ["train lora", "train dp-lora", "evaluate lora", "audit lora", "evaluate dp-lora",
                     "audit dp-lora", "audit lora control"]
    record = json.loads((tmp_path / "demo.json").read_text())
    assert list(record["phases_s"]) == list(record["phases_cpu_s"]) == [
        "train lora", "train dp-lora", "evaluate lora", "audit lora", "evaluate dp-lora", "audit dp-lora",
        "audit control", "report"]
    claims = record["claims"]
    assert claims["lora caught"]["holds"] and claims["lora caught"]["attack"] == "sima"
    assert claims["dp-lora at chance"]["holds"] and claims["dp-lora at chance"]["epsilon"] == 7.999
    assert claims["control at chance"]["holds"] and not record["full"]
    assert "phases: train lora" in result.describe()


def test_full_adds_smp_lora_and_the_early_stopped_lora(tmp_path: Path, fakes: list[str]):
    demo.run_demo(tmp_path, show_progress=False, full=True)
    assert fakes[:4] == ["train lora", "train dp-lora", "train smp-lora", "early-stop lora-early"]
    assert {"evaluate smp-lora", "audit smp-lora", "evaluate lora-early", "audit lora-early"} <= set(fakes)
    assert json.loads((tmp_path / "demo.json").read_text())["full"] is True


def test_a_claim_that_fails_says_so(tmp_path: Path, fakes: list[str], monkeypatch):
    """A plain LoRA the attacks do not catch: the claim is recorded as not holding, not dropped."""
    monkeypatch.setattr(demo, "CAUGHT_MIN_AUC", 0.95)
    demo.run_demo(tmp_path, show_progress=False)
    claim = json.loads((tmp_path / "demo.json").read_text())["claims"]["lora caught"]
    assert claim["holds"] is False and claim["auc"]["value"] == 0.906
