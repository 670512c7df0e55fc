"""The encoding cache on this machine: encoding without it, a cold cache (encode and write), a warm one
(read and check), a subset of a warm one; disk size; and whether cached rows equal fresh ones.

Prints a table and writes JSON (default: benchmarks/results/bench_encoding_cache.json).

    python benchmarks/bench_encoding_cache.py                 # shipped tiny base, 1000 images of 32 px
    python benchmarks/bench_encoding_cache.py --sd-size --device cuda --num-images 2000 --image-size 256
    python benchmarks/bench_encoding_cache.py --quick         # smoke run
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import print_table, write_json

from privdiff.data.examples import Example, ImageDataset
from privdiff.diffusion.cache import EncodingCache
from privdiff.diffusion.task import encode_images, encode_prompts, encode_split
from privdiff.models.load import load_pipeline
from privdiff.models.tiny import TinySDConfig, build_tiny_pipeline
from privdiff.runs.record import run_record

# Stable Diffusion's VAE widths and text width, randomly initialised (nothing is downloaded).
SD_SIZE = TinySDConfig(vae_channels=(128, 256, 512, 512), unet_channels=(32, 64), cross_attention_dim=768,
                       attention_head_dim=8, text_layers=12, norm_num_groups=32)


def random_dataset(num_images: int, image_size: int) -> ImageDataset:
    rng = np.random.default_rng(0)
    return ImageDataset("random", [Example(f"img-{i:06d}", rng.integers(0, 256, (image_size, image_size, 3), np.uint8),
                                           f"a photo of the digit {i % 10}") for i in range(num_images)])


def timed(encode) -> tuple[float, object]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    began = time.perf_counter()
    out = encode()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - began, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--sd-size", action="store_true", help="Stable Diffusion's widths (random weights)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_encoding_cache.json")
    args = parser.parse_args()
    if args.quick:
        args.num_images = 70
    pipe = build_tiny_pipeline(SD_SIZE) if args.sd_size else load_pipeline(None)
    pipe.to(args.device)
    data = random_dataset(args.num_images, args.image_size)
    half = data.subset(sorted(np.random.default_rng(1).choice([e.id for e in data.examples], args.num_images // 2,
                                                              replace=False).tolist()))
    with tempfile.TemporaryDirectory() as root, torch.no_grad():
        times = {"no cache": timed(lambda: encode_split(pipe, data, cache=EncodingCache(None)))[0]}
        times["cold cache (encode + write)"] = timed(lambda: encode_split(pipe, data, cache=EncodingCache(root)))[0]
        times["warm cache (read + check)"] = timed(lambda: encode_split(pipe, data, cache=EncodingCache(root)))[0]
        times["warm cache, random half"], cached = timed(lambda: encode_split(pipe, half, cache=EncodingCache(root)))
        fresh = encode_split(pipe, half, cache=EncodingCache(None))
        disk_mib = sum(p.stat().st_size for p in Path(root).rglob("*.safetensors")) / 2**20
    full = encode_split(pipe, data)
    rows = [data.examples.index(ex) for ex in half.examples]
    unbatched = encode_images(pipe, half.images_tensor()), encode_prompts(pipe, half.captions())
    identical = {"cached half == fresh half": torch.equal(cached.latents, fresh.latents)
                 and torch.equal(cached.contexts, fresh.contexts),
                 "without fixed batches, half == rows of the whole": torch.equal(unbatched[0], full.latents[rows])
                 and torch.equal(unbatched[1], full.contexts[rows])}
    print_table([("encoding", "seconds", "images/s")]
                + [(name, f"{s:.3f}", f"{(len(half) if 'half' in name else len(data)) / s:.0f}")
                   for name, s in times.items()])
    print(f"cache on disk: {disk_mib:.1f} MiB for {len(data)} images at {args.image_size} px")
    for name, same in identical.items():
        print(f"{name}: {'bit-identical' if same else 'DIFFERENT'}")
    write_json(args.out, {"num_images": len(data), "image_size": args.image_size, "sd_size": args.sd_size,
                          "device": args.device, "seconds": times, "disk_mib": disk_mib, "bit_identical": identical,
                          **run_record()})


if __name__ == "__main__":
    main()
