"""`privdiff evaluate`: utility metrics of a run, offline, with intervals (evaluation spec).

Writes RUN_DIR/metrics.json (one record per figure), RUN_DIR/eval/ (a grid of the generated
samples and their features, for paired comparisons) and fills summary.json["metrics"].
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from privdiff.config import (
    ConfigRoot,
    RuntimeConfig,
    Scheduler,
    choice_checks,
    raise_first_failure,
)
from privdiff.diffusion.task import encode_images, encode_prompts
from privdiff.metrics.distances import (
    KernelMatrices,
    fid,
    fid_reliability_warning,
    frechet_distance,
    kid,
    precision_recall,
)
from privdiff.metrics.features import (
    FeatureExtractor,
    default_extractor_spec,
    load_extractor,
)
from privdiff.metrics.heldout import HELDOUT_ROLES, heldout_losses
from privdiff.metrics.intervals import (
    bootstrap_interval,
    clopper_pearson,
    mean_interval,
)
from privdiff.metrics.labels import caption_labels, label_heads
from privdiff.models.generation import sample_seeded, save_grid
from privdiff.runs.files import atomic_replace, atomic_write_json
from privdiff.runs.folder import RunFolder, open_run
from privdiff.runs.record import run_record
from privdiff.runtime import resolve_runtime
from privdiff.training.run import run_dataset, run_manifest, run_pipeline

REFERENCES = ("members", "nonmember_test")


@dataclass
class EvalConfig(ConfigRoot):
    """Evaluation settings (evaluation.md §10); written into metrics.json."""

    num_samples: int = 1000          # quick mode: 256
    eval_seed: int = 0
    num_inference_steps: int = 50
    scheduler: Scheduler = "ddim"
    guidance_scale: float = 3.0
    features: str | None = None      # None = the default extractor of the run's dataset
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    bootstrap: int = 200
    heldout_timesteps: int = 8
    precision_recall: bool = False
    batch_size: int = 125
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def validate(self) -> "EvalConfig":
        """Raises ConfigError on the first invalid value."""
        checks = [(self.num_samples >= 10, "num_samples must be >= 10"),
                  (self.num_inference_steps >= 1, "num_inference_steps must be >= 1"),
                  (self.guidance_scale >= 1, "guidance_scale must be >= 1"),
                  (self.kid_subsets >= 2 and self.kid_subset_size >= 2, "KID needs >= 2 subsets of >= 2"),
                  (self.bootstrap >= 20, "bootstrap must be >= 20 resamples"),
                  (self.heldout_timesteps >= 1, "heldout_timesteps must be >= 1"),
                  (self.batch_size >= 1, "batch_size must be >= 1")]
        raise_first_failure([*choice_checks(self), *((ok, f"evaluate: {message}") for ok, message in checks)])
        return self


QUICK = {"num_samples": 256}


def generation_prompts(captions: list[str], count: int) -> list[str]:
    """The dataset's distinct captions, sorted and cycled: classes are balanced and every method
    gets the same prompt for seed index i."""
    distinct = sorted(set(captions))
    return [distinct[i % len(distinct)] for i in range(count)]


def _fid_record(gen: np.ndarray, ref: np.ndarray, cfg: EvalConfig, key: str) -> dict:
    point = fid(gen, ref)

    def weighted(cg: np.ndarray, cr: np.ndarray) -> float:
        def moments(x: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            mu = c @ x / c.sum()
            centred = x - mu
            return mu, (centred * c[:, None]).T @ centred / (c.sum() - 1)

        return frechet_distance(*moments(gen, cg), *moments(ref, cr))

    ci = bootstrap_interval(weighted, [len(gen), len(ref)], point=point, resamples=cfg.bootstrap,
                            seed=cfg.eval_seed, key=f"fid/{key}")
    record = {"metric": "fid", "value": point, "ci": list(ci)}
    warning = fid_reliability_warning(min(len(gen), len(ref)), gen.shape[1])
    if warning:
        record["warning"] = warning
    return record


def _kid_record(gen: np.ndarray, ref: np.ndarray, cfg: EvalConfig, key: str) -> dict:
    kernels = KernelMatrices.of(gen, ref)
    result = kid(gen, ref, num_subsets=cfg.kid_subsets, subset_size=cfg.kid_subset_size,
                 seed=cfg.eval_seed, kernels=kernels)
    ci = bootstrap_interval(kernels.mmd2_weighted, [len(gen), len(ref)], point=result.value,
                            resamples=cfg.bootstrap, seed=cfg.eval_seed, key=f"kid/{key}")
    return {"metric": "kid", "value": result.value, "ci": list(ci), "subset_sd": result.subset_sd,
            "subset_size": result.subset_size, "num_subsets": result.num_subsets}


def _accuracy_records(domain: str, extractor: FeatureExtractor, prompts: list[str],
                      predicted: dict[str, np.ndarray], real_captions: list[str],
                      real_predicted: dict[str, np.ndarray]) -> list[dict]:
    """Per head: accuracy of the generated samples against their prompt, per class and overall,
    next to the classifier's accuracy on real held-out images (the ceiling)."""
    heads = label_heads(domain)
    if not heads or any(extractor.label_names.get(h) != names for h, names in heads.items()):
        return []
    wanted = [caption_labels(domain, p) for p in prompts]
    truth = [caption_labels(domain, c) for c in real_captions]
    records = []
    for head, names in heads.items():
        target = np.array([w[head] for w in wanted])
        correct = predicted[head] == target
        per_class = {}
        for k, name in enumerate(names):
            mask = target == k
            if mask.any():
                hits = int(correct[mask].sum())
                per_class[name] = {"value": hits / int(mask.sum()), "n": int(mask.sum()),
                                   "ci": list(clopper_pearson(hits, int(mask.sum())))}
        hits = int(correct.sum())
        records.append({"metric": "accuracy", "head": head, "value": hits / len(correct),
                        "ci": list(clopper_pearson(hits, len(correct))), "n_generated": len(correct),
                        "per_class": per_class,
                        "mean_per_class": float(np.mean([v["value"] for v in per_class.values()])),
                        "uses_private_data": False})
        real_target = np.array([t[head] for t in truth])
        real_hits = int((real_predicted[head] == real_target).sum())
        records.append({"metric": "accuracy_ceiling", "head": head, "value": real_hits / len(real_target),
                        "ci": list(clopper_pearson(real_hits, len(real_target))),
                        "n_reference": len(real_target), "reference": "nonmember_test",
                        "note": "classifier accuracy on real held-out images"})
    return records


