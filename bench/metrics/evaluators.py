"""The one interface of the frozen evaluator networks, embedded (``bench.shapes.evaluators``) and real
scale (``bench.real``). No method may train against these: nothing under methods/ imports them."""

from __future__ import annotations

import abc
import contextlib
from pathlib import Path
from typing import ClassVar

import torch

from bench.metrics.base import CHUNK, in_fixed_chunks
from bench.metrics.fid import Reference

# every evaluator's identity() has exactly these fields; they go into each result's protocol
IDENTITY_KEYS = ("kind", "fid_feature", "fid_feature_sha256", "fid_resize", "clip_model", "clip_sha256",
                 "clip_score", "accuracy_net_sha256", "dtype")


class Evaluators(abc.ABC):
    """FID features, CLIP score, compositional checks (where ground truth exists) and the FID reference.

    Images are float32 [n, 3, H, W] in [0, 1] on ``device``. Subclasses implement the ``_`` methods;
    the public ones run them in fixed-size chunks, so a sample's values never depend on its batch.
    """

    kind: ClassVar[str]
    attributes: tuple[str, ...] = ()  # compositional check types ("color", "shape", ...); () when none
    num_features: int
    device: torch.device
    dtype: torch.dtype = torch.float32  # the networks run under autocast to this dtype when it is lower

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def fid_features(self, images: torch.Tensor) -> torch.Tensor:
        """FID features float32 [n, num_features]."""
        with self._autocast():
            return in_fixed_chunks(self._fid_features, len(images), images, chunk=CHUNK).float()

    def feature_spaces(self) -> dict[str, dict]:
        """Every feature space these evaluators embed images in: name -> {"width", "network", "sha256"}.

        ``fid`` is the FID network's (where there is one: ``fid_features``); ``clip`` the CLIP image tower's
        (L2-normalised embeddings); others (``dinov2``) where the evaluators were given their weights. Distribution
        metrics (KID, CMMD, FD, precision/recall) name the space they are computed in; the reference holds every space.
        """
        return {"fid": {"width": self.num_features, "network": self._identity()["fid_feature"],
                        "sha256": self._identity()["fid_feature_sha256"]}} if self.num_features else {}

    def features(self, space: str, images: torch.Tensor) -> torch.Tensor:
        """Features float32 [n, width] of images float32 [n, 3, H, W] in [0, 1] in one of ``feature_spaces()``
        (fixed-size chunks: a sample's features do not depend on its batch). KeyError for a space not there."""
        if space == "fid":
            return self.fid_features(images)
        if space not in self.feature_spaces():
            raise KeyError(f"{type(self).__name__} has no feature space {space!r}; it has {sorted(self.feature_spaces())}")
        with self._autocast():
            return in_fixed_chunks(lambda x: self._features(space, x), len(images), images, chunk=CHUNK).float()

    def all_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """{space: features [n, width]} in every feature space (what a reference stores)."""
        return {space: self.features(space, images) for space in self.feature_spaces()}

    def _features(self, space: str, images: torch.Tensor) -> torch.Tensor:
        """Features of one chunk in a space other than ``fid`` (subclasses that have one)."""
        raise KeyError(space)

    def clip_score(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """CLIP score 100·max(cos, 0) per image, float32 [n] in [0, 100]."""
        with self._autocast():
            return in_fixed_chunks(self._clip_score, len(images), images, texts, chunk=CHUNK).float()

    def clip_truncated(self, texts: list[str]) -> list[int]:
        """Indices of the texts longer than the CLIP scorer's context (scored on their cut)."""
        return []

    def attribute_checks(self, images: torch.Tensor, prompts: list) -> dict | None:
        """Per image, float64 arrays [n]: ``<type>_correct``, ``<type>_total`` for each of ``attributes``,
        and ``whole`` (1 when every check holds). None when there is no ground-truth evaluator."""
        return None

    @abc.abstractmethod
    def _fid_features(self, images: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def _clip_score(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor: ...

    @abc.abstractmethod
    def reference(self, prompts: list, cache_dir: Path | None) -> Reference:
        """The FID reference for these prompts (cached under cache_dir by content hash). Never changes identity()."""

    def real_variants(self, prompt, k: int) -> torch.Tensor | None:
        """k real images float32 [k, 3, H, W] in [0, 1] of one prompt (the diversity metric's real spread), or None
        where the world cannot make several real images of a caption."""
        return None

    def floor(self, prompts: list, reference: Reference, metrics: list[str] | None = None,
              settings: dict | None = None) -> dict | None:
        """Every metric (a suite's `metrics` and [metrics] `settings`; default FID) of other real images of the same
        prompts against the reference (the real-vs-real floor), or None where the world cannot make them."""
        return None

    @abc.abstractmethod
    def _identity(self) -> dict: ...

    def identity(self) -> dict:
        """What identifies these evaluators (IDENTITY_KEYS, values str or None); fixed at load time."""
        ident = self._identity()
        if tuple(sorted(ident)) != tuple(sorted(IDENTITY_KEYS)):
            raise RuntimeError(f"{type(self).__name__}.identity() must have exactly {IDENTITY_KEYS}, got {sorted(ident)}")
        return ident
