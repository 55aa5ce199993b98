"""Suites: TOML files naming methods x budgets x metrics x sample count x seeds.

    name = "default"
    prompts = "shapes-eval"      # a shipped set or a prompt file
    samples = 500                # the first N prompts of the set (a protocol's own count when it has one)
    seeds = [0]
    batch_size = 250
    metrics = ["fid", "clip_score", "accuracy", "latency"]
    train_seeds = [0, 1, 2]      # optional: every trained method once per training seed (its `seed`)

    [backbone]                   # optional: the embedded teacher (kind = "shapes"; teacher = "vp", the
    kind = "shapes"              # default, or "flow") or a diffusers directory (kind = "diffusers", path = ...,
    teacher = "flow"             # and the settings of its family: methods.backbones)

    [evaluators]                 # optional: the embedded evaluators (kind = "shapes", protocol "shapes-renders")
    kind = "shapes"              # or Inception + open_clip (kind = "real") under a protocol such as
                                 # "coco2014-30k" (bench/protocols.py, docs/protocols.md)

    [curves]                     # optional: learning curves (bench/results/curves.py): every trained entry once
    updates = [50, 100, 200]     # per update count, each training continuing the cached shorter one; validation
                                 # prompts only

    [[methods]]
    name = "teacher"             # a registered method
    label = "teacher-ddim"       # unique row label (defaults to the name)
    steps = [1, 2, 4]            # or nfe = [2, 4, 8]
    settings = { solver = "ddim" }

Everything is validated before anything is loaded or written; errors are one-line UserErrors. Each
entry's settings become the method's Config once, here, and its budgets are resolved once (steps and
NFE, ``methods.base.Budget``); the runner uses both as they are. A setting an entry leaves unset takes the
backbone's convention (a diffusers family's pipeline defaults, e.g. SDXL's guidance_scale = 5; the flow shapes
teacher's studied guidance), else the method's own default.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from pathlib import Path

from bench import protocols
from bench.metrics import registry as metric_registry
from bench.shapes import TEACHER_CONVENTIONS, TEACHER_KINDS
from core.errors import UserError, did_you_mean, unknown
from methods import registry
from methods.base import Budget

SUITES_DIR = Path(__file__).parent / "suites"
# a suite's metrics when it lists none: everything the embedded evaluators measure; at real scale FID (where the
# protocol has a reference), CLIP score and latency. Any metric registered in bench/metrics may be listed.
DEFAULT_METRICS = {"shapes": ("fid", "clip_score", "accuracy", "latency"), "real": ("fid", "clip_score", "latency")}
TOP_KEYS = {"name", "description", "prompts", "samples", "seeds", "train_seeds", "batch_size", "metrics", "methods", "grid",
            "latency", "train", "scale", "backbone", "evaluators", "curves"}
BACKBONE_KINDS = ("shapes", "diffusers")  # diffusers: a family of methods.backbones, with its own settings
EVALUATOR_KEYS = {"shapes": {"protocol"}, "real": {"inception_dir", "clip_model", "clip_pretrained", "dinov2", "dtype",
                                                  "protocol", *protocols.INPUT_KEYS}}
EVALUATOR_TYPES = {"reference_steps": int, "reference_seed": int}  # [evaluators] settings that are not strings
DTYPE_NAMES = ("fp32", "bf16", "fp16")
ENTRY_KEYS = {"name", "label", "variant", "steps", "nfe", "settings"}
# a row label names files (grids, sample folders, shard values) and table rows: letters, digits, space and . _ + = , ( ) -,
# starting with a letter or digit, at most 80 characters (no path separator, no leading dot, no Markdown table bar)
LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._+=,()-]{0,79}")
LATENCY_KEYS = {"warmup", "repeats", "throughput_batch"}
CURVES_KEYS = {"updates"}


@dataclasses.dataclass
class Entry:
    """One [[methods]] entry: a registered method, its row label, settings and budgets."""

    name: str
    label: str
    settings: dict  # as given, with the suite's shared [train] settings merged in
    budgets: list[Budget]
    variant: str | None = None
    config: object = dataclasses.field(default=None, compare=False, repr=False)  # the method's Config
    train_seed: int | None = None  # set when the suite runs the entry once per training seed
    curve: str | None = None  # a learning curve's point: the label of the curve ([curves]); its updates in settings

    def to_dict(self) -> dict:
        return {"name": self.name, "label": self.label, "settings": self.settings, "variant": self.variant,
                "steps": [b.steps for b in self.budgets], "nfe": [b.nfe for b in self.budgets],
                "train_seed": self.train_seed, "curve": self.curve}


@dataclasses.dataclass
class Suite:
    name: str
    description: str
    prompts: str
    samples: int
    seeds: list[int]  # sampling seeds
    batch_size: int
    metrics: list[str]
    entries: list[Entry]
    grid: int = 16
    latency: dict = dataclasses.field(default_factory=lambda: {"warmup": 2, "repeats": 7, "throughput_batch": 64})
    train: dict = dataclasses.field(default_factory=dict)  # shared training settings (e.g. student_updates)
    scale: float = 1.0
    source: str = ""
    backbone: dict = dataclasses.field(default_factory=lambda: {"kind": "shapes"})
    evaluators: dict = dataclasses.field(default_factory=lambda: {"kind": "shapes"})
    metric_settings: dict = dataclasses.field(default_factory=dict)  # [metrics.<name>] settings of the metrics listed
    curves: dict | None = None  # {"updates": [...]}: the suite measures learning curves (bench/results/curves.py)

    def to_dict(self) -> dict:
        """The resolved suite (stored in a run's config.json; ``from_dict`` reads it back for --resume)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "entries"}
        return {**d, "entries": [e.to_dict() for e in self.entries]}


def check_device_name(device: str) -> str:
    """`device` when it names cpu or cuda[:N] (whether CUDA is there is checked when the run loads); UserError
    otherwise. Checked before anything heavy is imported."""
    if device not in ("cpu", "cuda") and not re.fullmatch(r"cuda:\d+", str(device)):
        raise UserError(f"--device must be cpu or cuda[:N], got {device!r}")
    return device


def available() -> dict[str, Path]:
    return {p.stem: p for p in sorted(SUITES_DIR.glob("*.toml"))}


def _int_list(value, what: str, where: str, allow_zero: bool = False) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise UserError(f"{where}: {what} must be a non-empty list of integers, got {value!r}")
    low = 0 if allow_zero else 1
    bad = [v for v in value if v < low]
    if bad:
        raise UserError(f"{where}: {what} must be >= {low}, got {bad[0]}")
    return list(value)


def _positive_int(value, what: str, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"{where}: {what} must be a positive integer, got {value!r}")
    return value


def load(spec: str | None) -> Suite:
    """A suite by name (bench/suites/NAME.toml) or path; None is the default suite."""
    spec = spec or "default"
    suites = available()
    path = suites.get(spec)
    if path is None:
        p = Path(spec)
        if p.suffix == ".toml" and p.is_file():
            path = p
        elif p.suffix == ".toml":
            raise UserError(f"suite file not found: {spec}")
        else:
            raise unknown("suite", spec, suites)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path.name}: invalid TOML ({e}); see bench/suites/default.toml for the format") from None
    except UnicodeDecodeError:
        raise UserError(f"{path.name}: not valid UTF-8 text") from None
    return parse(raw, path.name)