def _heldout_records(run: RunFolder, pipe, dataset, cfg: EvalConfig) -> list[dict]:
    manifest = run_manifest(run)
    records, per_role = [], {}
    for role in HELDOUT_ROLES:
        subset = dataset.subset(manifest.ids(role))
        images = subset.images_tensor()
        contexts = encode_prompts(pipe, subset.captions(), resolution=tuple(images.shape[-2:]))
        losses, steps = heldout_losses(pipe.unet, pipe.scheduler, encode_images(pipe, images), contexts,
                                       [e.id for e in subset.examples], seed=cfg.eval_seed,
                                       count=cfg.heldout_timesteps)
        per_example = losses.mean(axis=1)
        per_role[role] = per_example
        records.append({"metric": "heldout_loss", "reference": role, "value": float(per_example.mean()),
                        "ci": list(mean_interval(per_example, resamples=cfg.bootstrap, seed=cfg.eval_seed,
                                                 key=f"heldout/{role}")),
                        "n_reference": len(per_example), "timesteps": steps,
                        "per_timestep": losses.mean(axis=0).tolist(),
                        "note": "computed on private examples: not covered by any DP guarantee"})
    members, others = per_role["member_test"], per_role["nonmember_test"]
    gap = float(others.mean() - members.mean())
    ci = bootstrap_interval(lambda cm, cn: float(cn @ others / cn.sum() - cm @ members / cm.sum()),
                            [len(members), len(others)], point=gap, resamples=cfg.bootstrap,
                            seed=cfg.eval_seed, key="heldout/gap")
    records.append({"metric": "generalisation_gap", "between": ["nonmember_test", "member_test"],
                    "value": gap, "ci": list(ci), "n_reference": len(members) + len(others),
                    "note": "held-out loss of test non-members minus test members; > 0 hints at leakage"})
    return records


