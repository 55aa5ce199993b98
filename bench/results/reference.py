"""Per-device references of the regression gate, filed in a store under a key.

A run's key is what its numbers depend on beyond the code: the suite, the device class (the GPU
model, or "cpu"), and the torch and diffusers versions recorded in its config.json. A store is a
folder with one reference per key::

    STORE/<suite>--<device>--torch-<version>--diffusers-<version>/
      reference.json    the key, where the reference came from, the tier (a) threshold (SSIM)
      tolerances.json   tier (b): per cell and metric, max(K · seed-to-seed std, floor)
      config.json  results.jsonl  grids/<label>_nfe<NFE>.png    copied from the run

Runs of different keys are never compared (UserError): a reference answers only for its own key.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import shutil
from pathlib import Path

from bench.results import compare
from bench.results.images import grid_path
from bench.rundir import CONFIG_FILE, RESULTS_FILE, load_rows, read_config
from core import io
from core.errors import UserError

REFERENCE = "reference.json"
# Tier (a)'s default threshold: the lowest SSIM a sample may have to the reference's sample. Measured on this
# project's CPU (docs/gpu-ci.md, "Thresholds"); re-measure on each GPU model and set it in reference.json.
IMAGE_THRESHOLD = 0.99
IMAGE_THRESHOLD_SOURCE = ("CPU default (docs/gpu-ci.md): smoke at 1 vs 2 torch threads gave min SSIM 0.999599; "
                          "teacher at 8 vs 50 steps at most 0.979. Re-measure on this device and set images.threshold")


@dataclasses.dataclass(frozen=True)
class Key:
    """What a reference answers for: suite name, device class, torch and diffusers versions."""

    suite: str
    device: str
    torch: str
    diffusers: str

    @property
    def name(self) -> str:
        """The store's folder name, e.g. ``smoke--nvidia-h200--torch-2.5.1--diffusers-0.31.0``."""
        return "--".join((self.suite, self.device, f"torch-{self.torch}", f"diffusers-{self.diffusers}"))


def slug(text: str) -> str:
    """A name as a file-name part: lower case, runs of anything but letters, digits, '.' and '+' as '-'."""
    return re.sub(r"[^a-z0-9.+]+", "-", str(text).lower()).strip("-")


def device_class(config: dict, given: str | None, run: Path) -> str:
    """The device class of a run: `given` (``--device-class``), else the GPU model its config.json records
    (``gpu``), else "cpu" for a CPU run. UserError for an accelerator run with neither, or when they disagree."""
    recorded = config.get("gpu")
    if given is not None and not slug(given):
        raise UserError(f"--device-class {given!r} is empty; give the GPU model (e.g. 'NVIDIA H200') or 'cpu'")
    if given is not None and recorded and slug(given) != slug(recorded):
        raise UserError(f"{run} ran on {recorded!r} but --device-class says {given!r}; drop --device-class or fix it")
    if given is not None:
        return slug(given)
    if recorded:
        return slug(recorded)
    device = str(config.get("device", "cpu"))
    if device == "cpu":
        return "cpu"
    raise UserError(f"{run} ran on {device!r} but its config.json names no GPU model; give --device-class, e.g. "
                    "--device-class \"$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)\"")


def run_key(run: Path, given_device: str | None = None) -> Key:
    """The key of a finished run (UserError when its config.json is missing or records no versions)."""
    config = read_config(run)
    versions = config.get("versions") or {}
    lacking = [p for p in ("torch", "diffusers") if not versions.get(p)]
    if lacking:
        raise UserError(f"{run}/{CONFIG_FILE} records no {' or '.join(lacking)} version under 'versions'; "
                        "give a run written by this flashbench")
    return Key(suite=slug(config["suite"]["name"]), device=device_class(config, given_device, run),
               torch=slug(versions["torch"]), diffusers=slug(versions["diffusers"]))


def load(ref: Path) -> dict:
    """A filed reference's reference.json, checked (UserError naming the bad field)."""
    path = Path(ref) / REFERENCE
    try:
        meta = json.loads(path.read_text())
        threshold = float(meta["images"]["threshold"])
        Key(**meta["key"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a reference written by `flashbench baseline --store` ({e}); file it again") from None
    if not 0.0 < threshold <= 1.0:
        raise UserError(f"{path}: images.threshold must be an SSIM in (0, 1], got {threshold}")
    return meta


def key_of(ref: Path) -> Key:
    return Key(**load(ref)["key"])


def find(store: Path, key: Key) -> Path | None:
    """The reference filed for `key` in `store`, or None."""
    ref = Path(store) / key.name
    return ref if (ref / REFERENCE).exists() else None


def file(run: Path, store: Path, key: Key, image_threshold: float = IMAGE_THRESHOLD) -> Path:
    """File a finished run (>= 2 seeds per cell) as the reference of `key` in `store`; returns its folder.

    Writes tolerances.json, reference.json and copies of config.json, results.jsonl and the cells' grids
    into ``store/<key.name>`` (made whole in a temporary folder, then renamed). UserError, before anything
    is written, when the key already has a reference, the threshold is not in (0, 1], a cell has fewer
    than 2 seeds, or a grid the run should have is missing.
    """
    run, store = Path(run), Path(store)
    target = store / key.name
    if target.exists():
        raise UserError(f"{target} already exists; a reference is replaced only on purpose: delete it first")
    if not 0.0 < image_threshold <= 1.0:
        raise UserError(f"--image-threshold must be an SSIM in (0, 1], got {image_threshold}")
    rows = load_rows(run)
    if not rows:
        raise UserError(f"{run} has no results; give a finished run directory")
    tol = compare.tolerances(rows)
    config = read_config(run)
    cells = compare.ok_cells(rows)
    grids = [grid_path(run, label, nfe) for label, nfe in cells]
    if config["suite"].get("grid", 16) and (missing := [g.name for g in grids if not g.exists()]):
        raise UserError(f"{run}/grids lacks {', '.join(missing)}; file a run whose grids were written (not a shard)")
    meta = {"key": dataclasses.asdict(key), "name": key.name,
            "made_from": {"run": run.name, "git": config.get("git"), "started": config.get("started"),
                          "command": config.get("command")},
            "filed": dt.datetime.now().isoformat(timespec="seconds"),
            "images": {"similarity": "SSIM per 8-bit sample of seed 0 (bench/results/images.py)",
                       "threshold": image_threshold, "threshold_source": IMAGE_THRESHOLD_SOURCE},
            "protocol_ids": tol["protocol_ids"]}
    store.mkdir(parents=True, exist_ok=True)
    tmp = store / f".{key.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "grids").mkdir(parents=True)
    for name in (CONFIG_FILE, RESULTS_FILE):
        shutil.copy2(run / name, tmp / name)
    for g in grids:
        if g.exists():
            shutil.copy2(g, tmp / "grids" / g.name)
    io.write_json(tmp / compare.TOLERANCES, tol)
    io.write_json(tmp / REFERENCE, meta)
    tmp.rename(target)
    return target
