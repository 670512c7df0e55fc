"""`privdiff attack weights`: the whole weights-to-image experiment in one run folder (weights-attack.md §10).

1. Victims: held-out identities fine-tuned with the recipe; their adapters saved as files.
2. Metadata: each victim file's header is read first; a trigger word found there is the
   "metadata attack", reported separately.
3. The encoder is trained on shadow fine-tunes (the step-embedding paradigm), and, at the same
   budget of shadow fine-tune steps, the ablation (no step token, one end-of-run pair per run).
4. Every victim is attacked from its file alone and scored with the bounds (`evaluate`).
5. Defences: each (defence, knob) gives defended victim files, attacked by the undefended
   encoder and (adaptive, post-hoc defences) by an encoder re-trained on defended shadows;
   utility is the defended model's true-prompt identity similarity.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress

from privdiff.config import load_config
from privdiff.data.folder import load_image_folder
from privdiff.data.identities import attack_split, trigger_word
from privdiff.defences import defend_file
from privdiff.errors import ConfigError
from privdiff.metrics.estimate import Estimate
from privdiff.metrics.identity import (
    embed_identities,
    identity_similarity,
    load_identity_embedder,
)
from privdiff.models.inspect import inspect_file, read_header
from privdiff.models.load import FACE_BASE_DIR, load_pipeline, require_stable_diffusion
from privdiff.models.lora_math import read_unet_lora
from privdiff.runs.files import atomic_write_json, save_config
from privdiff.runs.record import run_record
from privdiff.seeding import generator, seed_everything
from privdiff.weights.attack import WeightsAttack
from privdiff.weights.baselines import UpdateMatchingConfig, update_matching
from privdiff.weights.config import WeightsAttackConfig
from privdiff.weights.finetune import FinetuneBench
from privdiff.weights.paradigm import (
    EncoderTrainingConfig,
)
from privdiff.weights.plots import weights_defence_curve
from privdiff.weights.scoring import (
    IdentityJudge,
    aggregate,
    evaluate_victims,
    image_grid,
    negative_context,
    victim_model,
)
from privdiff.weights.shipped import shipped_encoder_dir

RESULT_FILE = "attack.json"


def metadata_trigger(path: Path, trigger: str) -> str | None:
    """The header key whose value contains `trigger` (the metadata attack), or None."""
    _, metadata, _ = read_header(path)
    for key, value in metadata.items():
        if trigger.lower() in str(value).lower():
            return key
    return None


def _paired_difference(rows_a: list[dict], rows_b: list[dict], seed: int, key: str) -> dict:
    diff = np.array([a["attack"]["identity_similarity"] - b["attack"]["identity_similarity"]
                     for a, b in zip(rows_a, rows_b, strict=True)])
    return Estimate.of_mean(diff, seed=seed, key=key).to_json()


class WeightsAttackRun:
    """Holds the shared pieces of one run (base model, bench, judge, victims) across its stages."""

    def __init__(self, config: WeightsAttackConfig, *, show_progress: bool = True) -> None:
        self.config, self.show_progress = config, show_progress
        self.out = Path(config.output_dir)
        seed_everything(config.seed)
        self.pipe = load_pipeline(config.base_model or FACE_BASE_DIR)
        require_stable_diffusion(self.pipe, "the weights attack")
        self.bench = FinetuneBench(self.pipe, config.recipe, seed=config.seed)
        shadow_pool, victim_pool = attack_split()
        d = config.data
        held = d.validation_shadows
        self.validation = shadow_pool[len(shadow_pool) - held:] if held else []
        usable = shadow_pool[: len(shadow_pool) - held]
        self.shadows = usable[: d.shadows] if d.shadows else usable
        if d.victims > len(victim_pool):
            raise ConfigError(f"data.victims {d.victims} is more than the {len(victim_pool)} held-out identities")
        self.gallery = victim_pool
        self.victims = victim_pool[: d.victims]
        self.judge = IdentityJudge(self.gallery, config.recipe.images_per_identity)
        self.prompt_stats = self.bench.prompt_statistics(self.shadows[:256])
        self.timings: dict[str, float] = {}

    def fine_tune_victims(self, folder: Path, dp_epsilon: float | None = None) -> dict[int, Path]:
        folder.mkdir(parents=True, exist_ok=True)
        adapters = {}
        began = time.perf_counter()
        label = f"fine-tuning victims (DP ε={dp_epsilon:g})" if dp_epsilon else "fine-tuning victims"
        with Progress(disable=not self.show_progress, transient=True) as progress:
            bar = progress.add_task(label, total=len(self.victims))
            for identity in self.victims:
                model = self.bench.finetune(identity, dp_epsilon=dp_epsilon)
                extra = ({"privdiff.dp.epsilon": f"{dp_epsilon:g}", "privdiff.dp.delta": "1e-05"} if dp_epsilon else None)
                adapters[identity] = self.bench.save_adapter(model, folder / f"{identity}.safetensors", extra)
                progress.advance(bar)
        self.timings["victim_finetune_s_per_run" + (f"_dp{dp_epsilon:g}" if dp_epsilon else "")] = (
            (time.perf_counter() - began) / max(1, len(self.victims)))
        return adapters

    def train_encoder(self, training: EncoderTrainingConfig, name: str) -> tuple[WeightsAttack, dict]:
        """Fits the attack's encoder on the shadows and saves it in OUT/name; returns it and its summary."""
        attack = WeightsAttack(self.bench, training, init_seed=self.config.recipe.init_seed)
        summary = attack.fit(self.shadows, show_progress=self.show_progress)
        attack.save(self.out / name)
        return attack, summary

    def attack_context(self, attack: WeightsAttack):
        def context(adapter: Path) -> torch.Tensor:
            rng = generator(self.config.eval.seed, "z-sample", adapter.name)
            return attack.embed(read_unet_lora(adapter), sample=self.config.eval.sample_z, rng=rng)
        return context

    def evaluate(self, adapters: dict[int, Path], attack: WeightsAttack | None, conditions: tuple[str, ...],
                 keep_images: int = 0):
        """Scores `adapters` under `conditions`; the "attack" condition needs `attack` (else None)."""
        return evaluate_victims(self.bench, self.judge, adapters,
                                None if attack is None else self.attack_context(attack),
                                self.config.eval.generation, self.prompt_stats, seed=self.config.eval.seed,
                                conditions=conditions, keep_images=keep_images)


