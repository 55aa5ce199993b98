"""One table of metric specs: name, header, decimals, direction, whether tables print its CI, the
regression gate's floor. Tables, claims, the gate and the README report all read it; none of them
says again which way a metric is better or how it is printed.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    key: str  # the results-row field
    header: str  # column header in the tables
    decimals: int
    direction: str | None = None  # "lower" or "higher" is better; None: descriptive (colour statistics)
    show_ci: bool = False  # the main tables print "value [low, high]"
    gate_floor: float | None = None  # the regression gate's minimum tolerance (None: not gated)
    title: str = ""  # a plot's title

    @property
    def lower_is_better(self) -> bool:
        return self.direction == "lower"


def metric_columns() -> list[dict]:
    """Every registered metric's columns (``bench.metrics.registry``: each metric's decorator), read from the metric
    files' source — tables never import metric code — in table order."""
    from core.registry import decorated_classes

    found = decorated_classes(Path(__file__).parent / "metrics", "register_metric", "bench.metrics")
    ordered = sorted(found.items(), key=lambda kv: (kv[1].get("order", 50), kv[0]))
    return [c for _, d in ordered for c in d.get("columns", ())]


FIELDS = {f.name for f in dataclasses.fields(MetricSpec)}
SPECS: dict[str, MetricSpec] = {s.key: s for s in (
    *(MetricSpec(**{k: v for k, v in c.items() if k in FIELDS}) for c in metric_columns()),
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

# the metric columns of the main table, in order (each metric's columns but those it marks "main": False)
MAIN_COLUMNS = tuple(c["key"] for c in metric_columns() if c.get("main", True))
# the other metrics' columns (distribution, diversity, preference, GenEval): tables/metrics.md, where a run has them
MORE_COLUMNS = tuple(c["key"] for c in metric_columns() if not c.get("main", True) and c["key"] != "brightness")
# of those, what Table A adds after its own columns where a run has them (GenEval's per-task scores)
TABLE_A_MORE = tuple(c["key"] for c in metric_columns() if c.get("table_a"))
# the quality metrics plotted against NFE and latency (the columns a metric marks "plot")
PLOTTED = tuple(c["key"] for c in metric_columns() if c.get("plot"))
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