def parse(raw: dict, where: str = "suite") -> Suite:
    for key in raw:
        if key not in TOP_KEYS:
            raise unknown(f"key in {where}", key, TOP_KEYS)
    name = raw.get("name", Path(where).stem)
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
        raise UserError(f"{where}: name must be letters, digits, '-' or '_', got {name!r}")
    prompts = raw.get("prompts", "shapes-eval")
    if not isinstance(prompts, str):
        raise UserError(f"{where}: prompts must be a set name or a file path, got {prompts!r}")
    evaluators = _component(raw.get("evaluators", {"kind": "shapes"}), "evaluators", EVALUATOR_KEYS, where)
    preset = protocols.resolve(evaluators)
    # without a metrics list: everything the evaluators can measure (no attribute evaluator at real scale, no FID
    # without a reference)
    default = [m for m in DEFAULT_METRICS[evaluators["kind"]]
               if preset.measures_fid or not metric_registry.needs([m], "reference")]
    metrics, metric_settings = metrics_spec(raw.get("metrics", default), where)
    spaced = [m for m in metrics if m in metric_registry.names() and getattr(
        metric_registry.get(m).make_config(metric_settings.get(m, {}), m), "space", None) == "dinov2"]
    if spaced and evaluators["kind"] == "real" and "dinov2" not in evaluators:
        raise UserError(f"{where}: {spaced[0]} is computed in the DINOv2 feature space, and [evaluators] names no DINOv2 "
                        "model: set dinov2 = a transformers Dinov2Model directory (facebook/dinov2-large)")
    latency = {"warmup": 2, "repeats": 7, "throughput_batch": 64}
    lat_raw = raw.get("latency", {})
    if not isinstance(lat_raw, dict):
        raise UserError(f"{where}: [latency] must be a table with {sorted(LATENCY_KEYS)}")
    for k, v in lat_raw.items():
        if k not in LATENCY_KEYS:
            raise unknown(f"latency key in {where}", k, LATENCY_KEYS)
        latency[k] = _positive_int(v, f"latency.{k}", where) if k != "warmup" else _int_list(v, k, where, True)[0]
    train = raw.get("train", {})
    if not isinstance(train, dict):
        raise UserError(f"{where}: [train] must be a table of training settings shared by every method")
    settable = {f.name for n in registry.names() for f in dataclasses.fields(registry.get(n).Config)}
    for k in train:
        if k not in settable:
            raise UserError(f"{where}: [train] {k!r} is no method's setting{did_you_mean(k, settable)} (the settings each "
                            "method takes: flashbench list, and its Config in methods/)")
    scale = raw.get("scale", 1.0)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale <= 0:
        raise UserError(f"{where}: scale must be a positive finite number, got {scale!r}")
    backbone, conventions = backbone_spec(raw.get("backbone", {"kind": "shapes"}), where)
    entries_raw = raw.get("methods")
    if not isinstance(entries_raw, list) or not entries_raw:
        raise UserError(f"{where}: needs at least one [[methods]] entry")
    entries = [_entry(e, i, where, train, conventions) for i, e in enumerate(entries_raw)]
    curves = None
    if "curves" in raw:
        curves = _curves(raw["curves"], raw, where)
        entries = _per_curve_point(entries, curves["updates"], where, conventions)
    labels = [e.label for e in entries]
    if "train_seeds" in raw:
        entries = _per_training_seed(entries, _int_list(raw["train_seeds"], "train_seeds", where, allow_zero=True), where,
                                     conventions)
    dup = {x for x in labels if labels.count(x) > 1}
    if dup:
        raise UserError(f"{where}: method labels must be unique; {sorted(dup)[0]!r} appears twice (set label = ...)")
    compared = [m for m in metrics if metric_registry.needs([m], "reference")]
    preset = protocols.check_suite(evaluators, raw.get("prompts"), compared, labels, where)
    if preset.prompts == "coco-captions":  # the prompts are the annotations' captions, drawn by the protocol
        prompts = evaluators["annotations"]
    if preset.reference == "teacher-samples":  # the entry as resolved here: --methods may leave it out of the cells
        ref = next(e for e in entries if e.label == evaluators["reference_method"])
        evaluators["reference_entry"] = {"name": ref.name, "label": ref.label, "settings": ref.settings}
        registry.get(ref.name).budget(ref.config, steps=evaluators["reference_steps"])  # a budget it can sample
    return Suite(
        name=name,
        description=str(raw.get("description", "")),
        prompts=prompts,
        samples=_positive_int(raw.get("samples", preset.samples or 500), "samples", where),
        seeds=_int_list(raw.get("seeds", [0]), "seeds", where, allow_zero=True),
        batch_size=_positive_int(raw.get("batch_size", 250), "batch_size", where),
        metrics=list(metrics),
        metric_settings=metric_settings,
        entries=entries,
        grid=_positive_int(raw.get("grid", 16), "grid", where),
        latency=latency,
        train=dict(train),
        scale=float(scale),
        source=where,
        backbone=backbone,
        evaluators=evaluators,
        curves=curves,
    )