def run_weights_attack(config: WeightsAttackConfig, *, show_progress: bool = True, overwrite: bool = False) -> dict:
    """Runs the experiment of `config` into `config.output_dir`; returns the content of attack.json.

    Raises:
        ConfigError: the folder already holds a result (without `overwrite`), or a bad setting.
    """
    out = Path(config.output_dir)
    if (out / RESULT_FILE).exists() and not overwrite:
        raise ConfigError(f"{out / RESULT_FILE} exists (use --overwrite or another --out)")
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    began = time.perf_counter()
    run = WeightsAttackRun(config, show_progress=show_progress)
    seed = config.eval.seed

    adapters = run.fine_tune_victims(out / "victims")
    metadata = {str(v): metadata_trigger(path, trigger_word(v)) for v, path in adapters.items()}

    attack, training_summary = run.train_encoder(config.training, "encoder")
    rows, images = run.evaluate(adapters, attack, ("attack", "true_prompt", "random_embedding", "base"),
                                keep_images=config.eval.grid_victims)
    result: dict = {
        "kind": "weights-attack",
        "threat_model": "attacker sees only the victim's LoRA file; knows the base model, the recipe "
                        "(S, lr) and, in delta mode, the default seeded LoRA init",
        "headline": {"input_mode": config.training.mode, "step": config.recipe.steps,
                     "z": "sample" if config.eval.sample_z else "mean"},
        "victims": rows, "aggregate": aggregate(rows, seed=seed), "encoder": training_summary,
        "metadata_attack": {"recovered": sum(k is not None for k in metadata.values()), "of": len(metadata),
                            "keys": {v: k for v, k in metadata.items() if k}},
        "gallery_size": len(run.gallery), "chance_retrieval": 1 / len(run.gallery),
    }
    private = {v: run.bench.private_images(v) for v in images}
    image_grid(out / "attack_grid.png", private, images)

    if config.eval.baseline_victims:
        result["update_matching"] = run_update_matching(run, adapters, rows)

    if config.eval.ablation:
        ablation_cfg = dataclasses.replace(config.training, step_token=False, pairs="end-of-run")
        ablation, ablation_summary = run.train_encoder(ablation_cfg, "encoder-ablation")
        ablation_rows, _ = run.evaluate(adapters, ablation, ("attack",))
        result["ablation"] = {"label": ablation_cfg.label, "encoder": ablation_summary,
                              "aggregate": aggregate(ablation_rows, ("attack",), seed=seed),
                              "paradigm_minus_ablation": _paired_difference(rows, ablation_rows, seed, "ablation"),
                              "victims": ablation_rows}

    if config.defences.apply:
        result["defences"] = run_defences(run, adapters, attack, rows)
        atomic_write_json(out / "defences.json", result["defences"])
        (out / "defence_curve.png").write_bytes(weights_defence_curve(result["defences"]))

    result["timings"] = {**run.timings, "encoder_pairs_per_s": training_summary["pairs_per_s"],
                         "shadow_finetune_s_per_step": training_summary["finetune_s_per_step"],
                         "wall_time_s": time.perf_counter() - began}
    result["run"] = run_record()
    atomic_write_json(out / RESULT_FILE, result)
    return result


