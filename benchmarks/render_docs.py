"""Writes every measured table in the docs from benchmarks/results/*.json, so no figure is typed by hand.

A docs page marks a table with

    <!-- table:bench_dp.timing -->
    ...generated...
    <!-- /table -->

where `bench_dp` is the JSON file's stem and `timing` the table. The block becomes the table followed by
a stamp line ("measured <date> at commit <sha> on <hardware>") taken from the file's `meta` record, which
`common.write_json` adds. A JSON file may also carry tables as rows of text under "tables" (results
transcribed from an earlier README, or from commands that are not benchmark scripts); a table found
there is printed as it is. tests/test_docs_tables.py fails when a page differs from what this script
writes, or names a table that no JSON file provides.

    python benchmarks/render_docs.py           # rewrite the blocks in README.md and docs/**/*.md
    python benchmarks/render_docs.py --check   # exit 1 and name the blocks that differ
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BLOCK = re.compile(r"(<!-- table:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.DOTALL)

Rows = list[list[str]]


class TableError(Exception):
    """A marked table that no JSON file can fill."""


def _fmt(value: float | None, spec: str = ".3g") -> str:
    return "–" if value is None else format(value, spec)


def _with_ci(entry: dict | None, spec: str = ".3g", scale: float = 1.0) -> str:
    if not entry:
        return "–"
    low, high = entry["ci"]
    return f"{entry['value'] * scale:{spec}} [{low * scale:{spec}}, {high * scale:{spec}}]"


def dp_timing(data: dict) -> Rows:
    """Median step time per adapter; one column per method and engine, each with its ratio to LoRA."""
    methods: list[str] = []
    for timing in data["timing"].values():
        methods += [m for m in timing["median_step_s"] if m not in methods]
    rows = [["adapter", *methods]]
    for adapter, timing in data["timing"].items():
        cells = []
        for method in methods:
            seconds = timing["median_step_s"].get(method)
            ratio = timing["ratio_to_lora"].get(method)
            cells.append("" if seconds is None else f"{seconds:.3f} s" if method == "lora"
                         else f"{seconds:.3f} s ({ratio:.2f}x)")
        rows.append([f"{adapter}, batch {timing['batch_size']}", *cells])
    return rows


def dp_memory(data: dict) -> Rows:
    memory, ratio = data["step_memory_mib"], data["step_memory_ratio"]
    return [["method", "working memory of a step (MiB)", "/ LoRA"]] + [
        [name, f"{mib:.0f}", f"{ratio[name]:.2f}"] for name, mib in memory.items()]


def dp_utility(data: dict) -> Rows:
    """Plain LoRA and DP-LoRA at each ε on the demo's data, each figure with its 95 % interval."""
    rows = [["run", "ε (PRV)", "KID vs members", "FID vs members", "digit accuracy", "held-out loss, test members"]]
    for name, run in data["utility"].items():
        metrics, privacy = run["metrics"], run["privacy"]
        accuracy = metrics.get("accuracy/digit")
        rows.append([name, "none" if not privacy else f"{privacy['epsilon']:.2f}",
                     _with_ci(metrics.get("kid/members")), _with_ci(metrics.get("fid/members")),
                     (_with_ci(accuracy, ".3g", 100) + " %") if accuracy else "–",
                     _with_ci(metrics.get("heldout_loss/member_test"))])
    return rows


def audit_attacks(data: dict) -> Rows:
    return [["attack", "queries/example", "examples/s", "fit on aux (s)", "access"]] + [
        [name, str(r["queries_per_example"]), f"{r['examples_per_second']:.1f}", f"{r['fit_seconds']:.1f}",
         r["access"]] for name, r in data["attacks"].items()]


def finetune_steps(data: dict) -> Rows:
    step = data["finetune"]
    rows = [["measure", "value"],
            [f"LoRA fine-tuning, batch {step['batch_size']} (median of {step['timed_steps']} steps)",
             f"{step['steps_per_s']:.2f} steps/s ({step['examples_per_s']:.0f} examples/s)"],
            ["peak RSS while fine-tuning", f"{step['peak_rss_mib']:.0f} MiB"]]
    if data.get("demo"):
        rows += [[f"`privdiff demo` wall time ({data['demo']['demo_steps']} steps)",
                  f"{data['demo']['demo_wall_time_s']:.0f} s"],
                 ["`privdiff demo` peak RSS", f"{data['demo']['demo_peak_rss_mib']:.0f} MiB"]]
    return rows


