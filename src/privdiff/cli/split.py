"""`privdiff split simulate|server|client|keys`: split-learning ControlNet training."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer
from rich.console import Console

from privdiff.cli import app
from privdiff.cli.options import build_config

console = Console(soft_wrap=True)
split_app = typer.Typer(no_args_is_help=True, help="Split-learning ControlNet: clients keep their data, a server trains.")
app.add_typer(split_app, name="split")


def _config(config_file: Path | None, flags: dict, extra: list[str] | None):
    from privdiff.split.config import SplitConfig

    return build_config(config_file, flags, extra, kind=SplitConfig)


def _print_summary(summary: dict, folder: Path) -> None:
    wire = summary.get("wire", {})
    console.print(f"split run ({summary['design']}, {summary.get('transport', '?')}): {summary['steps']} steps, "
                  f"{summary['rounds']} rounds, loss {summary['loss_first']} -> {summary['loss_last']}, "
                  f"refused {sum(summary['refusals'].values())} messages {summary['refusals'] or ''}")
    if wire:
        console.print(f"wire: {wire['up_bytes_per_example']:.0f} B/example up, "
                      f"{wire['down_bytes_per_example']:.0f} B/example down")
    fidelity = summary.get("condition_fidelity")
    if fidelity:
        parts = []
        for name in ("untrained", "trained", "ceiling"):
            if name in fidelity:
                value = fidelity[name]["edge_ssim"]
                parts.append(f"{name} {value['value']:.3f} [{value['ci'][0]:.3f}, {value['ci'][1]:.3f}]")
        console.print(f"condition fidelity (edge SSIM, {fidelity['num_samples']} test conditions): " + ", ".join(parts))
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
    set_: list[str] = typer.Option(None, "--set", help="Any config key: section.key=value (repeatable)."),
    evaluate: bool = typer.Option(True, help="Measure condition fidelity after training."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its checkpoint."),
    overwrite: bool = typer.Option(False, help="Replace an existing run folder."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Train a ControlNet by split learning with simulated clients on the `fill` dataset."""
    from privdiff.errors import ConfigError

    cfg = _config(config, {"protocol.design": design, "train.clients": clients, "train.steps": steps,
                           "data.num_examples": num_examples, "output_dir": out}, set_)
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
    set_: list[str] = typer.Option(None, "--set", help="Any config key: section.key=value (repeatable)."),
    overwrite: bool = typer.Option(False, help="Replace an existing run folder."),
    timeout: float = typer.Option(86400.0, help="Seconds to wait for the run to finish."),
) -> None:
    """Start a Flower SuperLink, submit the split-learning ServerApp to it and wait for the run."""
    from privdiff.errors import ConfigError
    from privdiff.split.flower.loopback import serve_on_flower

    if not insecure:
        raise ConfigError("TLS deployments start flower-superlink with certificates themselves and submit with "
                          "`flwr run` (README, 'Split learning on Flower'); this command runs with --insecure only")
    cfg = _config(config, {"output_dir": out}, set_)
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
                          "(README, 'Split learning on Flower'); this command runs with --insecure only")
    read_client_identity(key_file)  # fail here, not in the first message, on a bad key file
    node_config: dict = {"partition-id": partition_id, "num-partitions": num_partitions,
                         "key-file": str(key_file.resolve())}
    if data_dir is not None:
        node_config["data-dir"] = str(data_dir.resolve())
    command = supernode_command(superlink, port, node_config)
    console.print("starting: " + " ".join(command))
    os.execvpe(command[0], command, flower_environment())


__all__ = ["split_app"]
