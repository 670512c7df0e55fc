"""`privdiff epsilon`: the command-line accountant (ε of a DP-SGD history, or σ for a target ε)."""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from privdiff.cli.app import app

console = Console(soft_wrap=True)


@app.command()
def epsilon(
    sample_rate: float = typer.Option(None, "--sample-rate", "-q", help="Poisson sampling rate q = B / N."),
    expected_batch_size: int = typer.Option(None, help="Expected batch B (with --dataset-size, instead of -q)."),
    dataset_size: int = typer.Option(None, help="Training examples N (with --expected-batch-size)."),
    noise_multiplier: float = typer.Option(None, "--noise-multiplier", "--sigma",
                                           help="σ: report the ε it gives (or give --target-epsilon)."),
    target_epsilon: float = typer.Option(None, help="Find the σ for this ε instead (rounded up, never above it)."),
    steps: int = typer.Option(None, help="Optimisation steps (or --epochs)."),
    epochs: float = typer.Option(None, help="Passes over the data: steps = ceil(epochs / q)."),
    delta: float = typer.Option(1e-5, help="δ of the (ε, δ) guarantee."),
    accountant: str = typer.Option("prv", help="Reporting accountant: prv or rdp (PLD is always shown)."),
    eps_error: float = typer.Option(1e-3, help="PRV's allowed ε error."),
    json_out: Path = typer.Option(None, "--json", help="Also write the figures as JSON here."),
) -> None:
    """ε of a DP-SGD history (PRV, PLD, RDP side by side), or σ for a target ε.

    Poisson-subsampled Gaussian accounting, the same code `privdiff finetune --method dp-lora` uses."""
    from privdiff.dp.accounting import calibrate_noise, compare_accountants
    from privdiff.errors import ConfigError
    from privdiff.runs.files import atomic_write_json

    q = _sample_rate(sample_rate, expected_batch_size, dataset_size)
    if (steps is None) == (epochs is None):
        raise ConfigError("give --steps or --epochs (one of them)")
    if epochs is not None and not (0 < epochs < 1e9):
        raise ConfigError(f"--epochs must be in (0, 1e9), got {epochs}")
    num_steps = steps if steps is not None else math.ceil(epochs / q - 1e-9)
    if not 1 <= num_steps <= 10**8:
        raise ConfigError(f"steps must be in [1, 1e8], got {num_steps}")
    if not 0 < delta < 1:
        raise ConfigError(f"--delta must be in (0, 1), got {delta}")
    if not 0 < eps_error < 1:
        raise ConfigError(f"--eps-error must be in (0, 1), got {eps_error}")
    if accountant not in ("prv", "rdp"):
        raise ConfigError(f"--accountant must be prv or rdp, got '{accountant}'")
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ConfigError("give --noise-multiplier (to get ε) or --target-epsilon (to get σ), one of them")
    result: dict = {"sample_rate": q, "steps": num_steps, "delta": delta}
    if target_epsilon is not None:
        calibration = calibrate_noise(target_epsilon, q, num_steps, delta, accountant=accountant, eps_error=eps_error)
        sigma = calibration.noise_multiplier
        result["target_epsilon"] = target_epsilon
    else:
        if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
            raise ConfigError(f"--noise-multiplier must be a finite number >= 0, got {noise_multiplier}")
        sigma = noise_multiplier
    result["noise_multiplier"] = sigma
    result.update(compare_accountants([(sigma, q, num_steps)], delta, accountant, eps_error))
    _print(result)
    if json_out is not None:
        atomic_write_json(json_out, result)


def _sample_rate(sample_rate: float | None, batch: int | None, size: int | None) -> float:
    from privdiff.errors import ConfigError

    if sample_rate is not None:
        if batch is not None or size is not None:
            raise ConfigError("give -q, or --expected-batch-size with --dataset-size, not both")
        if not 0 < sample_rate <= 1:
            raise ConfigError(f"--sample-rate must be in (0, 1], got {sample_rate}")
        return sample_rate
    if batch is None or size is None:
        raise ConfigError("give the sampling rate: -q, or --expected-batch-size and --dataset-size")
    if not 1 <= batch <= size:
        raise ConfigError(f"need 1 <= --expected-batch-size <= --dataset-size, got {batch} and {size}")
    return batch / size


def _print(result: dict) -> None:
    def shown(value: float | None) -> str:
        return "n/a" if value is None else ("inf" if math.isinf(value) else f"{value:.6g}")

    reported = result["reported"]
    title = (f"σ = {result['noise_multiplier']:g}, q = {result['sample_rate']:.6g}, {result['steps']} steps, "
             f"δ = {result['delta']:g}")
    table = Table("accountant", "ε", "seconds", "notes", title=title)
    for name, row in result["accountants"].items():
        notes = row.get("note") or (f"value grid {row['discretization']:.3g}" if "discretization" in row
                                    else f"eps_error {row['eps_error']:g}" if "eps_error" in row else "")
        marker = " (reported)" if name == reported["accountant"] else ""
        table.add_row(name.upper() + marker, shown(row["epsilon"]), f"{row['seconds']:.2f}", notes)
    console.print(table)
    if "target_epsilon" in result:
        console.print(f"noise multiplier for ε ≤ {result['target_epsilon']:g}: [bold]{result['noise_multiplier']:g}[/]")
    console.print(f"ε = [bold]{shown(reported['epsilon'])}[/] ({reported['accountant'].upper()})"
                  + (f"; {reported['note']}" if reported["note"] else ""))


__all__ = ["epsilon"]
