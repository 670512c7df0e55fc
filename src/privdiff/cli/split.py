"""`privdiff split simulate|server|client|keys`: split-learning ControlNet training."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console

from privdiff.cli.app import app
from privdiff.cli.options import build_config, device_option, precision_option, runtime_flags

console = Console(soft_wrap=True)
split_app = typer.Typer(no_args_is_help=True, help="Split-learning ControlNet: clients keep their data, a server trains.")
app.add_typer(split_app, name="split")


def _config(config_file: Path | None, flags: dict, extra: list[str] | None):
    from privdiff.split.config import SplitConfig

    from privdiff.runtime import require_cpu_fp32, resolve_runtime

    cfg = build_config(config_file, flags, extra, kind=SplitConfig)
    require_cpu_fp32(resolve_runtime(cfg.runtime), "split learning")
    return cfg


def _print_summary(summary: dict, folder: Path) -> None:
    from privdiff.metrics.estimate import format_estimate

    wire = summary.get("wire", {})
    console.print(f"split run ({summary['design']}, {summary.get('transport', '?')}): {summary['steps']} steps, "
                  f"{summary['rounds']} rounds, loss {summary['loss_first']} -> {summary['loss_last']} "
                  f"(means of the first and last {summary['loss_window']} rounds), "
                  f"refused {sum(summary['refusals'].values())} messages {summary['refusals'] or ''}")
    if wire:
        console.print(f"wire: {wire['up_bytes_per_example']:.0f} B/example up, "
                      f"{wire['down_bytes_per_example']:.0f} B/example down")
    fidelity = summary.get("condition_fidelity")
    if fidelity:
        parts = []
        for name in ("untrained", "trained", "ceiling"):
            if name in fidelity:
                parts.append(f"{name} {format_estimate(fidelity[name]['edge_ssim'])}")
        console.print(f"condition fidelity (edge SSIM, {fidelity['num_samples']} test conditions): " + ", ".join(parts))
    privacy = summary.get("local_privacy")
    if privacy:
        worst = max(privacy["clients"].values(), key=lambda c: c.get("worst_image_mu", 0))
        console.print(f"local DP per sample (δ = {privacy['delta']:g}): image latent ε = {worst['worst_image_epsilon']:.3g}, "
                      f"with the condition ε = {worst['worst_epsilon']:.3g} (∞: the condition is not protected); "
                      f"reference formula {privacy['reference_formula_not_a_guarantee']:.2f} is not a guarantee")
    console.print(f"run folder: [bold]{folder}[/]  ControlNet: [bold]{folder / 'controlnet'}[/]")


@split_app.command()
def simulate(
    config: Path = typer.Option(None, "--config", "-c", help="YAML split config (defaults if omitted)."),
    design: str = typer.Option(None, help="backward-free (default) or vanilla."),
    clients: int = typer.Option(None, help="Number of clients (default 2)."),
    steps: int = typer.Option(None, help="Server optimiser steps (default 2000)."),
    num_examples: int = typer.Option(None, help="Training triples of the fill dataset, sharded over clients."),
    out: str = typer.Option(None, "--out", "-o", help="Run folder (default runs/split)."),
    transport: str = typer.Option("inprocess", help="inprocess, or flower: a SuperLink and SuperNodes on loopback."),
    device: str = device_option(),
    precision: str = precision_option(),
    set_: list[str] = typer.Option(None, "--set", help="Any config key: section.key=value (repeatable)."),
    evaluate: bool = typer.Option(True, help="Measure condition fidelity after training."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its checkpoint."),
    overwrite: bool = typer.Option(False, help="Replace an existing run folder."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Train a ControlNet by split learning with simulated clients on the `fill` dataset."""
    from privdiff.errors import ConfigError

    cfg = _config(config, {"protocol.design": design, "train.clients": clients, "train.steps": steps,
                           "data.num_examples": num_examples, "output_dir": out, **runtime_flags(device, precision)}, set_)
    if transport == "inprocess":
        from privdiff.split.run import simulate as run_simulation

        summary = run_simulation(cfg, resume=resume, overwrite=overwrite, evaluate=evaluate, show_progress=not quiet)
    elif transport == "flower":
        from privdiff.split.flower.loopback import simulate_on_flower

        summary = simulate_on_flower(cfg, overwrite=overwrite, evaluate=evaluate, show_progress=not quiet)
    else:
        raise ConfigError("--transport must be inprocess or flower")
    _print_summary(summary, Path(cfg.output_dir))


