"""`privdiff attack weights`: bad input is one line on stderr and exit code 2, before any work."""

from __future__ import annotations

import pytest

from privdiff.cli import main


@pytest.mark.parametrize("args, message", [
    (["--defence", "blur=3"], "unknown defence 'blur'"),
    (["--defence", "prune"], "must look like NAME=KNOB"),
    (["--defence", "prune=lots"], "must look like NAME=KNOB"),
    (["--set", "training.mode=weights"],
     "config key 'training.mode' must be one of delta, raw, canonical (got 'weights')"),
    (["--set", "training.pairs=sometimes"],
     "config key 'training.pairs' must be one of every-step, end-of-run (got 'sometimes')"),
    (["--budget", "10"], "training.budget_steps must be >= recipe.steps"),
    (["--set", "recipe.prompt_template=a face"], "must contain {}"),
])
def test_bad_settings_are_one_line_errors(args, message, tmp_path, capsys):
    assert main(["attack", "weights", "--out", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing written


def test_an_existing_result_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "attack.json").write_text("{}")
    assert main(["attack", "weights", "--out", str(tmp_path / "run")]) == 2
    assert "exists (use --overwrite" in capsys.readouterr().err
    assert (tmp_path / "run" / "attack.json").read_text() == "{}"
