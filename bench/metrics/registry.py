"""The metric registry: a metric is one file under ``bench/metrics/``, its class registered by
``@register_metric("name", columns=(...), needs=(...))``.

The decorator's literal arguments are the metric's whole declaration: the name a suite's ``metrics`` lists, the
results-row fields it writes and how tables print them (``columns``: dicts of ``bench.specs.MetricSpec`` fields, read
from the source by ``bench.specs`` so that tables never import metric code), what it needs (``needs``:
``"reference"`` a set of real images to compare with, ``"ground_truth"`` each prompt's objects, ``"groups"`` several
samples of some prompts, made by ``flashbench run`` itself), whether it is measured whatever the suite lists
(``always``), and the reward model it is, if a method may have been trained on it (``reward``: a name a model card's
``trained_on_rewards`` may list; ``bench.metrics.preference.reward_flags``). ``get`` imports a metric's module only
when it is used.
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path

from core.errors import unknown
from core.registry import decorated_classes

_REGISTRY: dict[str, type] = {}
NEEDS = ("reference", "ground_truth", "groups")  # what a metric may need besides the samples and their prompts
TIMING = ("latency",)  # what a suite's metrics may name that the runner times rather than measures on samples


@functools.cache
def declared() -> dict[str, dict]:
    """name -> {"module", "summary", "columns", "needs", "always", "order", "reward"} for every registered metric (read,
    not imported)."""
    out = decorated_classes(Path(__file__).parent, "register_metric", "bench.metrics")
    for d in out.values():
        d.setdefault("needs", ())
        d.setdefault("always", False)
        d.setdefault("columns", ())
        d.setdefault("order", 50)
        d.setdefault("reward", None)
    return dict(sorted(out.items(), key=lambda kv: (kv[1]["order"], kv[0])))


def register_metric(name: str, columns: tuple = (), needs: tuple[str, ...] = (), always: bool = False, order: int = 50,
                    source: str = "", weights: str = "", license: str = "", reward: str | None = None):
    """Class decorator: the metric `name` (its declaration is read from the source: give literals only); `order`
    places its columns in the tables (lower first); `source` (paper and reference code), `weights` (the networks it
    runs, at each scale) and `license` (of those weights) fill the metric table of docs/metrics.md; `reward`: the
    reward model the metric is, as model cards name it (``trained_on_rewards``)."""

    def deco(cls):
        if name not in declared():
            raise RuntimeError(f"metric {name!r} must be registered with @register_metric on a class in bench/metrics/")
        bad = [n for n in needs if n not in NEEDS]
        if bad:
            raise RuntimeError(f"metric {name!r} needs {bad}; a metric may need {NEEDS}")
        cls.name, cls.needs, cls.always, cls.columns, cls.reward = name, tuple(needs), always, tuple(columns), reward
        _REGISTRY[name] = cls
        return cls

    return deco


def names() -> list[str]:
    """Every registered metric's name, sorted."""
    return sorted(declared())


def suite_names() -> tuple[str, ...]:
    """What a suite's ``metrics`` may list: the registered metrics and the runner's timing."""
    return (*names(), *TIMING)


def get(name: str) -> type:
    """The Metric class registered as `name` (its module imported on first use); UserError when unknown."""
    known = declared()
    if name not in known:
        raise unknown("metric", name, {*known, *TIMING})
    if name not in _REGISTRY:
        importlib.import_module(known[name]["module"])
    return _REGISTRY[name]


def needs(metrics: list[str], what: str) -> bool:
    """Whether any metric of `metrics` (a suite's list) needs `what` (one of NEEDS); read, nothing imported."""
    known = declared()
    return any(what in known[m]["needs"] for m in metrics if m in known)


def measured(metrics: list[str]) -> list[type]:
    """The Metric classes a cell measures for a suite's `metrics`: those it lists and those measured always, in
    table order (the order never moves a number: each bootstrap draws its own fixed resamples)."""
    return [get(n) for n, d in declared().items() if n in metrics or d["always"]]