def run_update_matching(run: WeightsAttackRun, adapters: dict[int, Path], rows: list[dict]) -> dict:
    """The update-matching baseline on the first victims: its dummy images, and the victim model
    prompted with its dummy embedding, scored like the attack (paired with the attack's rows)."""
    cfg = run.config.eval
    matching = UpdateMatchingConfig(iterations=cfg.baseline_iterations)
    chosen = list(adapters.items())[: cfg.baseline_victims]
    out_rows = []
    with Progress(disable=not run.show_progress, transient=True) as progress:
        bar = progress.add_task("update-matching baseline", total=len(chosen))
        for identity, adapter in chosen:
            found = update_matching(run.bench, read_unet_lora(adapter), matching, seed=identity)
            victim = victim_model(run.bench, adapter)
            images = run.bench.generate(victim.unet, found.prompt, cfg.generation,
                                        generator(cfg.seed, "generate", identity), negative_context(run.bench, victim))
            out_rows.append({"identity": identity, "dummy_images": run.judge.score(identity, found.images),
                             "dummy_prompt": run.judge.score(identity, images),
                             "final_mismatch": found.history[-1]})
            progress.advance(bar)
    attack_rows = [r for r in rows if r["identity"] in {i for i, _ in chosen}]
    return {"config": dataclasses.asdict(matching), "victims": out_rows,
            "aggregate": aggregate(out_rows, ("dummy_images", "dummy_prompt"), seed=cfg.seed),
            "attack_on_same_victims": aggregate(attack_rows, ("attack",), seed=cfg.seed)}


def run_defences(run: WeightsAttackRun, adapters: dict[int, Path], attack: WeightsAttack,
                 undefended_rows: list[dict]) -> dict:
    """Every (defence, knob): defended victim files, attacked (plain and adaptive), with utility."""
    config, seed = run.config, run.config.eval.seed
    undefended = aggregate(undefended_rows, seed=seed)
    points = [{"defence": "none", "knob": None, "utility": undefended["true_prompt"]["identity_similarity"],
               "attack": undefended["attack"]["identity_similarity"]}]
    lower = undefended["random_embedding"]["identity_similarity"]
    for name, knob in config.defences.parsed():
        folder = run.out / "victims" / f"{name}-{knob:g}"
        if name == "dp":
            defended = run.fine_tune_victims(folder, dp_epsilon=knob)
        else:
            folder.mkdir(parents=True, exist_ok=True)
            defended = {v: defend_file(path, folder / path.name, name, _knob(name, knob, config.recipe.rank),
                                       seed=int(v)) for v, path in adapters.items()}
        rows, _ = run.evaluate(defended, attack, ("attack", "true_prompt"))
        scores = aggregate(rows, ("attack", "true_prompt"), seed=seed)
        point = {"defence": name, "knob": knob, "utility": scores["true_prompt"]["identity_similarity"],
                 "attack": scores["attack"]["identity_similarity"], "attack_retrieval": scores["attack"]["retrieval"]}
        if name == "dp":
            point["group_privacy_note"] = (f"example-level ε={knob:g}; the identity is shared by "
                                           f"{config.recipe.images_per_identity} images, so identity-level "
                                           f"protection is only group privacy: about "
                                           f"{config.recipe.images_per_identity * knob:g}ε")
        if config.defences.adaptive and name != "dp":
            adaptive_cfg = dataclasses.replace(config.training, defence=name,
                                               defence_knob=_knob(name, knob, config.recipe.rank))
            adaptive, _ = run.train_encoder(adaptive_cfg, f"encoder-adaptive-{name}-{knob:g}")
            adaptive_rows, _ = run.evaluate(defended, adaptive, ("attack",))
            point["adaptive_attack"] = aggregate(adaptive_rows, ("attack",), seed=seed)["attack"]["identity_similarity"]
        points.append(point)
    return {"points": points, "lower_bound": lower, "victims": len(adapters),
            "utility": "true-prompt identity similarity of the defended model",
            "leak": "attack identity similarity (encoder trained on undefended shadows; adaptive where listed)"}


