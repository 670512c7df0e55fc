"""The main job: the embedded default run, end to end, in a few minutes on 2 CPU cores."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from privdiff.config import RunConfig, load_config
from privdiff.training.run import run_training

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


@dataclass
class DemoResult:
    run_dirs: dict[str, Path]
    wall_time_s: float

    def describe(self) -> str:
        lines = [f"demo finished in {self.wall_time_s:.0f} s"]
        for name, path in self.run_dirs.items():
            summary = json.loads((path / "summary.json").read_text())
            lines.append(f"  {name:<6} {path}  (final loss {summary['final_loss']:.4f}, "
                         f"{summary['steps']} steps, samples: {path / 'samples.png'})")
        return "\n".join(lines)


def demo_config(out: Path, name: str, steps: int | None = None) -> RunConfig:
    overrides = [f"output_dir={Path(out) / name}"] + ([f"train.steps={steps}"] if steps else [])
    return load_config(DEMO_CONFIG, overrides)


def run_demo(out: Path, steps: int | None = None, show_progress: bool = True) -> DemoResult:
    """Fine-tunes plain LoRA on the private digits (the runs later issues compare against)."""
    began = time.perf_counter()
    lora_dir = run_training(demo_config(out, "lora", steps), overwrite=True, show_progress=show_progress)
    return DemoResult(run_dirs={"lora": lora_dir}, wall_time_s=time.perf_counter() - began)