@split_app.command()
def keys(
    clients: int = typer.Option(2, min=1, help="Number of clients."),
    out: Path = typer.Option(Path("split-keys"), "--out", "-o", help="Folder for the key files."),
) -> None:
    """Write the server's keys file and one key file per client (HMAC key + secret seed)."""
    from privdiff.split.flower.settings import write_keys

    server_file, client_files = write_keys(out, clients)
    console.print(f"server keys: [bold]{server_file}[/] (give it to `privdiff split server --keys`)")
    for path in client_files:
        console.print(f"client key:  [bold]{path}[/] (give it to that client only: `privdiff split client --key-file`)")


@split_app.command()
def server(
    keys_file: Path = typer.Option(..., "--keys", help="The server keys file from `privdiff split keys`."),
    config: Path = typer.Option(None, "--config", "-c", help="YAML split config (defaults if omitted)."),
    out: str = typer.Option(None, "--out", "-o", help="Run folder (default runs/split)."),
    port: int = typer.Option(9092, help="Port of the SuperLink this command starts."),
    insecure: bool = typer.Option(False, help="No TLS (loopback and tests only)."),
    device: str = device_option(),
    precision: str = precision_option(),
    set_: list[str] = typer.Option(None, "--set", help="Any config key: section.key=value (repeatable)."),
    overwrite: bool = typer.Option(False, help="Replace an existing run folder."),
    timeout: float = typer.Option(86400.0, help="Seconds to wait for the run to finish."),
) -> None:
    """Start a Flower SuperLink, submit the split-learning ServerApp to it and wait for the run."""
    from privdiff.errors import ConfigError
    from privdiff.split.flower.loopback import serve_on_flower

    if not insecure:
        raise ConfigError("TLS deployments start flower-superlink with certificates themselves and submit with "
                          "`flwr run` (docs/split.md); this command runs with --insecure only")
    cfg = _config(config, {"output_dir": out, **runtime_flags(device, precision)}, set_)
    summary = serve_on_flower(cfg, keys_file, port=port, overwrite=overwrite, timeout=timeout)
    _print_summary(summary, Path(cfg.output_dir))


@split_app.command()
def client(
    superlink: str = typer.Option(..., help="HOST:PORT of the SuperLink."),
    key_file: Path = typer.Option(..., help="This client's key file from `privdiff split keys`."),
    partition_id: int = typer.Option(0, help="Which shard of a built-in dataset this client holds."),
    num_partitions: int = typer.Option(2, help="Number of shards of the built-in dataset."),
    data_dir: Path = typer.Option(None, help="This client's own imagefolder (with conditioning images) instead."),
    port: int = typer.Option(9094, help="Port of this SuperNode's local runtime API."),
    insecure: bool = typer.Option(False, help="No TLS (loopback and tests only)."),
) -> None:
    """Run this machine's Flower SuperNode: it answers the server with the split client role."""
    from privdiff.errors import ConfigError
    from privdiff.split.flower.deploy import flower_environment, supernode_command
    from privdiff.split.flower.settings import read_client_identity

    if not insecure:
        raise ConfigError("TLS SuperNodes are started with flower-supernode and its certificate flags "
                          "(docs/split.md); this command runs with --insecure only")
    read_client_identity(key_file)  # fail here, not in the first message, on a bad key file
    node_config: dict = {"partition-id": partition_id, "num-partitions": num_partitions,
                         "key-file": str(key_file.resolve())}
    if data_dir is not None:
        node_config["data-dir"] = str(data_dir.resolve())
    command = supernode_command(superlink, port, node_config)
    console.print("starting: " + " ".join(command))
    os.execvpe(command[0], command, flower_environment())


def _protection_line(protocol: dict) -> str:
    parts = [protocol["design"], f"t_start {protocol['t_start']}", protocol["activation"], protocol["precision"]]
    if protocol.get("target_noise"):
        parts.append(f"target noise s={protocol['target_noise']:g}, R={protocol['latent_clip']:g}")
    if protocol.get("condition_noise"):
        parts.append(f"condition noise s_c={protocol['condition_noise']:g}, R_c={protocol['condition_clip']:g}")
    return ", ".join(parts)


