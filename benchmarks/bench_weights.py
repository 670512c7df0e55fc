"""Weights attack: shadow fine-tune time and encoder training throughput, side by side.

Measured in one process on the shipped face base with the default recipe, interleaved so that
machine noise hits every variant alike:
1. a plain shadow fine-tune (DreamBooth LoRA, no encoder): seconds per step and per S-step run;
2. the step-embedding paradigm (one pair after every fine-tune step, each spent in one batched
   encoder update): pairs/s, and its cost relative to the plain fine-tune;
3. the ablation (one end-of-run pair per S-step run): pairs/s at the same fine-tune steps.
Prints a table and writes JSON (default: benchmarks/results/bench_weights.json).

    python benchmarks/bench_weights.py            # 3 rounds of the recipe's S steps each
    python benchmarks/bench_weights.py --quick    # smoke run: tiny S, one round
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch
from common import print_table, write_json

from privdiff.data.identities import attack_split
from privdiff.models.load import FACE_BASE_DIR, load_pipeline
from privdiff.runs.record import run_record
from privdiff.weights.finetune import FinetuneBench, FinetuneRecipe
from privdiff.weights.paradigm import EncoderTrainer, EncoderTrainingConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="S = 8, one round (smoke test)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="S (default: the recipe's, 400)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_weights.json")
    args = parser.parse_args()
    recipe = FinetuneRecipe()
    steps = 8 if args.quick else (args.steps or recipe.steps)
    rounds = 1 if args.quick else args.rounds
    recipe = dataclasses.replace(recipe, steps=steps, prior_images=4 if args.quick else recipe.prior_images)
    torch.manual_seed(0)
    bench = FinetuneBench(load_pipeline(FACE_BASE_DIR), recipe, seed=0)
    shadows, _ = attack_split()
    paradigm = EncoderTrainer(bench, EncoderTrainingConfig(budget_steps=steps), shadows)
    ablation = EncoderTrainer(bench, EncoderTrainingConfig(budget_steps=steps, pairs="end-of-run", step_token=False),
                              shadows)
    times = {"plain fine-tune": [], "paradigm (every-step pairs)": [], "ablation (end-of-run pair)": []}
    pairs = {"plain fine-tune": 0, "paradigm (every-step pairs)": 0, "ablation (end-of-run pair)": 0}
    for r in range(rounds):
        identity = shadows[r]
        began = time.perf_counter()
        bench.finetune(identity, steps, seed_key=("bench", r))
        times["plain fine-tune"].append(time.perf_counter() - began)
        for name, trainer in (("paradigm (every-step pairs)", paradigm), ("ablation (end-of-run pair)", ablation)):
            began = time.perf_counter()
            seen = trainer.shadow_run(identity, steps)
            trainer.train_on(seen)  # the run's pairs, shuffled and batched as in training
            times[name].append(time.perf_counter() - began)
            pairs[name] += len(seen)
    plain = sum(times["plain fine-tune"]) / rounds
    result = {"recipe": dataclasses.asdict(recipe), "rounds": rounds, "steps_per_run": steps,
              "threads": torch.get_num_threads(), "variants": {}, "record": run_record()}
    rows = [("variant", "s per run", "ms per fine-tune step", "pairs/s", "x plain fine-tune")]
    for name, values in times.items():
        per_run = sum(values) / rounds
        rate = pairs[name] / sum(values) if pairs[name] else None
        result["variants"][name] = {"seconds_per_run": per_run, "ms_per_step": 1000 * per_run / steps,
                                    "pairs": pairs[name], "pairs_per_s": rate, "ratio_to_plain": per_run / plain}
        rows.append((name, f"{per_run:.2f}", f"{1000 * per_run / steps:.1f}", f"{rate:.2f}" if rate else "–",
                     f"{per_run / plain:.2f}"))
    result["shadow_finetune_s"] = plain
    result["encoder_pairs_per_s"] = result["variants"]["paradigm (every-step pairs)"]["pairs_per_s"]
    encoder = paradigm.encoder
    result["encoder_parameters"] = {"trainable": sum(p.numel() for p in encoder.trainable_parameters()),
                                    "frozen": sum(p.numel() for p in encoder.parameters() if not p.requires_grad)}
    print_table(rows)
    print(f"encoder: {result['encoder_parameters']['trainable']:,} trainable parameters "
          f"({result['encoder_parameters']['frozen']:,} frozen); {torch.get_num_threads()} threads")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