def evaluate_stages(data: dict) -> Rows:
    total = data["total_s"]
    rows = [["stage", "seconds", "share"]]
    rows += [[name.removesuffix("_s"), f"{value:.1f}", f"{value / total:.0%}"]
             for name, value in data["timings_s"].items()]
    rows += [["total", f"{total:.1f}", "100%"],
             ["generation throughput", f"{data['samples_per_s_generation']:.2f} samples/s", ""],
             ["peak RSS", f"{data['peak_rss_mib']:.0f} MiB", ""]]
    return rows


def weights_variants(data: dict) -> Rows:
    rows = [["variant", "s per shadow run", "ms per fine-tune step", "encoder pairs/s", "× plain fine-tune"]]
    rows += [[name, f"{v['seconds_per_run']:.2f}", f"{v['ms_per_step']:.1f}", _fmt(v["pairs_per_s"], ".2f"),
              f"{v['ratio_to_plain']:.2f}"] for name, v in data["variants"].items()]
    return rows


def dp_timing_by_setting(data: dict) -> Rows:
    """One row per method / engine / K, one column per adapter: median step time and ratio to LoRA."""
    adapters = list(data["timing"])
    settings: list[str] = []
    for timing in data["timing"].values():
        settings += [m for m in timing["median_step_s"] if m not in settings]
    rows = [["setting", *(f"{a}, batch {data['timing'][a]['batch_size']}" for a in adapters)]]
    for setting in settings:
        cells = []
        for adapter in adapters:
            timing = data["timing"][adapter]
            seconds, ratio = timing["median_step_s"].get(setting), timing["ratio_to_lora"].get(setting)
            cells.append("" if seconds is None else f"{seconds * 1000:.1f} ms ({ratio:.2f}x)")
        rows.append([setting, *cells])
    return rows


def _ci(entry: dict, spec: str = ".3f", signed: bool = False) -> str:
    sign = "+" if signed else ""
    low, high = entry["ci"]
    return f"{entry['value']:{sign}{spec}} [{low:{sign}{spec}}, {high:{sign}{spec}}]"


def attack_strength(data: dict) -> Rows:
    """Every attack on the demo's plain LoRA: test AUC and TPR at 5 % FPR with intervals, cost, control."""
    rows = [["attack", "test AUC [95 % CI]", "TPR @ 5 % FPR [95 % CI]", "queries / example", "fit (s)",
             "examples / s", "control AUC"]]
    for name, record in data["target"].items():
        control = data["control"].get(name)
        rows.append([name, _ci(record["auc"]), _ci(record["tpr_at_fpr"]["0.05"]), str(record["queries_per_example"]),
                     f"{record['fit_seconds']:.1f}", f"{record['examples_per_second']:.1f}",
                     _ci(control["auc"]) if control else ""])
    return rows


def attack_strength_paired(data: dict) -> Rows:
    """Paired differences (same examples, same bootstrap resamples)."""
    rows = [["difference", "AUC", "TPR @ 5 % FPR", "TPR @ 1 % FPR"]]
    for pair, d in data["paired"].items():
        rows.append([pair.replace(" - ", " − "), _ci(d["auc"], signed=True), _ci(d["tpr@0.05"], signed=True),
                     _ci(d["tpr@0.01"], signed=True)])
    return rows


def demo_phases(data: dict) -> Rows:
    """`privdiff demo` per phase, wall and CPU seconds, one column per timed run."""
    runs = data["runs"]
    rows = [["phase", *(f"run {i + 1}: wall / CPU (s)" for i in range(len(runs)))]]
    for phase in runs[0]["phases_s"]:
        rows.append([phase, *(f"{r['phases_s'][phase]:.1f} / {r['phases_cpu_s'][phase]:.1f}" for r in runs)])
    rows.append(["start-up (imports, CLI)", *(f"{r['startup_s']:.1f}" for r in runs)])
    rows.append(["**total** (wall, as `time privdiff demo` sees it)", *(f"**{r['wall_time_s']:.1f}**" for r in runs)])
    rows.append(["load average before the run", *(f"{r['load_average_before'][0]:.2f}" for r in runs)])
    return rows


def demo_claims(data: dict) -> Rows:
    """The demo's three claims as the last timed run measured them."""
    claims = data["runs"][-1]["claims"]
    lora, dp, control = claims["lora caught"], claims["dp-lora at chance"], claims["control at chance"]
    return [["claim", "figures", "holds"],
            ["plain LoRA caught", f"best attack on aux {lora['attack']}: test AUC {_ci(lora['auc'])}, lower end above "
             f"0.5 + 2 null sd = {lora['lower_end_above']:.3f}", str(lora["holds"])],
            ["DP-LoRA at chance", f"({dp['epsilon']:.3f}, {dp['delta']:g})-DP; best attack {dp['best_attack']}: AUC "
             f"{_ci(dp['auc'])}; largest gap {dp['largest_auc_gap']:.3f} within 3 null sd = {dp['band']:.3f}",
             str(dp["holds"])],
            ["control at chance", f"largest gap {control['largest_auc_gap']:.3f} within 3 null sd = "
             f"{control['band']:.3f}", str(control["holds"])]]


