"""What the preference-score metrics share: local weights (checked, hashed, loaded once per process), the reference
preprocessing on the 8-bit samples, the reward-model MLP head, and the flag for a method trained on the same reward.

Every preference metric (``hpsv2``, ``pickscore``, ``image_reward``, ``aesthetic``, ``hpsv3``) reads its weights from
local files named in a suite's ``[metrics.<name>]`` table and never downloads. Samples are measured as saved (8-bit
levels, ``bench.metrics.cell.to_8bit``), so turning them into uint8 PIL images is lossless and each metric runs its
authors' own PIL preprocessing (resize, crop, normalise) unchanged.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch
from torch import nn

from bench.metrics.base import CHUNK, Metric, in_fixed_chunks
from bench.metrics.bootstrap import bootstrap_mean
from core.errors import UserError
from core.io import sha256_file

EXTRA = "pip install 'flashbench[preference]'"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's normalisation (open_clip OPENAI_DATASET_MEAN / STD)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


# --- settings and files --------------------------------------------------------------------------------------------


def require_file(metric: str, key: str, value: str, what: str, directory: bool = False) -> Path:
    """The path a metric's setting names; UserError (one line) when it is unset or not there."""
    kind = "directory" if directory else "file"
    if not value:
        raise UserError(f"metric {metric!r} needs its weights: set {key} = the local {what} {kind} in "
                        f"[metrics.{metric}] (flashbench never downloads weights)")
    path = Path(value).expanduser()
    if not (path.is_dir() if directory else path.is_file()):
        raise UserError(f"metric {metric!r}: {key} = {value!r} is not a {kind}; give the local {what} {kind}")
    return path


def require_module(metric: str, module: str) -> None:
    """UserError (one line) when an optional dependency of a metric is not installed, naming the pip extra."""
    if importlib.util.find_spec(module) is None:
        raise UserError(f"metric {metric!r} needs the Python package {module!r}, which is not installed: {EXTRA}")


@functools.cache
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def weights_sha256(path: str | Path) -> str:
    """sha256 of a weights file, or of a directory's files (each file's name and sha256, sorted); cached per process
    by path, size and modification time."""
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return _sha256(str(p.resolve()), st.st_size, st.st_mtime_ns)
    import hashlib

    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file()):
        h.update(f"{f.relative_to(p).as_posix()}\0{weights_sha256(f)}\n".encode())
    return h.hexdigest()


def load_state(path: Path, metric: str) -> dict:
    """A pickled state dict (``.pt`` / ``.pth``) read with ``torch.load(weights_only=True)`` (no code runs); the HPS
    checkpoint's {"state_dict": ...} wrapper is unwrapped. UserError when it is not a tensor state dict."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch raises many types for a bad pickle)
        raise UserError(f"metric {metric!r}: {path.name} is not a tensor state dict that torch.load(weights_only=True) "
                        f"reads ({str(e).splitlines()[0][:160]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"metric {metric!r}: {path.name} does not hold a flat tensor state dict")
    return state


# --- preprocessing ---------------------------------------------------------------------------------------------------


def to_pil(images: torch.Tensor) -> list:
    """Images float32 [n, 3, H, W] in [0, 1] on 8-bit levels as uint8 RGB PIL images (lossless for saved samples)."""
    from PIL import Image

    u8 = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in u8]


def pixels(images: torch.Tensor, transform, device) -> torch.Tensor:
    """The metric's own PIL transform (image -> float tensor [3, S, S]) of every image, stacked on `device`."""
    return torch.stack([transform(im) for im in to_pil(images)]).to(device)


# --- the reward head -------------------------------------------------------------------------------------------------


class RewardMLP(nn.Module):
    """The score head of ImageReward and of the LAION aesthetic predictor v2: Linear(d, 1024), Dropout(0.2),
    Linear(1024, 128), Dropout(0.2), Linear(128, 64), Dropout(0.1), Linear(64, 16), Linear(16, 1), with no
    nonlinearity (both repositories ship the ReLUs commented out); state-dict keys ``layers.{0,2,4,6,7}``."""

    def __init__(self, d: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(d, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    @classmethod
    def from_state(cls, state: dict, metric: str, prefix: str = "") -> RewardMLP:
        """The head from a state dict's ``{prefix}layers.*`` keys (strict); UserError when they do not fit."""
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix + "layers.")}
        if "layers.0.weight" not in own:
            raise UserError(f"metric {metric!r}: the weights have no {prefix}layers.0.weight (the reward MLP head)")
        head = cls(own["layers.0.weight"].shape[1])
        try:
            head.load_state_dict(own, strict=True)
        except RuntimeError as e:
            raise UserError(f"metric {metric!r}: the reward MLP head does not fit ({str(e).splitlines()[0][:160]})") \
                from None
        return head.eval()


# --- a method trained on the reward it is measured with -------------------------------------------------------------


def reward_flags(settings: dict, metrics: list[str]) -> dict:
    """``<metric>_reward_trained`` for every metric of a suite's `metrics` that declares a ``reward``: whether the
    row's method was trained on that reward (its model card's ``trained_on_rewards``; a method without a card: False).

    `settings`: the row's method settings (``Method.settings()``; a published checkpoint's carries its ``recipe``).
    Read from the declarations and the cards; no metric code is imported.
    """
    from bench.metrics import registry
    from methods.pretrained import trained_on_rewards

    declared = registry.declared()
    trained = set(trained_on_rewards(settings.get("recipe") or ""))
    return {f"{m}_reward_trained": declared[m]["reward"] in trained
            for m in metrics if m in declared and declared[m]["reward"]}


class PreferenceScore(Metric):
    """A preference model's score per image, averaged with a 95 % bootstrap CI under the metric's name. A subclass
    sets ``transform`` (its authors' PIL preprocessing) in ``setup`` and defines ``score(x, texts)`` (float [n] of
    preprocessed images x [n, 3, S, S] and their prompts; ``score(x)`` where ``uses_text`` is False)."""

    width = 1
    uses_text = True

    @torch.no_grad()
    def per_sample(self, images, prompts):
        x = pixels(images, self.transform, self.evaluators.device)
        texts = ([p.text for p in prompts],) if self.uses_text else ()
        return in_fixed_chunks(self.score, len(prompts), x, *texts, chunk=CHUNK).double().view(-1, 1)

    def compute(self, values):
        m, lo, hi = bootstrap_mean(values[:, 0].numpy())
        return {self.name: m, f"{self.name}_ci_low": lo, f"{self.name}_ci_high": hi}
