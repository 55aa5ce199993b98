"""Tier (a) of the gate: near-bitwise checks of the samples in a run's grids, against a reference's.

A run writes, per cell, ``grids/<label>_nfe<NFE>.png``: the first ``suite.grid`` samples of the
first seed, each upscaled ×4 nearest-neighbour, in a lossless PNG grid (``bench.runner.save_grid``:
8 per row, padding 2 px, padding value white). The 8-bit samples are therefore recovered exactly
(``grid_samples``), and each is compared with the reference's sample of the same prompt and seed by
SSIM (``ssim``). A cell fails when any sample's SSIM is below the reference's threshold.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from core.errors import UserError

# the layout bench.runner.save_grid writes (tests/test_gate.py decodes a grid that save_grid made)
NROW, PADDING, UPSCALE = 8, 2, 4
# SSIM (Wang et al. 2004) with scikit-image's defaults: 7×7 uniform window, sample covariance, 8-bit range
WINDOW, K1, K2, DATA_RANGE = 7, 0.01, 0.03, 255.0


def grid_path(run: Path, label: str, nfe: int) -> Path:
    return Path(run) / "grids" / f"{label}_nfe{nfe}.png"


def grid_count(config: dict) -> int:
    """How many samples a run's grids hold: the suite's ``grid`` setting, at most the number of prompts."""
    return min(int(config["suite"].get("grid", 16)), int(config["prompts"]["n"]))


def grid_samples(path: Path, k: int) -> np.ndarray:
    """The `k` 8-bit samples [k, H, W, 3] (uint8) of a grid PNG written by ``save_grid``.

    Raises UserError when the PNG's size is not that of `k` tiles of ×4-upscaled samples.
    """
    img = np.asarray(Image.open(path).convert("RGB"))
    if k == 1:  # make_grid returns a single image as it is, without padding
        tiles = [img]
    else:
        cols = min(NROW, k)
        rows = math.ceil(k / cols)
        (th, rh), (tw, rw) = divmod(img.shape[0] - PADDING, rows), divmod(img.shape[1] - PADDING, cols)
        th, tw = th - PADDING, tw - PADDING
        if rh or rw or th <= 0 or tw <= 0:
            raise UserError(f"{path} is {img.shape[1]}×{img.shape[0]} px, not a grid of {k} samples "
                            f"({cols} per row, padding {PADDING}); give a grid written by `flashbench run`")
        corners = [(PADDING + r * (th + PADDING), PADDING + c * (tw + PADDING)) for r, c in (divmod(i, cols) for i in range(k))]
        tiles = [img[y : y + th, x : x + tw] for y, x in corners]
    h, w = tiles[0].shape[:2]
    if h % UPSCALE or w % UPSCALE:
        raise UserError(f"{path}: tiles of {w}×{h} px are not samples upscaled ×{UPSCALE}; "
                        "give a grid written by `flashbench run`")
    return np.stack([t[::UPSCALE, ::UPSCALE] for t in tiles])


def ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Mean SSIM of two 8-bit images [H, W, C] (Wang et al. 2004, Eq. 13), in [-1, 1]; 1 iff equal.

    Uniform ``WINDOW``×``WINDOW`` windows (smaller, odd, for images under 7 px), valid positions
    only, sample covariances, averaged over windows and channels (scikit-image's
    ``structural_similarity`` defaults with ``data_range=255``).
    """
    if x.shape != y.shape:
        raise ValueError(f"ssim of images of shapes {x.shape} and {y.shape}")
    win = min(WINDOW, x.shape[0], x.shape[1])
    win -= 1 - win % 2  # odd
    if win < 2:
        return 1.0 if np.array_equal(x, y) else 0.0
    n = win * win
    c1, c2 = (K1 * DATA_RANGE) ** 2, (K2 * DATA_RANGE) ** 2

    def mean(a):  # [H', W', C]: the mean over each window
        return np.lib.stride_tricks.sliding_window_view(a, (win, win), axis=(0, 1)).mean(axis=(-2, -1))

    x, y = x.astype(np.float64), y.astype(np.float64)
    mx, my = mean(x), mean(y)
    cov = n / (n - 1)
    vx, vy, vxy = cov * (mean(x * x) - mx * mx), cov * (mean(y * y) - my * my), cov * (mean(x * y) - mx * my)
    s = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


def compare_cell(ref_grid: Path, new_grid: Path, counts: tuple[int, int]) -> list[float] | str:
    """Per sample, the SSIM of the new run's sample to the reference's (a list), or why there is none
    ("missing grid", "grid differs: ..."); `counts`: the samples in the reference's and the new grid."""
    if not new_grid.exists():
        return "missing grid"
    a, b = grid_samples(ref_grid, counts[0]), grid_samples(new_grid, counts[1])
    if a.shape != b.shape:
        return f"grid differs: {len(b)} samples of {b.shape[2]}×{b.shape[1]} px, reference {len(a)} of {a.shape[2]}×{a.shape[1]}"
    return [ssim(x, y) for x, y in zip(a, b)]


def tier_a(ref: Path, run: Path, cells: list[tuple[str, int]], counts: tuple[int, int],
           threshold: float) -> tuple[list[str], bool]:
    """(Markdown lines, failed?) of the sample checks of `cells` [(label, NFE)]: a cell fails when a sample's
    SSIM to the reference's is below `threshold`, or its grid is missing or differs in size.
    `counts`: the samples in a grid of the reference and of the run (``grid_count``)."""
    lines = [f"## Tier (a): samples of seed 0, SSIM to the reference's (threshold {threshold:g})", "",
             "| cell | samples | min SSIM | worst sample | verdict |", "|---|---|---|---|---|"]
    failed = False
    for label, nfe in cells:
        cell = f"{label}|nfe={nfe}"
        got = compare_cell(grid_path(ref, label, nfe), grid_path(run, label, nfe), counts)
        if isinstance(got, str):
            lines.append(f"| {cell} | — | — | — | **{got}** |")
            failed = True
            continue
        worst = int(np.argmin(got))
        bad = got[worst] < threshold
        failed |= bad
        which = worst if got[worst] < 1.0 else "—"
        lines.append(f"| {cell} | {len(got)} | {got[worst]:.6f} | {which} | {'**differs**' if bad else 'ok'} |")
    if not cells:
        lines.append("| (the reference has no grids: nothing to check) | | | | |")
    return lines, failed
