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
    """(N, |P|) IN masks in complementary pairs: shadow 2j trains on a random half of the pool and
    shadow 2j + 1 on the other half, so every example is IN for exactly N/2 shadows (balanced, as the
    LiRA reference code requires) and so is it for every even prefix of the shadows: the first 2, 4,
    ... shadows of one training are themselves a balanced reference set (RMIA with 2 references,
    LiRA with 8, from the same shadows)."""
    if num_shadows < 2 or num_shadows % 2:
        raise ValueError("the number of shadows must be even and >= 2")
    rng = numpy_rng(seed, "lira-masks")
    masks = np.zeros((num_shadows, pool_size), dtype=bool)
    for pair in range(num_shadows // 2):
        first_half = rng.permutation(pool_size) < pool_size // 2 + rng.integers(0, pool_size % 2 + 1)
        masks[2 * pair], masks[2 * pair + 1] = first_half, ~first_half
    return masks


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
