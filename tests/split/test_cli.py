"""`privdiff split ...`: thin commands, one-line errors, a simulated run end to end on the tiny model."""

from __future__ import annotations

import json
import stat

import pytest

from privdiff.cli import main


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    return err


def _tiny(tiny_pipeline_dir, out) -> list[str]:
    return ["--out", str(out), "--set", f"model.pretrained={tiny_pipeline_dir}", "--num-examples", "16",
            "--set", "train.request_size=4", "--set", "data.test_examples=4", "--set", "eval.num_samples=4",
            "--set", "eval.num_inference_steps=2", "--set", "train.checkpoint_every=2", "--quiet"]


@pytest.mark.slow
def test_simulate_then_resume(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "split"
    assert main(["split", "simulate", "--steps", "2", *_tiny(tiny_pipeline_dir, out)]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "condition fidelity (edge SSIM, 4 test conditions)" in printed and "B/example up" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["wire"]["down_bytes_per_example"] < 100  # requests only
    # issue 26, finding 5: a run shorter than the 20-round window printed one number twice
    assert summary["loss_window"] == 1 and summary["loss_first"] != summary["loss_last"]
    assert f"loss {summary['loss_first']} -> {summary['loss_last']} (means of the first and last 1 rounds)" in printed
    assert (out / "controlnet" / "config.json").is_file() and (out / "config.yaml").is_file()
    # the same command again refuses to overwrite; --resume continues (nothing left: 2 of 2 steps)
    assert main(["split", "simulate", "--steps", "2", *_tiny(tiny_pipeline_dir, out)]) == 2
    assert "is not empty" in _one_line_error(capsys)
    assert main(["split", "simulate", "--steps", "2", "--resume", "--no-evaluate", *_tiny(tiny_pipeline_dir, out)]) == 0
    assert json.loads((out / "summary.json").read_text())["resumed"] is True


@pytest.mark.parametrize("args, message", [
    (["--design", "telepathy"], "config key 'protocol.design' must be one of backward-free, vanilla (got 'telepathy')"),
    (["--set", "protocol.t_start=1000"], "protocol.t_start must be in [0, 998]"),
    (["--set", "protocol.design=vanilla", "--set", "train.passes=2"], "vanilla makes one step per round"),
    (["--transport", "carrier-pigeon"], "--transport must be inprocess or flower"),
    (["--set", "data.name=digits"], "has no conditioning images"),
])
def test_simulate_bad_options(args, message, tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "split"
    assert main(["split", "simulate", "--steps", "1", *_tiny(tiny_pipeline_dir, out), *args]) == 2
    assert message in _one_line_error(capsys)


def test_keys_are_private_files(tmp_path, capsys):
    assert main(["split", "keys", "--clients", "3", "--out", str(tmp_path / "k")]) == 0
    server = json.loads((tmp_path / "k" / "server-keys.json").read_text())
    assert sorted(server) == ["client-0", "client-1", "client-2"]
    for path in (tmp_path / "k").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    client = json.loads((tmp_path / "k" / "client-1.json").read_text())
    assert client["key"] == server["client-1"] and isinstance(client["secret_seed"], int)


def test_client_and_server_refuse_without_insecure_and_bad_key_files(tmp_path, capsys):
    assert main(["split", "client", "--superlink", "127.0.0.1:1", "--key-file", str(tmp_path / "none.json")]) == 2
    assert "--insecure only" in _one_line_error(capsys)
    assert main(["split", "client", "--superlink", "127.0.0.1:1", "--key-file", str(tmp_path / "none.json"),
                 "--insecure"]) == 2
    assert "cannot read the client key file" in _one_line_error(capsys)
    assert main(["split", "server", "--keys", str(tmp_path / "k.json")]) == 2
    assert "--insecure only" in _one_line_error(capsys)
