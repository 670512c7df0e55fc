"""`privdiff report`: the report card comparing runs side by side (HTML + report.json)."""

from __future__ import annotations

from pathlib import Path

from privdiff.errors import ConfigError
from privdiff.report.collect import collect
from privdiff.report.html import render
from privdiff.runs.files import atomic_write_json, atomic_write_text


def write_report(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Writes the HTML report to `out` and the same numbers to report.json beside it."""
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"report: --out must end in .html, got {out}")
    report = collect(list(run_dirs))
    page = render(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), report)
    atomic_write_text(out, page)
    return out


__all__ = ["collect", "render", "write_report"]
