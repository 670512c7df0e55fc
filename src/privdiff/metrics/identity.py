"""The identity-embedding model: who is in an image, for the weights attack (weights-attack.md §7).

A `ClassifierNet` trained with a softmax over the 300 identities of the `embedding` pool (none of
which is a base, shadow or victim identity); its 64-d feature layer, L2-normalised, is the
identity embedding, a small stand-in for FaceNet/VGGFace2 on the synthetic faces. The shipped
weights sit in `assets/extractors/identities/` with their recipe and hashes;
`train_identity_embedder` rebuilds them (deterministic on the CPU).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from privdiff.data.identities import attack_split, pool_identities, render_identity
from privdiff.metrics.features import (
    EXTRACTORS_DIR,
    ClassifierExtractor,
    ClassifierNet,
    classifier_preprocess,
    load_classifier,
    save_classifier,
)
from privdiff.seeding import numpy_rng

IDENTITY_EMBEDDER_DIR = EXTRACTORS_DIR / "identities"
HEAD = "identity"


@dataclass(frozen=True)
class IdentityEmbedderRecipe:
    """The recipe of the shipped identity embedder (`assets/extractors/identities/RECIPE.yaml`)."""

    pool: str = "embedding"
    train_renders: int = 40    # renders 0..39 of each pool identity
    val_renders: int = 5       # renders 40..44, for the validation accuracy
    seed: int = 0
    epochs: int = 30
    batch_size: int = 128
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    shift: int = 2             # extra random translation (output pixels) of each training batch
    label_smoothing: float = 0.1
    # Share of training renders drawn on a random background: without it the embedding is
    # mostly the background colour and barely looks at the face.
    background_swap: float = 0.5


def load_identity_embedder(folder: Path = IDENTITY_EMBEDDER_DIR) -> ClassifierExtractor:
    """The shipped identity embedder, hash-verified (refuses modified weights)."""
    return load_classifier(folder)


@torch.no_grad()
def embed_identities(embedder: ClassifierExtractor, images: np.ndarray | torch.Tensor,
                     batch_size: int = 512) -> torch.Tensor:
    """L2-normalised identity embeddings, (n, 64) float32 (no gradient).

    Args:
        embedder: from `load_identity_embedder`.
        images: (n, H, W, 3) uint8 numpy, or an (n, 3, H, W) float tensor in [0, 1] (e.g. a
            decoded sample mapped from [-1, 1]); resized to 32x32 when needed.
    """
    out = [embedder.features(embedder.preprocess(images[i:i + batch_size]))
           for i in range(0, len(images), batch_size)]
    return F.normalize(torch.cat(out).float(), dim=1)


def identity_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(len(a), len(b)) matrix of (cos + 1) / 2 in [0, 1] (the reference's face-similarity convention)."""
    return (F.normalize(a, dim=1) @ F.normalize(b, dim=1).T + 1.0) / 2.0


def retrieval_top1(query_emb: torch.Tensor, query_labels: list | np.ndarray | torch.Tensor,
                   gallery_emb: torch.Tensor, gallery_labels: list | np.ndarray | torch.Tensor) -> float:
    """Fraction of queries whose most similar gallery entry (cosine) carries the query's label."""
    nearest = identity_similarity(query_emb, gallery_emb).argmax(dim=1).tolist()
    gallery, queries = np.asarray(gallery_labels).tolist(), np.asarray(query_labels).tolist()
    return float(np.mean([gallery[j] == label for j, label in zip(nearest, queries)]))


def renders(identity: int, start: int, count: int, background_swap: float = 0.0, seed: int = 0) -> np.ndarray:
    """Renders `start ..` of `identity`, each on a random background with probability
    `background_swap` (drawn from (seed, identity, index)); (count, 32, 32, 3) uint8."""
    images = []
    for index in range(start, start + count):
        rng = numpy_rng(seed, "background-swap", identity, index)
        swap, hue, saturation = rng.random(), rng.random(), rng.uniform(0.2, 0.75)
        images.append(render_identity(identity, index, background=(hue, saturation) if swap < background_swap
                                      else None))
    return np.stack(images)


