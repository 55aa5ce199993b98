"""Which source a number depends on, hashed by content: references record it, the README checks it."""

from __future__ import annotations

import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the source a reference result's numbers are made by: the methods (training, sampling, backbones), the
# embedded world (renderer, teacher, evaluators, shipped weights) and the metrics, from the 8-bit samples on.
# The runner only routes prompts and seeds (each sample's noise is a function of its prompt id and seed);
# suite files are recorded whole in each run's config.json.
NUMERIC_SOURCES = ("methods", "bench/shapes", "bench/metrics")
# files under NUMERIC_SOURCES that only real-scale runs import (diffusers directories, published checkpoints,
# image-folder training data): no embedded reference executes them, so they move none of its numbers
# (tests/test_readme.py checks that an embedded run's imports never reach them)
REAL_SCALE_ONLY = ("methods/backbones", "methods/pretrained.py", "methods/cards", "methods/training_data.py")


def real_scale_only(rel: str) -> bool:
    """Whether a file (path relative to the project root) is in REAL_SCALE_ONLY (a file, or under a folder of it)."""
    return any(rel == x or rel.startswith(x + "/") for x in REAL_SCALE_ONLY)


def source_files(root: Path = ROOT) -> list[Path]:
    """The files of NUMERIC_SOURCES (Python, weights and their cards) less REAL_SCALE_ONLY, sorted; caches excluded."""
    out = []
    for d in NUMERIC_SOURCES:
        path = root / d
        files = [path] if path.is_file() else path.rglob("*")
        out += [p for p in files if p.is_file() and "__pycache__" not in p.parts
                and p.suffix in (".py", ".safetensors", ".json")
                and not real_scale_only(p.relative_to(root).as_posix())]
    return sorted(out)


def source_hash(root: Path = ROOT) -> str:
    """sha256 (16 hex) of NUMERIC_SOURCES by content: (relative path, file sha256) of every file, in order."""
    h = hashlib.sha256()
    for p in source_files(root):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]
