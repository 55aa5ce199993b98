"""Atomic file writes and hashing: a crash never leaves a truncated file that a later run reads."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

from core.errors import WeightsError


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda f: f.write(data))


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def save_tensors(path: Path, tensors: dict, metadata: dict | None = None) -> str:
    """Save a safetensors file atomically; returns its sha256."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                metadata={k: str(v) for k, v in (metadata or {}).items()})
    write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_hash(obj) -> str:
    """A short stable hash of a JSON-able object (configs, protocol fields)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_safetensors_checked(path: Path, card_path: Path) -> tuple[dict, dict]:
    """(tensors, card) of a safetensors file after checking it against the sha256 on its JSON card.

    Raises WeightsError (a UserError: one line, exit 2) when either file is missing or the hash differs.
    """
    from safetensors.torch import load_file

    path, card_path = Path(path), Path(card_path)
    if not path.exists() or not card_path.exists():
        raise WeightsError(f"weights not found: {path.name} (with {card_path.name}); "
                           "reproduce them with the train command named in the README")
    card = json.loads(card_path.read_text())
    digest = sha256_file(path)
    if digest != card["sha256"]:
        raise WeightsError(f"weights {path.name} are corrupt: sha256 {digest[:12]}… does not match "
                           f"{card['sha256'][:12]}… on {card_path.name}")
    return load_file(str(path)), card