def metrics_spec(value, where: str) -> tuple[list[str], dict[str, dict]]:
    """(metric names, their settings) of a suite's ``metrics``: a list of names, or a ``[metrics]`` table of
    ``name = { settings }`` (``[metrics.kid] subset_size = 50``). Names from the registry (or "latency"); every
    metric's settings checked against its Config now."""
    known = metric_registry.suite_names()
    if isinstance(value, dict):
        names, settings = list(value), {}
        for name, s in value.items():
            if not isinstance(s, dict):
                raise UserError(f"{where}: [metrics] {name} must be a table of its settings ({{}} for none), got {s!r}")
            if name in known and name not in metric_registry.TIMING:
                metric_registry.get(name).make_config(s, f"{where} [metrics.{name}]")
                if s:
                    settings[name] = dict(s)
            elif s:
                raise UserError(f"{where}: [metrics] {name} takes no settings here (latency's are in [latency])")
    elif isinstance(value, list) and all(isinstance(m, str) for m in value):
        names, settings = list(value), {}
    else:
        raise UserError(f"{where}: metrics must be a list of names from {', '.join(known)}, or a [metrics] table")
    for m in names:
        if m not in known:
            raise unknown(f"metric in {where}", m, known)
    return names, settings


def _curves(value, raw: dict, where: str) -> dict:
    """The [curves] table checked: update counts (increasing, distinct), on validation prompts, and no fixed
    student_updates anywhere else (each point sets its own)."""
    if not isinstance(value, dict):
        raise UserError(f"{where}: [curves] must be a table with updates = [...]")
    for k in value:
        if k not in CURVES_KEYS:
            raise unknown(f"key in [curves] of {where}", k, CURVES_KEYS)
    if "updates" not in value:
        raise UserError(f"{where}: [curves] needs updates = [...] (the update counts of the curve's points)")
    updates = _int_list(value["updates"], "[curves] updates", where)
    if len(set(updates)) != len(updates):
        raise UserError(f"{where}: [curves] updates must not repeat a count, got {updates}")
    if raw.get("prompts", "shapes-eval") == "shapes-eval":
        raise UserError(f"{where}: learning curves pick each method's plateau: measure them on validation prompts "
                        "(prompts = \"shapes-val\"), never the evaluation prompts")
    if "student_updates" in raw.get("train", {}):
        raise UserError(f"{where}: [curves] sets each point's student_updates; remove it from [train]")
    return {"updates": sorted(updates)}


