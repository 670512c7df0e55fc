"""A tiny word-level CLIP tokenizer built in code.

The real CLIP tokenizer has 49k BPE merges learned on web text; shipping it would add megabytes and
tie the tiny models to a vocabulary they never use. This builds a byte-level BPE with the same file
format (`vocab.json` + `merges.txt`) whose merges spell out a fixed word list, so every caption word
privdiff generates is one token and any other text still tokenizes (character by character).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from transformers import CLIPTokenizer

from privdiff.data.vocabulary import CAPTION_WORDS

MAX_LENGTH = 16

WORDS = CAPTION_WORDS


def _bytes_to_unicode() -> dict[int, str]:
    # Same reversible byte -> printable-character table as GPT-2/CLIP BPE.
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def build_vocab_and_merges(words: tuple[str, ...] = WORDS) -> tuple[dict[str, int], list[str]]:
    """Returns a CLIP-format vocabulary and merge list in which each word of `words` is one token.

    A small BPE training run over the word list: merge the most frequent adjacent pair (ties by
    text) until every word is a single symbol. Encoding applies merges in the learned order, so
    each listed word reproduces its training segmentation: one token.
    """
    base = list(_bytes_to_unicode().values())
    vocab_list = base + [c + "</w>" for c in base]
    words_as_symbols = [list(w[:-1]) + [w[-1] + "</w>"] for w in dict.fromkeys(words)]
    merges: list[str] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for symbols in words_as_symbols:
            for pair in zip(symbols, symbols[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(f"{best[0]} {best[1]}")
        vocab_list.append(best[0] + best[1])
        words_as_symbols = [_merge_pair(symbols, best) for symbols in words_as_symbols]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def _merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def build_tokenizer(max_length: int = MAX_LENGTH) -> CLIPTokenizer:
    """Builds the tiny tokenizer (no files needed afterwards: `save_pretrained` writes its own)."""
    vocab, merges = build_vocab_and_merges()
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp, "vocab.json"), Path(tmp, "merges.txt")
        vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=max_length,
                                  pad_token="<|endoftext|>")
    return tokenizer
