"""What a number was made with: the code (git hash), the library versions, and the measurement protocol."""

from __future__ import annotations

import contextlib
import platform
import subprocess
from pathlib import Path

from bench.metrics.bootstrap import BOOTSTRAP, BOOTSTRAP_SEED, CI_LEVEL
from bench.metrics.fid import bootstrap_reference
from bench.protocols import Protocol
from core import io

# the protocol fields that define comparability: two rows are comparable iff their protocol ids are equal
COMPARABLE = ("preset", "prompts", "evaluators", "fid", "clip_score", "accuracy", "bootstrap")

def git_hash() -> str:
    """HEAD of the checkout this code runs from, "-dirty" when tracked files differ; "unknown" outside git."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("flashbench", "torch", "diffusers", "torchmetrics", "open_clip_torch", "numpy", "pandas"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def protocol(prompts: dict, evaluators: dict, reference, teacher: dict, device: str, torchmetrics: str | None,
             num_features: int | None = None, preset: Protocol | None = None) -> dict:
    """Everything that moves a number, stored beside it; ``id`` hashes the fields that define comparability.

    `prompts`: the prompt set's name, content sha256 and count; `evaluators`: ``Evaluators.identity()``;
    `reference`: the FID reference (None when FID is not measured); `teacher`: ``Backbone.identity()``;
    `num_features`: the FID feature width (a warning is recorded when the sample count is below it); `preset`:
    the measurement protocol (``bench.protocols``), whose whole definition is stored and hashed (a warning is
    recorded when the sample count is not its published one).
    """
    ev = evaluators
    warnings = []
    if reference is not None and num_features and prompts["n"] < num_features:
        warnings.append(f"FID over {prompts['n']} samples with {num_features}-d features: the sample covariance is "
                        "singular, so FID is biased upwards; compare FIDs only at equal sample counts")
    preset_warnings = []
    if preset is not None and preset.samples and prompts["n"] != preset.samples:
        preset_warnings.append(f"{prompts['n']} samples, not the {preset.samples} of protocol {preset.name}: its "
                               "figures are not comparable with those published under it")
    prot = {
        "preset": None if preset is None else preset.definition(),
        "preset_warnings": preset_warnings,
        "prompts": prompts,
        "evaluators": ev,
        "fid": None if reference is None else {
            "library": f"torchmetrics {torchmetrics} FrechetInceptionDistance",
            "feature": ev["fid_feature"], "feature_sha256": ev["fid_feature_sha256"], "resize": ev["fid_resize"],
            "reference": reference.identity(), "accumulation": "float64",
            "bootstrap_resamples": BOOTSTRAP, "bootstrap_reference": bootstrap_reference(reference.paired),
            "bootstrap_kernel": "exact Fréchet distance per resample in float64 on the evaluators' device (Gram form "
                                "when both sets have fewer rows than features, else covariances)",
            "warnings": warnings,
        },
        "clip_score": {"model": ev["clip_model"], "sha256": ev["clip_sha256"], "score": ev["clip_score"]},
        "accuracy": None if ev["accuracy_net_sha256"] is None else {"evaluator": "attribute_net",
                                                                     "sha256": ev["accuracy_net_sha256"]},
        "bootstrap": {"resamples": BOOTSTRAP, "level": CI_LEVEL, "seed": BOOTSTRAP_SEED,
                      "interval": "percentile (FID: bias-centred on the point value)"},
        "teacher": teacher,
        "device": device,
        "dtype": {"teacher": teacher.get("dtype", "fp32"), "evaluators": ev["dtype"]},
        "compile": teacher.get("compile"),
    }
    comparable = {k: prot[k] for k in COMPARABLE}
    comparable["prompts"] = {k: prompts[k] for k in ("sha256", "n")}  # by content: not the file's name or encoding
    prot["id"] = io.content_hash(comparable)
    return prot