def _per_curve_point(entries: list[Entry], updates: list[int], where: str, conventions: dict[str, dict]) -> list[Entry]:
    """Each entry of a trained method once per update count, in increasing order (label "LABEL u=N"), so that each
    training continues the previous one (``Context.keep_state``); untrained entries (the teacher) once."""
    out = []
    for e in entries:
        cls = registry.get(e.name)
        if "student_updates" not in {f.name for f in dataclasses.fields(cls.Config)}:
            out.append(e)
            continue
        if "student_updates" in e.settings:
            raise UserError(f"{where}: {e.label!r} sets student_updates and the suite has [curves]; the curve sets it")
        for u in updates:
            settings = {**e.settings, "student_updates": u}
            config = cls.make_config(conventional(e.name, settings, conventions), e.label)
            label = f"{e.label} u={u}"
            if not LABEL.fullmatch(label):
                raise UserError(f"{where}: label {e.label!r} is too long for a curve's point labels ({label!r})")
            out.append(dataclasses.replace(e, label=label, settings=settings, config=config, curve=e.label,
                                           variant=e.variant or e.label))
    return out


def _component(value, what: str, kinds: dict[str, set], where: str) -> dict:
    if not isinstance(value, dict):
        raise UserError(f"{where}: [{what}] must be a table with kind = one of {sorted(kinds)}")
    kind = value.get("kind", "shapes")
    if kind not in kinds:
        raise unknown(f"{what} kind in {where}", kind, kinds)
    for k, v in value.items():
        if k != "kind" and k not in kinds[kind]:
            raise unknown(f"key in [{what}] ({kind}) of {where}", k, kinds[kind] or {"kind"})
        want = EVALUATOR_TYPES.get(k, str)
        if not isinstance(v, want) or (want is int and isinstance(v, bool)):
            raise UserError(f"{where}: [{what}] {k} must be a {want.__name__}, got {v!r}")
        if k == "dtype" and v not in DTYPE_NAMES:
            raise UserError(f"{where}: [{what}] dtype must be one of {DTYPE_NAMES}, got {v!r}")
    return {"kind": kind, **{k: v for k, v in value.items() if k != "kind"}}


