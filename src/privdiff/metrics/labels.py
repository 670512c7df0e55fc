"""Class labels read back from the captions of the built-in datasets (for classifier heads)."""

from __future__ import annotations

import re

from privdiff.data.vocabulary import COLOURS, NUMBER_WORDS

LETTERS = list("abcdefghijklmnopqrstuvwxyz")
COLOUR_NAMES = sorted(COLOURS)

# dataset -> (caption pattern, {head: label names}); the pattern's named groups are the heads.
CAPTION_LABELS: dict[str, tuple[re.Pattern, dict[str, list[str]]]] = {
    "digits": (re.compile(r"^a (?:handwritten|printed) digit (?P<digit>\w+)$"), {"digit": list(NUMBER_WORDS)}),
    "glyphs": (re.compile(r"^a (?P<foreground>\w+) letter (?P<letter>\w) on a (?P<background>\w+) background$"),
               {"letter": LETTERS, "foreground": COLOUR_NAMES, "background": COLOUR_NAMES}),
    "fill": (re.compile(r"^a (?P<circle>\w+) circle on a (?P<background>\w+) background$"),
             {"circle": COLOUR_NAMES, "background": COLOUR_NAMES}),
}


def label_heads(dataset: str) -> dict[str, list[str]]:
    return CAPTION_LABELS[dataset][1] if dataset in CAPTION_LABELS else {}


def caption_labels(dataset: str, caption: str) -> dict[str, int] | None:
    """{head: class index} for a caption of `dataset`, or None when the caption carries no labels."""
    if dataset not in CAPTION_LABELS:
        return None
    pattern, heads = CAPTION_LABELS[dataset]
    match = pattern.match(caption)
    if match is None:
        return None
    try:
        return {head: heads[head].index(match.group(head)) for head in heads}
    except ValueError:
        return None
