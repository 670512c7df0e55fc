import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def run_quick(script: str, out: Path) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow
def test_bench_finetune_quick_writes_json(tmp_path: Path):
    result, stdout = run_quick("bench_finetune.py", tmp_path / "bench.json")
    assert result["finetune"]["steps_per_s"] > 0 and result["finetune"]["peak_rss_mib"] > 0
    assert result["demo"] is None  # quick mode leaves the demo to the CLI test
    assert {"commit", "date", "hardware", "torch"} <= set(result["meta"])  # the stamp render_docs.py prints
    assert "steps/s" in stdout


@pytest.mark.long
def test_bench_dp_quick_writes_json(tmp_path: Path):
    result, stdout = run_quick("bench_dp.py", tmp_path / "bench.json")
    ratios = result["timing"]["demo adapter (attention + convs, r 16)"]["ratio_to_lora"]
    assert set(ratios) == {"lora", "dp-lora K=1", "dp-lora K=2"} and ratios["lora"] == 1.0
    assert all(v > 0 for v in result["step_memory_mib"].values())
    assert result["utility"]["dp-lora eps=8"]["privacy"]["epsilon"] <= 8
    assert "/ lora" in stdout


@pytest.mark.slow
def test_bench_evaluate_quick_writes_json(tmp_path: Path):
    result, stdout = run_quick("bench_evaluate.py", tmp_path / "bench.json")
    assert result["num_samples"] == 20 and result["total_s"] > 0
    assert set(result["timings_s"]) == {"load_s", "generation_s", "features_s", "statistics_s", "heldout_loss_s"}
    assert "generation throughput" in stdout


@pytest.mark.long
def test_bench_audit_quick_writes_json(tmp_path: Path):
    result, stdout = run_quick("bench_audit.py", tmp_path / "bench.json")
    assert set(result["attacks"]) == {"loss", "pia", "secmi", "sima", "proxy", "lira-online", "lira-offline",
                                      "rmia", "rmia-offline", "quantile"}
    assert all(r["queries_per_example"] >= 1 and r["examples_per_second"] > 0 for r in result["attacks"].values())
    assert "queries/example" in stdout


@pytest.mark.long
def test_bench_smp_quick_writes_json(tmp_path: Path):
    result, stdout = run_quick("bench_smp.py", tmp_path / "bench.json")
    ratios = result["timing"]["ratio_to_lora"]
    assert set(ratios) == {"lora", "smp-lora", "mp-lora"} and ratios["lora"] == 1.0 and ratios["smp-lora"] > 1
    assert set(result["stability"]) == {"lora", "smp-lora", "mp-lora"}
    assert result["stability"]["mp-lora"]["smp"]["method"] == "mp-lora"
    assert result["stability"]["smp-lora"]["best_attack"]["name"] == "loss"
    assert "CE_m max" in stdout


@pytest.mark.long
def test_bench_split_quick_writes_json(tmp_path: Path):
    result, stdout = run_quick("bench_split.py", tmp_path / "bench.json")
    assert result["bytes"]["backward-free (default: s0)"]["gradient_down_per_example"] == 0
    assert result["bytes"]["vanilla"]["gradient_down_per_example"] > 0
    assert result["bytes"]["backward-free (default: s0)"]["sd15_tensor_bytes_per_example"] == 5_341_184 + 8
    assert result["client"]["backward-free (default: s0)"]["trainable_parameters"] == 0
    assert result["throughput"]["flower loopback"]["examples_per_s"] > 0
    assert "flower / in-process throughput" in stdout


@pytest.mark.slow
def test_bench_weights_quick_writes_json(tmp_path: Path):
    result, stdout = run_quick("bench_weights.py", tmp_path / "bench.json")
    variants = result["variants"]
    assert variants["paradigm (every-step pairs)"]["pairs"] == result["steps_per_run"]
    assert variants["ablation (end-of-run pair)"]["pairs"] == 1
    assert result["shadow_finetune_s"] > 0 and result["encoder_pairs_per_s"] > 0
    assert "pairs/s" in stdout


@pytest.mark.slow
def test_bench_encoding_cache_quick_writes_json(tmp_path: Path):
    result, stdout = run_quick("bench_encoding_cache.py", tmp_path / "bench.json")
    assert set(result["seconds"]) == {"no cache", "cold cache (encode + write)", "warm cache (read + check)",
                                      "warm cache, random half"}
    assert result["bit_identical"]["cached half == fresh half"] and result["disk_mib"] > 0
    assert "images/s" in stdout


@pytest.mark.long
def test_bench_scale_quick_measures_every_operation_in_its_own_process(tmp_path: Path):
    result, stdout = run_quick("bench_scale.py", tmp_path / "bench.json")
    kinds = [(m["kind"], m["batch"]) for m in result["measurements"]]
    assert kinds == [("lora", 1), ("dp-lora", 1), ("dp-lora", 2), ("dp-over-lora", 1), ("audit", 1), ("split", 1),
                     ("export", 1)]
    assert result["dp_over_lora"]["ratio"] > 0 and result["dp_over_lora"]["pairs"] >= 1
    assert all(m["median_call_s"] > 0 and m["rss_peak_during_calls_mib"] > 0 for m in result["measurements"])
    assert result["measurements"][-1]["outputs"]["tensors"] > 0 and "load_lora_weights" in stdout


@pytest.mark.slow
def test_gpu_check_smoke_runs_the_whole_check_on_the_cpu(tmp_path: Path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out",
                           str(tmp_path / "gpu.json")], check=False, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert [t["precision"] for t in result["timing"]] == ["bf16", "fp32"]
    assert all(t["dp_over_lora"] > 0 for t in result["timing"]) and len(result["memory"]) == 8
    assert "dp / lora" in proc.stdout


@pytest.mark.slow
def test_gpu_check_without_cuda_exits_2_with_one_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], check=False,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "no CUDA" in proc.stderr


@pytest.mark.long
def test_bench_demo_quick_writes_phases_and_claims(tmp_path: Path):
    result, stdout = run_quick("bench_demo.py", tmp_path / "bench.json")
    run = result["runs"][0]
    assert run["wall_time_s"] > run["in_process_s"] > 0 and run["phases_s"]["train lora"] > 0
    assert set(run["claims"]) == {"lora caught", "dp-lora at chance", "control at chance"}
    assert "total wall time / CPU" in stdout