def evaluate_run(run_dir: str | Path, cfg: EvalConfig | None = None, *, show_progress: bool = True) -> dict:
    """Computes every utility metric of a run and writes metrics.json; returns its content."""
    began = time.perf_counter()
    cfg = (cfg or EvalConfig()).validate()
    runtime = resolve_runtime(cfg.runtime)
    run = open_run(run_dir)
    dataset = run_dataset(run)
    manifest = run_manifest(run)
    extractor = load_extractor(cfg.features or default_extractor_spec(dataset.name))
    pipe = run_pipeline(run, runtime=runtime)
    domain = dataset.name
    sampler = {"scheduler": cfg.scheduler, "num_inference_steps": cfg.num_inference_steps,
               "guidance_scale": cfg.guidance_scale, "eta": 0.0}
    is_dp = bool(run.summary.get("privacy"))

    timings = {"load_s": time.perf_counter() - began}
    mark = time.perf_counter()
    prompts = generation_prompts(dataset.captions(), cfg.num_samples)
    images = sample_seeded(pipe, prompts, seed=cfg.eval_seed, num_inference_steps=cfg.num_inference_steps,
                           scheduler=cfg.scheduler, guidance_scale=cfg.guidance_scale,
                           image_size=run.config.data.image_size, batch_size=cfg.batch_size,
                           show_progress=show_progress)
    timings["generation_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    gen_features, gen_labels = extractor.extract(images)
    references = {"members": dataset.subset(manifest.members),
                  "nonmember_test": dataset.subset(manifest.ids("nonmember_test"))}
    ref_features, ref_labels = {}, {}
    for name, subset in references.items():
        ref_features[name], ref_labels[name] = extractor.extract(np.stack([e.image for e in subset.examples]))

    timings["features_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    common = {"n_generated": len(images), "extractor": extractor.id, "sampler": sampler,
              "eval_seed": cfg.eval_seed}
    records = []
    for name in REFERENCES:
        for make in (_fid_record, _kid_record):
            record = make(gen_features, ref_features[name], cfg, name)
            records.append({**record, **common, "n_reference": len(ref_features[name]), "reference": name,
                            "dp_covered": False})
        if cfg.precision_recall:
            inside_real, inside_gen = precision_recall(gen_features, ref_features[name])
            for metric, hits in (("precision", inside_real), ("recall", inside_gen)):
                records.append({"metric": metric, "value": float(hits.mean()),
                                "ci": list(clopper_pearson(int(hits.sum()), len(hits))), **common,
                                "n_reference": len(ref_features[name]), "reference": name, "k": 3,
                                "dp_covered": False, "note": "interval conditional on the k-NN manifolds"})
    for record in _accuracy_records(domain, extractor, prompts, gen_labels,
                                    references["nonmember_test"].captions(), ref_labels["nonmember_test"]):
        covered = is_dp and not record.pop("uses_private_data", True)
        context = common if record["metric"] == "accuracy" else {"extractor": extractor.id,
                                                                  "eval_seed": cfg.eval_seed}
        records.append({**context, **record, "dp_covered": covered})
    timings["statistics_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    for record in _heldout_records(run, pipe, dataset, cfg):
        records.append({**record, "eval_seed": cfg.eval_seed, "dp_covered": False})

    timings["heldout_loss_s"] = time.perf_counter() - mark
    eval_dir = run.path / "eval"
    eval_dir.mkdir(exist_ok=True)
    save_grid(images[:100], eval_dir / "samples.png")
    atomic_replace(eval_dir / "generated_features.npz",
                   lambda tmp: np.savez_compressed(open(tmp, "wb"), features=gen_features,
                                                   prompts=np.array(prompts)))
    result = {"run": str(run.path), "config": cfg.to_dict(), "extractor": extractor.id,
              "records": records, **run_record(), "wall_time_s": round(time.perf_counter() - began, 3),
              "timings_s": {k: round(v, 3) for k, v in timings.items()}}
    atomic_write_json(run.path / "metrics.json", result)
    summary = json.loads((run.path / "summary.json").read_text())
    summary["metrics"] = summarise(records)
    atomic_write_json(run.path / "summary.json", summary)
    return result


def record_key(record: dict) -> str:
    """A short unique name of a record: metric/head-or-reference."""
    qualifier = record.get("head") or record.get("reference", "")
    return f"{record['metric']}/{qualifier}" if qualifier else record["metric"]


def summarise(records: list[dict]) -> dict:
    """The compact form stored in summary.json["metrics"]: key -> value, interval, sizes."""
    out = {}
    for r in records:
        out[record_key(r)] = {"value": r["value"], "ci": r["ci"],
                              **{k: r[k] for k in ("n_generated", "n_reference", "extractor") if k in r}}
    return out