@split_app.command()
def attack(
    name: str = typer.Option(..., "--attack", "-a", help="analytic, inverse-network, unsplit or fsha (vanilla only)."),
    config: Path = typer.Option(None, "--config", "-c", help="YAML split config whose protocol is attacked."),
    run: Path = typer.Option(None, "--run", help="A split run folder: attack the protocol it was trained with."),
    victims: int = typer.Option(64, min=1, help="Held-out triples the victim client sends."),
    out: Path = typer.Option(Path("runs/split-attack"), "--out", "-o", help="Folder for attack.json and the image grid."),
    device: str = device_option(),
    precision: str = precision_option(),
    set_: list[str] = typer.Option(None, "--set", help="Any config key: section.key=value (repeatable)."),
    overwrite: bool = typer.Option(False, help="Replace an existing attack.json."),
) -> None:
    """Attack what the server receives: reconstruct the clients' images and conditions, and score them."""
    from privdiff.errors import ConfigError
    from privdiff.metrics.estimate import format_estimate
    from privdiff.split.attacks.run import evaluate_attack, reconstruction_grid
    from privdiff.split.models import load_public_models
    from privdiff.runs.files import atomic_write_json
    from privdiff.runs.record import run_record

    if run is not None:
        if config is not None:
            raise ConfigError("give --config or --run, not both")
        config = run / "config.yaml"
        if not config.is_file():
            raise ConfigError(f"{run} is not a split run folder (no config.yaml)")
    if (out / "attack.json").exists() and not overwrite:
        raise ConfigError(f"{out / 'attack.json'} exists (use --overwrite or another --out)")
    cfg = _config(config, runtime_flags(device, precision), set_)
    models = load_public_models(cfg.model.pretrained)
    with console.status(f"{name}: fitting on public data and attacking {victims} victims"):
        outcome = evaluate_attack(name, cfg, models, victims=victims, seed=cfg.train.seed)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "attack.json", {**outcome.result, "record": run_record()})
    (out / "reconstructions.png").write_bytes(reconstruction_grid(outcome))
    result = outcome.result
    console.print(f"{name} against {_protection_line(result['protocol'])} ({victims} victims):")
    for target, summary in result["scores"].items():
        base = result["references"]["baseline"][target]["all"]
        ceiling = result["references"]["ceiling"][target]["all"]
        got = summary["all"]
        console.print(f"  {target:9s} SSIM {format_estimate(got['ssim'])}  PSNR {got['psnr']['value']:.1f} dB  MSE {got['mse']['value']:.4f}  "
                      f"(baseline {base['ssim']['value']:.3f}, ceiling {ceiling['ssim']['value']:.3f})")
        buckets = [f"t in [{k[1:].replace('-', ', ')}): {v['ssim']['value']:.3f} (n={v['n']})"
                   for k, v in summary.items() if k != "all"]
        console.print("            SSIM by timestep: " + "; ".join(buckets))
    console.print(f"results: [bold]{out / 'attack.json'}[/]  images: [bold]{out / 'reconstructions.png'}[/]")


@split_app.command("attack-grid")
def attack_grid(
    out: Path = typer.Option(Path("runs/split-attack-grid"), "--out", "-o", help="Folder for the grid's results."),
    defence: list[str] = typer.Option(None, "--defence", help="Only these defences (repeatable; default all)."),
    victims: int = typer.Option(64, min=1, help="Held-out triples per attack."),
    utility: bool = typer.Option(True, help="Train each configuration and measure its condition fidelity."),
    device: str = device_option(),
    precision: str = precision_option(),
    set_: list[str] = typer.Option(None, "--set", help="Config overrides applied to every configuration."),
) -> None:
    """Every attack against every defence, with each configuration's utility: the table of docs/split.md."""
    from privdiff.split.attacks.grid import markdown_table, run_grid

    overrides = [f"{k}={v}" for k, v in runtime_flags(device, precision).items() if v is not None]
    _config(None, {}, overrides)  # refuses a device split learning does not run on, before anything runs
    grid = run_grid(out, base_overrides=[*overrides, *(set_ or [])], defences=list(defence) if defence else None,
                    victims=victims, utility=utility)
    console.print(markdown_table(grid))
    console.print(f"results: [bold]{out / 'split_attacks.json'}[/] (add the folder to `privdiff report`)")


__all__ = ["split_app"]
