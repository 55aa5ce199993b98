"""Stand-ins made offline for real-scale pipelines: tokenizers built from a generated vocabulary (no downloads).

Random-weight networks of real size or tiny size need tokenizers whose ids fit their embeddings; these give
character-level ones with the special tokens the pipelines expect. The tests' tiny pipelines and the GPU check's
real-sized random pipelines (``bench.gpucheck``) both use them.
"""

from __future__ import annotations

import string
from pathlib import Path

CHARS = string.ascii_lowercase + string.digits + ",.'-"


def clip_tokenizer(folder: Path, model_max_length: int = 77):
    """A character-level ``CLIPTokenizer`` (<|startoftext|> = 0, <|endoftext|> = 1) saved to `folder`; returns it."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)
    tok.save_pretrained(folder)
    return tok


def t5_tokenizer(folder: Path, model_max_length: int = 512):
    """A character-level T5 tokenizer (Unigram; <pad> = 0, </s> = 1, <unk> = 2) saved to `folder`, as
    ``T5TokenizerFast``; returns it (loaded back, as pipelines load it)."""
    from tokenizers import Tokenizer, models
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in CHARS]
    pieces += [("▁" + c, -2.5) for c in string.ascii_lowercase]
    tok = T5TokenizerFast(tokenizer_object=Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False)),
                          extra_ids=0, model_max_length=model_max_length)
    tok.save_pretrained(folder)
    return T5TokenizerFast.from_pretrained(folder, local_files_only=True)
