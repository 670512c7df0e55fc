"""Who takes part in a split run, and with what: the triples (image, condition, prompt), their client
shards, client ids, simulated client secrets, and the client role a config asks for."""

from __future__ import annotations

from privdiff.data import load_image_folder
from privdiff.data.builtin import BUILTIN_DATASETS
from privdiff.data.examples import ImageDataset
from privdiff.errors import DataError
from privdiff.seeding import derive_seed
from privdiff.split.client import BackwardFreeClient, SplitClient, VanillaClient
from privdiff.split.config import SplitConfig
from privdiff.split.models import PublicModels


def load_triples(config: SplitConfig, test: bool = False) -> ImageDataset:
    """The training triples (or the held-out test triples, another seed) of the split run."""
    d = config.data
    if d.name in BUILTIN_DATASETS:
        dataset = BUILTIN_DATASETS[d.name](d.image_size, d.test_examples if test else d.num_examples,
                                           d.test_seed if test else d.seed)
    else:
        dataset = load_image_folder(d.name, d.image_size, d.max_image_pixels)
    if any(ex.conditioning is None for ex in dataset.examples):
        raise DataError(f"dataset '{d.name}' has no conditioning images (split ControlNet needs triples)")
    return dataset


def shard(dataset: ImageDataset, num_clients: int, how: str) -> list[ImageDataset]:
    """Client shards: by index (iid) or by the prompt's first colour word (non-IID `colour`)."""
    if how == "iid":
        groups = [[ex.id for i, ex in enumerate(dataset.examples) if i % num_clients == c] for c in range(num_clients)]
    else:
        colours = sorted({ex.caption.split()[1] for ex in dataset.examples})
        owner = {colour: i % num_clients for i, colour in enumerate(colours)}
        groups = [[ex.id for ex in dataset.examples if owner[ex.caption.split()[1]] == c] for c in range(num_clients)]
    if any(not g for g in groups):
        raise DataError(f"sharding '{how}' leaves a client without data ({num_clients} clients)")
    return [dataset.subset(g) for g in groups]


def client_id(index: int) -> str:
    return f"client-{index}"


def make_client(config: SplitConfig, models: PublicModels, cid: str, key: bytes, data: ImageDataset,
                secret_seed: int) -> SplitClient:
    if config.protocol.design == "vanilla":
        return VanillaClient(cid, key, models, data, config.protocol, secret_seed,
                             init_seed=config.train.seed, learning_rate=config.train.client_learning_rate)
    return BackwardFreeClient(cid, key, models, data, config.protocol, secret_seed)


def simulated_secret_seed(config: SplitConfig, index: int) -> int:
    """Simulations only: client secrets derived from the seed, so runs repeat (and an in-process and a
    Flower simulation draw the same noise). Real clients draw theirs at random (`privdiff split keys`)."""
    return derive_seed(config.train.seed, "simulated-client-secret", index)


__all__ = ["client_id", "load_triples", "make_client", "shard", "simulated_secret_seed"]