def scale_out(data: dict) -> Rows:
    rows = [["job", "1 process × 2 threads", "2 processes × 1 thread", "t(1×2) / t(2×1)"]]
    for job, t in data["jobs"].items():
        rows.append([job, f"{t['1_process_2_threads_s']:.1f} s", f"{t['2_processes_1_thread_s']:.1f} s",
                     f"{t['scaling_efficiency']:.2f}"])
    return rows


def dp_ratio_at_scale(data: dict) -> Rows:
    ratio = data["dp_over_lora"]
    return [["model", "LoRA step", "DP-LoRA step (K = 1)", "DP / LoRA", "pairs timed"],
            [f"{data['size']} at {data['image_size']} px, {data['device']} {data['precision']}, batch 1",
             f"{ratio['lora_step_s']:.2f} s", f"{ratio['dp_step_s']:.2f} s", f"{ratio['ratio']:.3f}",
             str(ratio["pairs"])]]


RENDERERS: dict[str, Callable[[dict], Rows]] = {
    "bench_dp.timing": dp_timing,
    "bench_dp.memory": dp_memory,
    "bench_dp_timing.timing": dp_timing_by_setting,
    "bench_dp_timing.memory": dp_memory,
    "bench_scale_dp_ratio.ratio": dp_ratio_at_scale,
    "bench_attack_strength.attacks": attack_strength,
    "bench_demo.phases": demo_phases,
    "bench_demo_full.phases": demo_phases,
    "bench_scale_out.jobs": scale_out,
    "bench_demo.claims": demo_claims,
    "bench_attack_strength.paired": attack_strength_paired,
    "bench_dp.utility": dp_utility,
    "bench_audit.attacks": audit_attacks,
    "bench_finetune.steps": finetune_steps,
    "bench_evaluate.stages": evaluate_stages,
    "bench_weights.variants": weights_variants,
}


def load_results(results: Path = RESULTS) -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text()) for path in sorted(results.glob("*.json"))}


def stamp(meta: dict | None) -> str:
    if not meta:
        raise TableError("its JSON file has no meta record (commit, date, hardware)")
    if meta.get("transcribed_from"):
        return (f"*Transcribed from {meta['transcribed_from']} (measured on {meta['hardware']}); "
                f"{meta.get('rerun', 'rerun the benchmark to measure again')}.*")
    return f"*Measured {meta['date']} at commit {meta['commit']} on {meta['hardware']}.*"


def markdown(rows: Rows) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def render_table(name: str, results: dict[str, dict]) -> str:
    """The block's body: the table, a blank line and the stamp (each line newline-terminated)."""
    stem, _, table = name.partition(".")
    if stem not in results:
        raise TableError(f"no benchmarks/results/{stem}.json")
    data = results[stem]
    if table in data.get("tables", {}):
        spec = data["tables"][table]
        rows = [spec["columns"], *spec["rows"]]
    elif name in RENDERERS:
        try:
            rows = RENDERERS[name](data)
        except KeyError as missing:
            raise TableError(f"benchmarks/results/{stem}.json lacks {missing}") from None
    else:
        raise TableError(f"benchmarks/results/{stem}.json has no table {table!r} and no renderer knows it")
    return f"{markdown(rows)}\n\n{stamp(data.get('meta'))}\n"


def render_page(text: str, results: dict[str, dict]) -> str:
    def replace(match: re.Match) -> str:
        try:
            body = render_table(match["name"], results)
        except TableError as error:
            raise TableError(f"table {match['name']}: {error}") from None
        return match.group(1) + body + match.group(4)
    return BLOCK.sub(replace, text)


def pages(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a page would change")
    args = parser.parse_args()
    results = load_results()
    stale = []
    for page in pages():
        text = page.read_text()
        try:
            rendered = render_page(text, results)
        except TableError as error:
            sys.exit(f"error: {page.relative_to(ROOT)}: {error}")
        if rendered != text:
            stale.append(str(page.relative_to(ROOT)))
            if not args.check:
                page.write_text(rendered)
    verb = "differ from the results" if args.check else "rewritten"
    print(f"{len(stale)} page(s) {verb}" + (": " + ", ".join(stale) if stale else ""))
    if args.check and stale:
        sys.exit(1)


if __name__ == "__main__":
    main()
