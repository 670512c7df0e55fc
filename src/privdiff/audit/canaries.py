"""One-run canary audit (Steinke, Nasr, Jagielski, arXiv 2305.08846; membership-audit.md §6.2).

Canaries are held-out examples of the private distribution that are in no manifest role. Each is
included independently with probability 1/2, one extra run is trained with the run's recipe on
members + included canaries, and the chosen attack guesses IN for the k highest-scoring canaries
and OUT for the k lowest (k = m/8, fixed in advance).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from privdiff.audit.attacks import ATTACKS
from privdiff.audit.bounds import one_run_eps
from privdiff.audit.model import Candidates, Denoiser
from privdiff.audit.run import audit_cache, encode_candidates
from privdiff.data import load_dataset
from privdiff.data.manifest import Manifest
from privdiff.diffusion.task import encode_split
from privdiff.errors import ConfigError
from privdiff.runs.files import atomic_write_json
from privdiff.runs.folder import RunFolder, open_run
from privdiff.runtime import Runtime
from privdiff.seeding import numpy_rng
from privdiff.training.run import run_manifest, run_pipeline, train_like


def draw_canaries(spare_ids: list[str], m: int, seed: int) -> tuple[list[str], np.ndarray]:
    """m canaries from ids in no manifest role, and their independent Bernoulli(1/2) inclusion."""
    if m < 8:
        raise ConfigError("canary audit: need at least 8 canaries")
    if len(spare_ids) < m:
        raise ConfigError(f"canary audit: {m} canaries requested but only {len(spare_ids)} examples of this "
                          f"dataset are outside the manifest (use fewer canaries or a larger dataset)")
    rng = numpy_rng(seed, "canaries")
    chosen = sorted(rng.choice(len(spare_ids), size=m, replace=False).tolist())
    included = numpy_rng(seed, "canary-inclusion").random(m) < 0.5
    return [spare_ids[i] for i in chosen], included


def canary_manifest(base: Manifest, canaries: list[str], included: np.ndarray, dataset_hash: str) -> Manifest:
    """The canary run trains on the members plus the included canaries; its other roles are unused."""
    roles = dict(base.roles)
    for cid, inside in zip(canaries, included):
        roles[cid] = "member_test" if inside else "nonmember_test"
    return Manifest(roles=roles, seed=base.seed, dataset=base.dataset, dataset_hash=dataset_hash,
                    proportions=base.proportions)


def guesses(scores: np.ndarray, included: np.ndarray, k: int) -> tuple[int, int]:
    """(r, v): guess IN for the k highest scores and OUT for the k lowest; v of the r guesses correct."""
    order = np.argsort(scores, kind="stable")
    out_guess, in_guess = order[:k], order[len(order) - k:]
    return 2 * k, int(included[in_guess].sum() + (~included[out_guess]).sum())


def canary_audit(run_dir: str | Path, *, num_canaries: int = 128, attack: str = "loss", seed: int = 0,
                 p: float = 0.05, show_progress: bool = True, runtime: Runtime | None = None,
                 cache: bool = True) -> dict:
    """Trains the canary run (reused when finished), scores the canaries, returns the one-run bound
    (reading and writing the run's encoding cache if `cache`, whatever the run itself did)."""
    if attack not in ATTACKS:
        raise ConfigError(f"canary audit: unknown attack '{attack}' (choose from {', '.join(ATTACKS)})")
    run: RunFolder = open_run(run_dir)
    full = load_dataset(dataclasses.replace(run.config.data, num_examples=None))
    base = run_manifest(run)
    spare = [e.id for e in full.examples if e.id not in base.roles]
    canaries, included = draw_canaries(spare, num_canaries, seed)
    out_dir = run.path / "audit"
    out_dir.mkdir(exist_ok=True)
    canary_run = train_like(run, out_dir / "canary-run", canary_manifest(base, canaries, included, full.content_hash),
                            ["data.num_examples=null", f"cache.enabled={str(cache).lower()}"],
                            show_progress, runtime)
    pipe = run_pipeline(canary_run, runtime=runtime)
    model = Denoiser(pipe.unet, pipe.scheduler)
    chosen = ATTACKS[attack](seed)
    encodings = audit_cache(run, cache)
    aux = encode_candidates(run, pipe, ("member_aux", "nonmember_aux"), encodings)
    chosen.fit(model, aux["member_aux"], aux["nonmember_aux"])  # fitted on aux only, before any canary
    scores = chosen.score(model, encode_split(pipe, full.subset(canaries), Candidates, encodings))
    k = num_canaries // 8
    r, v = guesses(scores, included, k)
    privacy = run.summary.get("privacy") or {}
    delta = float(privacy.get("delta", 0.0))
    result = {"m": num_canaries, "k_in": k, "k_out": k, "r": r, "v": v, "p": p, "delta": delta,
              "eps": one_run_eps(num_canaries, r, v, delta=delta, p=p),
              "eps_delta_1e-5": one_run_eps(num_canaries, r, v, delta=1e-5, p=p),
              "attack": attack, "attack_fitted": {k_: v_ for k_, v_ in chosen.fitted.items()
                                                  if k_ != "aux_auc_by_value"},
              "num_included": int(included.sum()), "canary_source": "held-out examples outside the manifest",
              "claimed_epsilon": privacy.get("epsilon")}
    atomic_write_json(out_dir / "canaries.json", {**result, "canaries": canaries,
                                                  "included": included.astype(int).tolist(),
                                                  "scores": scores.tolist()})
    audit_path = out_dir / "audit.json"
    if audit_path.exists():
        audit = json.loads(audit_path.read_text())
        audit["eps_lower_bound"]["one_run"] = result
        atomic_write_json(audit_path, audit)
    return result
