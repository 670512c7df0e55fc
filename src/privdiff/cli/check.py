"""`privdiff check ADAPTER --data RUN`: the release gate for a LoRA file (docs/check.md)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from privdiff.cli.app import app
from privdiff.cli.options import device_option, precision_option, runtime_config

console = Console(soft_wrap=True)
GATE_FAILED_EXIT_CODE = 1


@app.command()
def check(
    adapter: Path = typer.Argument(..., help="The LoRA .safetensors file to be published."),
    data: Path = typer.Option(..., "--data", help="The fine-tuning run folder it came from (dataset, membership "
                                                  "manifest, base model and recipe)."),
    base: str = typer.Option(None, "--base", help="Another base model folder than the run's."),
    out: Path = typer.Option(Path("check"), "--out", "-o", help="Folder for check.json and check.html."),
    thorough: bool = typer.Option(False, help="Add RMIA and LiRA (trains --shadows shadows with the run's recipe)."),
    shadows: int = typer.Option(4, help="Shadows for --thorough (even)."),
    attacks: str = typer.Option(None, help="Comma-separated attacks instead of the default set."),
    header_fail_on: str = typer.Option("medium", help="Header findings that fail: medium (and high) or high only."),
    auc_margin: float = typer.Option(0.0, help="Membership passes when the best attack's AUC interval low end "
                                               "is <= 0.5 + this."),
    max_tpr_at_1_fpr: float = typer.Option(0.05, "--max-tpr-at-1-fpr", help="... or when its TPR at 1 % FPR "
                                           "(resolved: >= 100 test non-members) is <= this."),
    max_epsilon: float = typer.Option(None, help="Also require a DP guarantee in the header with ε <= this."),
    no_identity: bool = typer.Option(False, "--no-identity", help="Skip the weights attack on face-base files."),
    seed: int = typer.Option(0, help="Audit seed."),
    bootstrap: int = typer.Option(1000, help="Bootstrap resamples for the intervals."),
    device: str = device_option(),
    precision: str = precision_option(),
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """Gate a LoRA file before release: header, membership, identity -> OUT/check.json, check.html.

    Exit code 0 when every axis passes, 1 when one fails (2 for bad input)."""
    from privdiff.check import CheckConfig, CheckThresholds, run_check

    thresholds = CheckThresholds(header_fail_on=header_fail_on, auc_margin=auc_margin,
                                 max_tpr_at_1_fpr=max_tpr_at_1_fpr, max_epsilon=max_epsilon)
    names = [a.strip() for a in attacks.split(",") if a.strip()] if attacks else None
    cfg = CheckConfig(thorough=thorough, shadows=shadows, attacks=names, audit_seed=seed, bootstrap=bootstrap,
                      identity=not no_identity, runtime=runtime_config(device, precision), thresholds=thresholds)
    result = run_check(adapter, data, out, cfg, base_model=base, show_progress=not quiet)
    colour = {"pass": "green", "fail": "red", "n/a": "dim"}
    axes = result["axes"]
    m = axes["membership"]
    lines = {
        "header": f"{axes['header']['failing_findings']} failing finding(s) ({axes['header']['rule']})",
        "membership": f"best attack {m['best_attack']} AUC {m['auc']['value']:.3f} [{m['auc']['ci'][0]:.3f}, "
                      f"{m['auc']['ci'][1]:.3f}], TPR@1%FPR {m['tpr_at_1_fpr']['value']:.3f}"
                      f"{'' if m['tpr_at_1_fpr_resolved'] else ' (unresolved: < 100 test non-members)'}; {m['why']}",
        "identity": axes["identity"].get("rule", "") if axes["identity"]["verdict"] == "n/a" else
                    f"identity similarity {axes['identity']['identity_similarity']:.3f} vs random-embedding upper "
                    f"{axes['identity']['lower_bound']['ci'][1]:.3f}",
        "dp": "no DP guarantee in the header" if axes["dp"]["guarantee"] is None else
              f"ε = {axes['dp']['guarantee']['epsilon']:.3g}, δ = {axes['dp']['guarantee']['delta']:.3g} (from the header)",
    }
    for name, text in lines.items():
        verdict = axes[name]["verdict"]
        console.print(f"  {name:<11}[{colour[verdict]}]{verdict.upper():<5}[/] {text}", highlight=False)
    console.print(f"verdict: [{colour[result['verdict']]}]{result['verdict'].upper()}[/]  "
                  f"({out / 'check.json'}, {out / 'check.html'})", highlight=False)
    if result["verdict"] == "fail":
        raise typer.Exit(GATE_FAILED_EXIT_CODE)


__all__ = ["check"]
