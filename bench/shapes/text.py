"""A word-level tokenizer over the shapes world's grammar (used by the embedded teacher and evaluators)."""

from __future__ import annotations

import re

import torch

from bench.shapes import world

GRAMMAR_WORDS = (
    ("a", "an", "and", "at", "the", "in", "top", "bottom", "left", "right", "center")
    + world.SIZES
    + world.COLOR_NAMES
    + world.SHAPES
)


class WordTokenizer:
    """Lower-cased words -> ids; 0 pads, 1 is unknown; optional end token (the largest id).

    The end token exists for open_clip's text tower, which pools at the argmax token id.
    """

    def __init__(self, words: tuple[str, ...] = GRAMMAR_WORDS, max_tokens: int = 20, eot: bool = False):
        self.vocab = {w: i for i, w in enumerate(("<pad>", "<unk>") + tuple(words))}
        self.eot_id = len(self.vocab) if eot else None
        self.max_tokens = max_tokens

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + (self.eot_id is not None)

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, list[bool]]:
        """ids [B, max_tokens] and whether each text was truncated to fit."""
        room = self.max_tokens - (self.eot_id is not None)
        ids = torch.zeros(len(texts), self.max_tokens, dtype=torch.long)
        truncated = []
        for i, text in enumerate(texts):
            words = re.findall(r"[a-z]+", text.lower())
            truncated.append(len(words) > room)
            toks = [self.vocab.get(w, 1) for w in words[:room]]
            if self.eot_id is not None:
                toks.append(self.eot_id)
            ids[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
        return ids, truncated
