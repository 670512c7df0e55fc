"""Shadow LoRAs for LiRA: the target's recipe on balanced random halves of the manifest pool.

A shadow farm: under torchrun every process trains its share of the shadows (shadow j on rank
j mod W, each alone), and the main process loads them all. A shadow's folder is finished when its
summary.json exists (written last, atomically), so a farm that was stopped skips the finished
shadows and retrains the others; shadow j's seed depends on j only, so the results do not depend
on the number of processes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from privdiff.audit.attacks.base import ShadowSet
from privdiff.audit.model import Denoiser
from privdiff.data.manifest import Manifest
from privdiff.distributed import current_world, decided_on_main, run_farm
from privdiff.runs.farm import claim_farm_folder
from privdiff.runs.folder import RunFolder, open_run
from privdiff.runtime import Runtime
from privdiff.seeding import derive_seed, numpy_rng
from privdiff.training.run import run_manifest, run_pipeline, train_like


def balanced_masks(num_shadows: int, pool_size: int, seed: int) -> np.ndarray:
    """(N, |P|) IN masks where every example is IN for exactly N/2 shadows: a uniform matrix, and per
    example the N/2 shadows with the smallest values (as the LiRA reference code)."""
    if num_shadows < 2 or num_shadows % 2:
        raise ValueError("the number of shadows must be even and >= 2")
    order = numpy_rng(seed, "lira-masks").random((num_shadows, pool_size)).argsort(axis=0).argsort(axis=0)
    return order < num_shadows // 2


def shadow_manifest(base: Manifest, in_ids: set[str]) -> Manifest:
    """The shadow trains on `in_ids` only (as members); every other pool id is a non-member."""
    roles = {i: ("member_aux" if i in in_ids else "nonmember_aux") for i in base.roles}
    return Manifest(roles=roles, seed=base.seed, dataset=base.dataset, dataset_hash=base.dataset_hash,
                    proportions=base.proportions)


def train_shadows(run: RunFolder, num_shadows: int, seed: int, out_dir: Path,
                  show_progress: bool = True, runtime: Runtime | None = None, cache: bool = True) -> ShadowSet | None:
    """Trains (or reuses, when already finished with the same masks) N shadows with the run's recipe,
    reading and writing the run's encoding cache if `cache` (whatever the run itself did).

    Under torchrun (a process group joined), every process trains its share; the main process
    returns every shadow, the others None.

    Raises:
        ConfigError: `out_dir` holds shadows trained with other masks.
    """
    base = run_manifest(run)
    pool = list(base.roles)
    masks = balanced_masks(num_shadows, len(pool), seed)
    record = {"pool": pool, "seed": seed, "masks": masks.astype(int).tolist()}
    decided_on_main(lambda: claim_farm_folder(out_dir / "masks.json", record, "shadows"))
    in_ids = [{pool[k] for k in np.flatnonzero(masks[j])} for j in range(num_shadows)]
    folders = [out_dir / f"shadow-{j:02d}" for j in range(num_shadows)]
    is_main = current_world().is_main

    def train_shadow(j: int) -> None:
        train_like(run, folders[j], shadow_manifest(base, in_ids[j]),
                   [f"train.seed={derive_seed(seed, 'shadow', j) % 2**31}", f"cache.enabled={str(cache).lower()}"],
                   show_progress and is_main, runtime)

    if not run_farm(num_shadows, train_shadow, finished=lambda j: (folders[j] / "summary.json").exists()):
        return None
    models = []
    for folder in folders:
        pipe = run_pipeline(open_run(folder), runtime=runtime)
        models.append(Denoiser(pipe.unet, pipe.scheduler))
    return ShadowSet(models=models, in_ids=in_ids)
