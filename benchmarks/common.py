"""Shared output of the benchmark scripts: an aligned table on stdout and a JSON file."""

from __future__ import annotations

import json
from pathlib import Path


def print_table(rows: list[tuple[str, ...]]) -> None:
    """Rows of strings; the first column is left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        print("  ".join(cells).rstrip())


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