def backbone_spec(value, where: str) -> tuple[dict, dict[str, dict]]:
    """A suite's [backbone] table checked, and the conventions ({method or "*": {setting: value}}) its teacher gives
    the entries' unset settings. kind = "shapes": teacher = "vp" (default) or "flow"; kind = "diffusers": the family
    detected from the directory's model_index.json, every key checked against that family's settings (its module is
    imported only then)."""
    if not isinstance(value, dict):
        raise UserError(f"{where}: [backbone] must be a table with kind = one of {list(BACKBONE_KINDS)}")
    kind = value.get("kind", "shapes")
    if kind not in BACKBONE_KINDS:
        raise unknown(f"backbone kind in {where}", kind, BACKBONE_KINDS)
    if kind == "shapes":
        for k in value:
            if k not in ("kind", "teacher"):
                raise unknown(f"key in [backbone] (shapes) of {where}", k, {"kind", "teacher"})
        teacher = value.get("teacher", "vp")
        if teacher not in TEACHER_KINDS:
            raise unknown(f"shapes teacher in {where}", teacher, TEACHER_KINDS)
        return {"kind": "shapes", **({"teacher": teacher} if "teacher" in value else {})}, TEACHER_CONVENTIONS[teacher]
    from methods import backbones

    cls, settings = backbones.settings(value, f"{where}: [backbone]")
    spec = {"kind": "diffusers", "family": cls.family, **{k: v for k, v in value.items() if k not in ("kind", "family")}}
    return spec, cls.conventions(settings)


def conventional(name: str, settings: dict, conventions: dict[str, dict]) -> dict:
    """An entry's settings with the backbone's conventions for method `name` filling the keys it leaves unset
    (conventions for the method itself win over those for every method, "*"); only keys its Config has, and none
    for a method that takes no conventions (``pretrained``: its card says how it samples)."""
    cls = registry.get(name)
    if not cls.takes_conventions:
        return dict(settings)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    filled = {**conventions.get("*", {}), **conventions.get(name, {})}
    return {**{k: v for k, v in filled.items() if k in fields}, **settings}