def victim_retrieval(embedder: ClassifierExtractor, identities: list[int], gallery_renders: int = 5,
                     query_renders: int = 5, query_background_swap: float = 0.0) -> float:
    """Top-1 retrieval on real renders: gallery = mean embedding of renders 0..g-1 of each
    identity, queries = the next `query_renders` renders (their backgrounds swapped for random
    ones with probability `query_background_swap`, to measure how much the face alone counts)."""
    gallery, queries = [], []
    for identity in identities:
        gallery.append(embed_identities(embedder, renders(identity, 0, gallery_renders)).mean(0))
        queries.append(embed_identities(embedder, renders(identity, gallery_renders, query_renders,
                                                          query_background_swap, seed=1)))
    labels = np.repeat(identities, query_renders)
    return retrieval_top1(torch.cat(queries), labels, torch.stack(gallery), identities)


def _pool_tensors(identities: list[int], start: int, count: int, background_swap: float,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    images = np.concatenate([renders(identity, start, count, background_swap, seed) for identity in identities])
    return classifier_preprocess(images), torch.arange(len(identities)).repeat_interleave(count)


def _shift(x: torch.Tensor, pixels: int, rng: torch.Generator) -> torch.Tensor:
    """Random translation of each image by up to `pixels` (edge-replicated border)."""
    if pixels == 0:
        return x
    padded = F.pad(x, (pixels,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * pixels + 1, (len(x), 2), generator=rng).tolist()
    h, w = x.shape[-2:]
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])


def train_identity_embedder(out_dir: Path = IDENTITY_EMBEDDER_DIR,
                            recipe: IdentityEmbedderRecipe = IdentityEmbedderRecipe(),
                            show_progress: bool = True) -> dict:
    """Trains the embedder from its recipe and writes it (weights, SHA256SUMS, RECIPE.yaml).

    Returns:
        The record written to RECIPE.yaml (recipe, validation accuracy, victim retrieval).
    """
    from rich.progress import Progress

    torch.use_deterministic_algorithms(True)
    torch.manual_seed(recipe.seed)
    identities = pool_identities(recipe.pool)
    train_x, train_y = _pool_tensors(identities, 0, recipe.train_renders, recipe.background_swap, recipe.seed)
    val_x, val_y = _pool_tensors(identities, recipe.train_renders, recipe.val_renders, 0.0, recipe.seed)
    net = ClassifierNet({HEAD: len(identities)})
    optimiser = torch.optim.AdamW(net.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    steps_per_epoch = math.ceil(len(train_x) / recipe.batch_size)
    total = recipe.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, recipe.learning_rate, total_steps=total)
    rng = torch.Generator().manual_seed(recipe.seed)
    with Progress(disable=not show_progress, transient=True) as progress:
        bar = progress.add_task("training the identity embedder", total=total)
        for _ in range(recipe.epochs):
            net.train()
            order = torch.randperm(len(train_x), generator=rng)
            for i in range(steps_per_epoch):
                idx = order[i * recipe.batch_size:(i + 1) * recipe.batch_size]
                logits = net(_shift(train_x[idx], recipe.shift, rng))[HEAD]
                loss = F.cross_entropy(logits, train_y[idx], label_smoothing=recipe.label_smoothing)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()
                progress.advance(bar)
    torch.use_deterministic_algorithms(False)
    net.eval()
    with torch.no_grad():
        val_accuracy = float((net(val_x)[HEAD].argmax(1) == val_y).float().mean())
    out_dir = Path(out_dir)
    save_classifier(out_dir, net, {HEAD: [str(i) for i in identities]}, "identities")
    _, victims = attack_split()
    embedder = load_classifier(out_dir)
    retrieval = victim_retrieval(embedder, victims)
    swapped = victim_retrieval(embedder, victims, query_background_swap=1.0)
    record = {"recipe": asdict(recipe),
              "validation_accuracy": {HEAD: val_accuracy},
              "victim_retrieval_top1": retrieval,
              "victim_retrieval_protocol": f"{len(victims)} victim identities of the attack pool; gallery = "
                                           f"mean embedding of renders 0..4, queries = renders 5..9; sanity "
                                           f"threshold 0.9",
              "victim_retrieval_top1_random_background": swapped,
              "final_train_loss": float(loss.item()),
              "architecture": "3 conv stages (32, 64, 128; 3x3 stride 2, GroupNorm(8), SiLU), global average "
                              "pool, Linear(128 -> 64) features (the embedding, L2-normalised), linear head "
                              "over the pool identities",
              "optimiser": "AdamW + one-cycle schedule, cross-entropy with label smoothing",
              "reproduce": "privdiff.metrics.identity.train_identity_embedder() (defaults are this recipe)",
              "torch": str(torch.__version__)}
    (out_dir / "RECIPE.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
    return record
