"""`privdiff audit`: membership attacks on a run, ROC, and empirical ε lower bounds."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from privdiff.cli.app import app
from privdiff.cli.options import (
    build_config,
    device_option,
    precision_option,
    runtime_flags,
)

console = Console(soft_wrap=True)  # paths must stay copy-pasteable, never wrapped


@app.command()
def audit(
    run_dir: Path = typer.Argument(..., help="A finished run folder (its membership.json is used)."),
    config: Path = typer.Option(None, "--config", "-c", help="YAML audit config (defaults if omitted)."),
    attacks: str = typer.Option(None, help="Comma-separated attacks: loss, pia, secmi, sima, proxy, "
                                           "quantile, lira-online, lira-offline, rmia, rmia-offline "
                                           "(default: the first five)."),
    shadows: int = typer.Option(None, help="Shadow LoRAs for LiRA and RMIA (even; trained with the run's recipe; default 8)."),
    canaries: int = typer.Option(0, help="One-run canary audit with this many canaries (0 = skip)."),
    canary_attack: str = typer.Option(None, help="Attack for the canary audit (default: the best attack)."),
    seed: int = typer.Option(None, help="Audit seed (fixed noises, shadow masks, canaries; default 0)."),
    bootstrap: int = typer.Option(None, help="Stratified bootstrap resamples (default 1000)."),
    control: bool = typer.Option(False, help="Audit the base model without the adapter (the control: must be "
                                             "at chance) -> RUN_DIR/audit/control/."),
    device: str = device_option(),
    precision: str = precision_option(),
    no_cache: bool = typer.Option(False, "--no-cache", help="Encode afresh (audit, shadows, canaries); read and "
                                                            "write no encoding cache."),
    set_: list[str] = typer.Option(None, "--set", help="Any audit config key: key=value (repeatable)."),
    quiet: bool = typer.Option(False, help="No progress bars."),
    distributed: bool = typer.Option(False, help="Under torchrun: a shadow farm (every process trains its share "
                                                 "of the LiRA shadows; the main process audits)."),
) -> None:
    """Run membership-inference attacks -> RUN_DIR/audit/audit.json, scores.npz, roc_loglog.png."""
    from privdiff.audit.attacks import DEFAULT_ATTACKS
    from privdiff.audit.canaries import canary_audit
    from privdiff.audit.run import AuditConfig, run_audit
    from privdiff.distributed import (
        init_distributed,
        launched_by_torchrun,
        shutdown_distributed,
        training_alone,
    )
    from privdiff.errors import ConfigError
    from privdiff.metrics.estimate import format_estimate
    from privdiff.runtime import resolve_runtime

    names = [a.strip() for a in attacks.split(",") if a.strip()] if attacks else None
    # a flag left out (None; False for --control and --no-cache) leaves the config file's value
    cfg = build_config(config, {"attacks": names, "audit_seed": seed, "shadows": shadows, "bootstrap": bootstrap,
                                "control": control or None, "cache": False if no_cache else None,
                                **runtime_flags(device, precision)}, set_, kind=AuditConfig)
    if launched_by_torchrun() and not distributed:
        raise ConfigError("started by torchrun: pass --distributed (otherwise every process audits the run)")
    one_run = None
    try:
        if distributed:
            init_distributed()
        result = run_audit(run_dir, cfg, show_progress=not quiet)
        if result is not None and canaries and not cfg.control:
            with training_alone():  # the canary run is one run, on the main process
                one_run = canary_audit(run_dir, num_canaries=canaries, attack=canary_attack or (
                    result["best_attack"] if result["best_attack"] in DEFAULT_ATTACKS else "loss"),
                    seed=cfg.audit_seed, show_progress=not quiet, runtime=resolve_runtime(cfg.runtime),
                    cache=cfg.cache)
    finally:
        shutdown_distributed()
    if result is None:
        return  # a non-main process of a shadow farm
    n1, n0 = result["n_members_test"], result["n_nonmembers_test"]
    console.print(f"test split: {n1} members, {n0} non-members (null AUC sd {result['null_auc_sd']:.3f})",
                  highlight=False)
    unresolved = {level: need for level, need in result["fpr_resolution"].items() if not need["resolved"]}
    for level, need in unresolved.items():
        console.print(f"  TPR at {float(level):.1%} FPR is not resolved: it needs >= {need['min_nonmembers']} test "
                      f"non-members, this split has {n0} (shown as n/r)", highlight=False)

    def tpr(r: dict, level: str) -> str:
        return "n/r" if level in unresolved else f"{r['tpr_at_fpr'][level]['value']:.3f}"

    for name, r in result["attacks"].items():
        console.print(f"  {name:<13} AUC {format_estimate(r['auc'])}  TPR@5%/1%/0.1%FPR {tpr(r, '0.05')} / "
                      f"{tpr(r, '0.01')} / {tpr(r, '0.001')}  ASR {r['asr']['value']:.3f}  "
                      f"{r['queries_per_example']} queries/ex", highlight=False)
    cp = result["eps_lower_bound"]["cp"]
    console.print(f"best attack (by aux AUC): {result['best_attack']}; indicative ε lower bound "
                  f"(Clopper-Pearson) {cp['eps']:.2f}", highlight=False)
    if one_run is not None:
        console.print(f"one-run canary audit: {one_run['v']}/{one_run['r']} guesses correct on "
                      f"{one_run['m']} canaries -> ε lower bound {one_run['eps']:.2f} (p = {one_run['p']})",
                      highlight=False)
    console.print(f"audit: {Path(run_dir) / 'audit' / ('control' if cfg.control else '') / 'audit.json'}")