def _entry(e, i: int, where: str, train: dict, conventions: dict[str, dict]) -> Entry:
    at = f"{where} [[methods]] #{i + 1}"
    if not isinstance(e, dict):
        raise UserError(f"{at}: must be a table")
    for key in e:
        if key not in ENTRY_KEYS:
            raise unknown(f"key in {at}", key, ENTRY_KEYS)
    name = e.get("name")
    if not isinstance(name, str):
        raise UserError(f"{at}: needs name = one of {registry.names()}")
    cls = registry.get(name)
    settings = e.get("settings", {})
    if not isinstance(settings, dict):
        raise UserError(f"{at}: settings must be a table")
    # shared [train] settings apply where the method has such a field
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    merged = {k: v for k, v in train.items() if k in fields}
    merged.update(settings)
    label = e.get("label", name)
    if not isinstance(label, str) or not LABEL.fullmatch(label) or label.endswith(" "):
        raise UserError(f"{at}: label {label!r} must be 1-80 letters, digits, spaces and . _ + = , ( ) -, starting with a "
                        "letter or digit (it names files and table rows)")
    config = cls.make_config(conventional(name, merged, conventions), f"{at} ({name})")
    if ("steps" in e) == ("nfe" in e):
        raise UserError(f"{at}: give exactly one of steps = [...] or nfe = [...]")
    variant = e.get("variant")
    if variant is not None and not isinstance(variant, str):
        raise UserError(f"{at}: variant must be a string")
    if "steps" in e:
        budgets = [cls.budget(config, steps=s) for s in _int_list(e["steps"], "steps", at)]
    else:
        budgets = [cls.budget(config, nfe=n) for n in _int_list(e["nfe"], "nfe", at)]
    return Entry(name, label, merged, budgets, variant, config)


def _per_training_seed(entries: list[Entry], seeds: list[int], where: str, conventions: dict[str, dict]) -> list[Entry]:
    """Each entry of a trained method once per training seed (its `seed` setting); others once."""
    if len(set(seeds)) != len(seeds):
        raise UserError(f"{where}: train_seeds must not repeat a seed, got {seeds}")
    out = []
    for e in entries:
        cls = registry.get(e.name)
        if "seed" not in {f.name for f in dataclasses.fields(cls.Config)}:
            out.append(e)
            continue
        if "seed" in e.settings:
            raise UserError(f"{where}: {e.label!r} sets seed and the suite sets train_seeds; give training seeds in one place")
        for s in seeds:
            settings = {**e.settings, "seed": s}
            config = cls.make_config(conventional(e.name, settings, conventions), e.label)
            out.append(dataclasses.replace(e, settings=settings, config=config,
                                           train_seed=s))
    return out


def override(suite: Suite, methods: list[str] | None = None, nfe: list[int] | None = None,
             samples: int | None = None, seeds: list[int] | None = None) -> Suite:
    """Apply CLI overrides (validated as strictly as the file)."""
    s = dataclasses.replace(suite, entries=[dataclasses.replace(e) for e in suite.entries])
    if methods:
        known = sorted({e.label for e in s.entries} | {e.name for e in s.entries})
        for m in methods:
            if m not in known:
                # a registered method absent from this suite still gets the registry's "did you mean"
                if m not in registry.names():
                    raise unknown("method", m, known)
                raise UserError(f"method {m!r} is not in suite {s.name!r}; it has: {', '.join(known)}")
        s.entries = [e for e in s.entries if e.label in methods or e.name in methods]
    if nfe is not None:
        for e in s.entries:
            e.budgets = [registry.get(e.name).budget(e.config, nfe=n) for n in nfe]
    if samples is not None:
        s.samples = _positive_int(samples, "--samples", "command line")
    if seeds is not None:
        s.seeds = _int_list(seeds, "--seeds", "command line", allow_zero=True)
    return s


def from_dict(d: dict) -> Suite:
    """Rebuild a Suite from the resolved form stored in a run's config.json (for --resume)."""
    entries = []
    _, conventions = backbone_spec(d["backbone"], "the run's config.json")
    for e in d["entries"]:
        cls = registry.get(e["name"])
        config = cls.make_config(conventional(e["name"], e["settings"], conventions), e["label"])
        budgets = [cls.budget(config, steps=s) for s in e["steps"]]
        if [b.nfe for b in budgets] != e["nfe"]:
            raise UserError(f"{e['label']}: the stored budgets {e['nfe']} NFE do not match this version's cost of "
                            f"{e['steps']} steps; resume the run with the flashbench version that started it")
        entries.append(Entry(e["name"], e["label"], e["settings"], budgets, e.get("variant"), config,
                             e.get("train_seed"), e.get("curve")))
    return Suite(**{**d, "entries": entries})
