"""The weights-attack encoder shipped for the face base, so that a user can attack a file of their
own (`privdiff attack weights --adapter FILE`) without first training an encoder for an hour.

It is the encoder of one full run on all 180 held-out victims, packed with that run's config,
results (RECIPE.yaml), per-victim scores (victims.json, what docs/weights-attack.md's headline table is computed
from) and versions:

    privdiff attack weights --victims 180 --out RUN
    python -m privdiff.weights.shipped RUN

It fits files fine-tuned from the shipped face base with the default recipe (`tiny-sd-identities`,
LoRA r 4 on to_q/to_v); another layout is refused when the file is read.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import yaml

from privdiff.errors import ModelError
from privdiff.metrics.estimate import Estimate
from privdiff.models.load import CHECKSUM_FILE, verify_checksums, write_checksums
from privdiff.runs.files import atomic_write_text
from privdiff.weights.scoring import CONDITIONS

SHIPPED_ATTACK_DIR = Path(__file__).resolve().parent.parent / "assets" / "weights-attack-identities"
_PACKED = ("config.yaml", "encoder/encoder.json", "encoder/encoder.safetensors")
VICTIM_ROWS = "victims.json"


def shipped_encoder_dir(root: Path = SHIPPED_ATTACK_DIR) -> Path:
    """The shipped encoder folder, after checking every file against its hashes.

    Raises:
        ModelError: a file is missing, unlisted or modified.
    """
    if not (root / CHECKSUM_FILE).is_file():
        raise ModelError(f"{root}: no {CHECKSUM_FILE}; refusing an unverified encoder")
    listed = {line.split(maxsplit=1)[1] for line in (root / CHECKSUM_FILE).read_text().splitlines() if line.strip()}
    missing = [name for name in (*_PACKED, VICTIM_ROWS) if name not in listed]
    if missing:
        raise ModelError(f"{root}: {CHECKSUM_FILE} does not cover {', '.join(missing)}")
    verify_checksums(root)
    return root / "encoder"


def shipped_victim_rows(root: Path = SHIPPED_ATTACK_DIR) -> list[dict]:
    """The shipped run's per-victim scores (hash-checked): identity, each condition's scores and
    the ablation encoder's attack scores."""
    shipped_encoder_dir(root)
    return json.loads((root / VICTIM_ROWS).read_text())


def _victim_rows(result: dict) -> list[dict]:
    ablation = {r["identity"]: r["attack"] for r in result.get("ablation", {}).get("victims", [])}
    rows = []
    for row in result["victims"]:
        kept = {"identity": row["identity"], **{name: row[name] for name in CONDITIONS if name in row}}
        if row["identity"] in ablation:
            kept["ablation"] = ablation[row["identity"]]
        rows.append(kept)
    return rows


def pack_run(run: Path, dest: Path = SHIPPED_ATTACK_DIR) -> None:
    """Copies a finished run's encoder and config into `dest` with RECIPE.yaml (its results),
    victims.json (its per-victim scores) and hashes."""
    result = json.loads((run / "attack.json").read_text())
    dest.mkdir(parents=True, exist_ok=True)
    for name in _PACKED:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run / name, dest / name)
    agg = result["aggregate"]

    def rounded(entry: dict) -> dict:
        estimate = Estimate.from_json(entry)
        return Estimate(round(estimate.value, 4), round(estimate.low, 4), round(estimate.high, 4), estimate.n).to_json()

    recipe = {
        "reproduce": [f"privdiff attack weights --victims {agg['victims']} "
                      f"--budget {result['encoder']['finetune_steps']} --out RUN",
                      "python -m privdiff.weights.shipped RUN"],
        "victims": agg["victims"],
        "identity_similarity": {name: rounded(agg[name]["identity_similarity"])
                                for name in ("attack", "true_prompt", "random_embedding", "base")},
        "attack_minus_random": rounded(agg["attack_minus_random"]),
        "encoder": {k: result["encoder"][k] for k in ("pairs", "finetune_steps", "encoder_updates")
                    if k in result["encoder"]},
        "git_commit": result["run"]["git_commit"],
        "torch": result["run"]["packages"].get("torch"),
    }
    atomic_write_text(dest / "RECIPE.yaml", yaml.safe_dump(recipe, sort_keys=False))
    atomic_write_text(dest / VICTIM_ROWS, json.dumps(_victim_rows(result), indent=1))
    write_checksums(dest, suffixes=(".safetensors", ".json", ".yaml"))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m privdiff.weights.shipped RUN_FOLDER")
    pack_run(Path(sys.argv[1]))
    print(f"packed {sys.argv[1]} into {SHIPPED_ATTACK_DIR}")
