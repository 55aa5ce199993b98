"""One table of metric specs: name, header, decimals, direction, whether tables print its CI, the
regression gate's floor. Tables, claims, the gate and the README report all read it; none of them
says again which way a metric is better or how it is printed.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    key: str  # the results-row field
    header: str  # column header in the tables
    decimals: int
    direction: str | None  # "lower" or "higher" is better; None: descriptive (colour statistics)
    show_ci: bool = False  # the main tables print "value [low, high]"
    gate_floor: float | None = None  # the regression gate's minimum tolerance (None: not gated)
    title: str = ""  # a plot's title

    @property
    def lower_is_better(self) -> bool:
        return self.direction == "lower"


SPECS: dict[str, MetricSpec] = {s.key: s for s in (
    MetricSpec("fid", "FID ↓", 2, "lower", True, 0.05, "FID ↓"),
    MetricSpec("clip_score", "CLIP ↑", 2, "higher", True, 0.25, "CLIP score ↑"),
    MetricSpec("accuracy", "Acc ↑", 3, "higher", True, 0.01, "compositional accuracy ↑"),
    MetricSpec("acc_color", "colour", 3, "higher"),
    MetricSpec("acc_shape", "shape", 3, "higher"),
    MetricSpec("acc_size", "size", 3, "higher"),
    MetricSpec("acc_position", "position", 3, "higher"),
    MetricSpec("acc_count", "count", 3, "higher"),
    MetricSpec("saturation", "sat.", 3, None),
    MetricSpec("saturation_lowpass", "sat. 3×3", 3, None),
    MetricSpec("contrast", "contrast", 3, None),
    MetricSpec("brightness", "brightness", 3, None),
    MetricSpec("latency_ms", "latency ms (b=1)", 1, "lower"),
    MetricSpec("throughput", "img/s", 1, "higher"),
    MetricSpec("latency_text_ms", "text ms", 1, "lower"),
    MetricSpec("latency_denoise_ms", "denoise ms", 1, "lower"),
    MetricSpec("latency_step_ms", "ms/step", 2, "lower"),
    MetricSpec("latency_decode_ms", "decode ms", 1, "lower"),
    MetricSpec("latency_eager_ms", "eager ms", 1, "lower"),
    MetricSpec("peak_accelerator_mb", "peak GPU MB", 0, "lower"),
    MetricSpec("peak_accelerator_sample_mb", "peak GPU MB (sampling)", 0, "lower"),
    MetricSpec("peak_rss_mb", "peak RSS MB", 0, "lower"),
)}

# the latency table's columns (per image at batch 1, by stage; throughput at the suite's batch; memory)
LATENCY_COLUMNS = ("latency_ms", "latency_text_ms", "latency_denoise_ms", "latency_step_ms", "latency_decode_ms",
                   "latency_eager_ms", "throughput", "peak_accelerator_mb", "peak_accelerator_sample_mb", "peak_rss_mb")

# the metric columns of the main table, in order
MAIN_COLUMNS = ("fid", "clip_score", "accuracy", "acc_color", "acc_shape", "acc_size", "acc_position", "acc_count",
                "saturation", "saturation_lowpass", "contrast")
# the quality metrics plotted against NFE and latency
PLOTTED = ("fid", "clip_score", "accuracy")
# the metrics the regression gate checks
GATED = tuple(k for k, s in SPECS.items() if s.gate_floor is not None)


def missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def fmt(row: dict, key: str, ci: bool = True, decimals: int | None = None) -> str:
    """A metric of a row as text: "4.05 [3.28, 4.94]" (with its CI when asked and stored), "4.05 ± 0.31"
    (mean ± sd over training seeds, for a row aggregated over several), "4.05", or "—"."""
    d = SPECS[key].decimals if decimals is None else decimals
    v = row.get(key)
    if missing(v):
        return "—"
    sd = row.get(f"{key}_seed_sd")
    if ci and not missing(sd):
        return f"{v:.{d}f} ± {sd:.{d}f}"
    lo, hi = row.get(f"{key}_ci_low"), row.get(f"{key}_ci_high")
    if ci and not missing(lo) and not missing(hi):
        return f"{v:.{d}f} [{lo:.{d}f}, {hi:.{d}f}]"
    return f"{v:.{d}f}"
