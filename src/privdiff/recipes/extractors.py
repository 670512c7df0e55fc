"""Training the shipped feature extractors from their recipes, on public data only.

Each recipe draws its training set from a public generator with a seed of its own (rendered
letters, rendered circles, printed digits degraded like the UCI scans), never from a private
dataset or a membership manifest. Training is deterministic on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image, ImageDraw, ImageFont

from privdiff.data.builtin import (
    _font_files,
    _random_affine,
    _resize,
    load_fill,
    load_glyphs,
)
from privdiff.data.examples import Example, ImageDataset
from privdiff.data.vocabulary import NUMBER_WORDS
from privdiff.metrics.features import (
    ClassifierNet,
    classifier_preprocess,
    save_classifier,
)
from privdiff.metrics.labels import caption_labels, label_heads


@dataclass(frozen=True)
class ExtractorRecipe:
    name: str
    public_data: str       # what the training images are (never private data)
    num_train: int
    num_val: int
    data_seed: int
    seed: int = 0
    epochs: int = 8
    batch_size: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4


RECIPES = {
    "digits": ExtractorRecipe("digits", "digits 0-9 printed in matplotlib's fonts, jittered, degraded to "
                              "8x8 with 17 grey levels like the UCI scans", 24_000, 2_000, data_seed=7001),
    "glyphs": ExtractorRecipe("glyphs", "the built-in glyphs generator (letters in matplotlib's fonts), "
                              "blank renders dropped", 24_000, 2_000, data_seed=7002, epochs=16),
    "fill": ExtractorRecipe("fill", "the built-in fill generator (filled circles)", 12_000, 2_000,
                            data_seed=7003, epochs=4),
}


def _elastic(img: np.ndarray, rng: np.random.RandomState, alpha: float, sigma: float) -> np.ndarray:
    """Smooth random displacement (Simard et al. 2003), a cheap stand-in for handwriting variation."""
    from scipy.ndimage import gaussian_filter, map_coordinates

    h, w = img.shape
    dy = gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma) * alpha
    dx = gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma) * alpha
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return map_coordinates(img, [yy + dy, xx + dx], order=1, mode="constant")


def printed_digits(num_examples: int, image_size: int, seed: int) -> ImageDataset:
    """Printed digits passed through the UCI optdigits pipeline: binarised, cropped to the ink,
    scaled into a 32x32 box, then the number of ink pixels in each 4x4 block (17 grey levels)."""
    rng = np.random.RandomState(seed)
    fonts = [f for f in _font_files() if "Display" not in f.name]  # the Display faces have no digits
    canvas = 96
    examples = []
    for i in range(num_examples):
        digit = int(rng.randint(10))
        font = ImageFont.truetype(str(fonts[rng.randint(len(fonts))]), size=int(canvas * 0.6))
        img = Image.new("L", (canvas, canvas), 0)
        ImageDraw.Draw(img).text((canvas / 2, canvas / 2), str(digit), font=font, fill=255, anchor="mm",
                                 stroke_width=int(rng.randint(0, 3)), stroke_fill=255)
        img = _random_affine(img.convert("RGB"), rng, (0, 0, 0)).convert("L")
        ink = _elastic(np.asarray(img, dtype=np.float64), rng, alpha=rng.uniform(0, 40), sigma=6) > 127
        rows, cols = np.where(ink)
        crop = Image.fromarray(ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1].astype(np.uint8) * 255)
        squeeze = rng.uniform(0.7, 1.1)  # handwriting is narrower than most printed faces
        scale = 32 / max(crop.width * squeeze, crop.height)
        crop = crop.resize((max(1, min(32, round(crop.width * squeeze * scale))),
                            max(1, min(32, round(crop.height * scale)))), Image.NEAREST)
        box = Image.new("L", (32, 32), 0)
        box.paste(crop, ((32 - crop.width) // 2, (32 - crop.height) // 2))
        blocks = (np.asarray(box) > 127).reshape(8, 4, 8, 4).sum(axis=(1, 3)) / 16.0
        examples.append(Example(id=f"printed-digits-{i:05d}", image=_resize(blocks, image_size),
                                caption=f"a printed digit {NUMBER_WORDS[digit]}"))
    return ImageDataset("printed-digits", examples)


def public_training_set(recipe: ExtractorRecipe, num_examples: int, seed: int) -> ImageDataset:
    if recipe.name == "digits":
        return printed_digits(num_examples, 32, seed)
    if recipe.name == "glyphs":
        # Drop the blank renders (matplotlib's DejaVu*Display faces have no letters): unlearnable.
        glyphs = load_glyphs(32, num_examples, seed)
        return ImageDataset("glyphs", [e for e in glyphs.examples if e.image.std() > 2.0])
    if recipe.name == "fill":
        return load_fill(32, num_examples, seed)
    raise KeyError(recipe.name)


def labelled_tensors(dataset: ImageDataset, domain: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    images = np.stack([ex.image for ex in dataset.examples])
    labels = [caption_labels(domain, ex.caption) for ex in dataset.examples]
    if any(lab is None for lab in labels):
        raise ValueError(f"some {dataset.name} captions carry no {domain} labels")
    heads = label_heads(domain)
    return classifier_preprocess(images), {h: torch.tensor([lab[h] for lab in labels]) for h in heads}


def accuracy(net: ClassifierNet, x: torch.Tensor, y: dict[str, torch.Tensor]) -> dict[str, float]:
    net.eval()
    with torch.no_grad():
        logits = {h: [] for h in y}
        for i in range(0, len(x), 512):
            for h, out in net(x[i:i + 512]).items():
                logits[h].append(out)
    return {h: float((torch.cat(logits[h]).argmax(1) == y[h]).float().mean()) for h in y}


def train_extractor(recipe: ExtractorRecipe, out_dir: Path, show_progress: bool = True) -> dict:
    """Trains one extractor from its recipe and writes it (weights, SHA256SUMS, RECIPE.yaml)."""
    from rich.progress import Progress

    torch.use_deterministic_algorithms(True)
    torch.manual_seed(recipe.seed)
    train_x, train_y = labelled_tensors(public_training_set(recipe, recipe.num_train, recipe.data_seed),
                                        recipe.name)
    num_train = len(train_x)
    val_x, val_y = labelled_tensors(public_training_set(recipe, recipe.num_val, recipe.data_seed + 1),
                                    recipe.name)
    heads = label_heads(recipe.name)
    net = ClassifierNet({h: len(names) for h, names in heads.items()})
    optimiser = torch.optim.AdamW(net.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    steps_per_epoch = math.ceil(num_train / recipe.batch_size)
    total = recipe.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, recipe.learning_rate, total_steps=total)
    order_gen = torch.Generator().manual_seed(recipe.seed)
    with Progress(disable=not show_progress, transient=True) as progress:
        bar = progress.add_task(f"training the {recipe.name} extractor", total=total)
        for _ in range(recipe.epochs):
            net.train()
            order = torch.randperm(num_train, generator=order_gen)
            for i in range(steps_per_epoch):
                idx = order[i * recipe.batch_size:(i + 1) * recipe.batch_size]
                outputs = net(train_x[idx])
                loss = sum(F.cross_entropy(outputs[h], train_y[h][idx]) for h in heads)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()
                progress.advance(bar)
    torch.use_deterministic_algorithms(False)
    val = accuracy(net, val_x, val_y)
    out_dir = Path(out_dir)
    save_classifier(out_dir, net, heads, recipe.name)
    record = {"recipe": asdict(recipe), "validation_accuracy": val,
              "architecture": "3 conv stages (32, 64, 128; 3x3 stride 2, GroupNorm(8), SiLU), "
                              "global average pool, Linear(128 -> 64) features, linear heads",
              "optimiser": "AdamW + one-cycle schedule, cross-entropy summed over heads",
              "torch": str(torch.__version__)}
    (out_dir / "RECIPE.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
    return record
