"""A farm's folder: one sub-folder per job, the plan the jobs follow, and a job's finished marker.

Every job writes its own folder and, last and atomically, its marker, so a farm that was stopped
(a crash, a preemption) reruns only the jobs without one. The plan is recorded once: a folder
that holds a farm with another plan is refused rather than mixed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from privdiff.errors import ConfigError
from privdiff.runs.files import atomic_write_json

FINISHED_MARKER = "done.json"


def claim_farm_folder(plan_path: Path, plan: Any, what: str) -> None:
    """Records `plan` in `plan_path` (its folder is the farm's), unless it already holds the same plan.

    Raises:
        ConfigError: the folder holds `what` made with another plan.
    """
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    if plan_path.exists() and json.loads(plan_path.read_text()) != json.loads(json.dumps(plan)):
        raise ConfigError(f"{plan_path.parent} holds {what} made with other settings; remove it to retrain")
    atomic_write_json(plan_path, plan)


def is_finished(job_folder: Path) -> bool:
    return (job_folder / FINISHED_MARKER).exists()


def mark_finished(job_folder: Path, summary: dict) -> None:
    """Written after every other file of the job (atomically): the job counts as done from here on."""
    atomic_write_json(job_folder / FINISHED_MARKER, summary)