def _knob(name: str, knob: float, rank: int) -> float:
    """Rank truncation keeps an integer number of singular values; other knobs pass through."""
    if name == "rank":
        if knob != int(knob) or not 1 <= knob <= rank:
            raise ConfigError(f"rank truncation keeps 1..{rank} singular values, got {knob:g}")
        return int(knob)
    return knob


def attack_adapter(encoder_dir: Path | None, adapter: Path, out: Path, *, private: Path | None = None,
                   overwrite: bool = False) -> dict:
    """Attacks one shared file with an encoder trained by an earlier run (None: the shipped encoder
    for the face base, hash-checked): what would it show?

    Writes `adapter_attack.json` and `adapter_attack.png` (G attack images; with `private`, an
    image folder of the identity, also the identity similarity to it). The header is inspected
    first: a leaking header is reported before any weights are read.

    Raises:
        ConfigError: no run config beside the encoder, or an existing result without `overwrite`.
        ModelError: the adapter's layout differs from the encoder's.
    """
    encoder_dir = shipped_encoder_dir() if encoder_dir is None else encoder_dir
    result_file = out / "adapter_attack.json"
    if result_file.exists() and not overwrite:
        raise ConfigError(f"{result_file} exists (use --overwrite or another --out)")
    run_config = encoder_dir.parent / "config.yaml"
    if not run_config.is_file():
        raise ConfigError(f"{encoder_dir}: no config.yaml beside it (pass the encoder folder of a weights-attack run)")
    config = load_config(run_config, kind=WeightsAttackConfig)
    header = inspect_file(adapter)
    read_unet_lora(adapter)  # a file that is no UNet LoRA is refused before the base model is loaded
    pipe = load_pipeline(config.base_model or FACE_BASE_DIR)
    require_stable_diffusion(pipe, "the weights attack")
    bench = FinetuneBench(pipe, dataclasses.replace(config.recipe, prior_images=0), seed=config.seed)
    attack = WeightsAttack.load(encoder_dir, bench, init_seed=config.recipe.init_seed)
    images = attack.reconstruct(adapter, config.eval.generation, generator(config.eval.seed, "adapter-attack"))
    result: dict = {"adapter": str(adapter), "encoder": str(encoder_dir), "input_mode": attack.training.mode,
                    "step": attack.step, "header": header, "images": len(images)}
    if private is not None:
        dataset = load_image_folder(private, pipe.vae.config.sample_size)
        judge = load_identity_embedder()
        similarity = identity_similarity(embed_identities(judge, images),
                                         embed_identities(judge, np.stack([e.image for e in dataset.examples])))
        result["identity_similarity_to_private"] = float(similarity.mean())
    out.mkdir(parents=True, exist_ok=True)
    strip = np.concatenate([np.pad(i, ((1, 1), (1, 1), (0, 0)), constant_values=255) for i in images], axis=1)
    from PIL import Image

    Image.fromarray(strip).resize((strip.shape[1] * 3, strip.shape[0] * 3), Image.NEAREST).save(out / "adapter_attack.png")
    result["run"] = run_record()
    atomic_write_json(result_file, result)
    return result
