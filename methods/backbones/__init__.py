"""Teacher backbones from local diffusers directories: one file per family, registered like methods.

A family is a class in this package decorated with ``@register_backbone("name", pipelines=(...))``: the
diffusers pipeline classes (``model_index.json``'s ``_class_name``) whose directories it loads. Its
``Settings`` dataclass is what a suite's ``[backbone]`` table may say (typed, unknown keys refused with a
"did you mean"), and ``conventions`` the method settings its pipeline defaults to (guidance form and scale,
...), which fill what a suite leaves unset. The name map is read from the source with ``ast`` (nothing
imported), so detecting a directory's family costs a JSON read; a family's module is imported only when
it is used. Adding a family is one file here.
"""

from __future__ import annotations

import functools
import importlib
import json
from pathlib import Path

from core.errors import UserError, unknown
from core.registry import decorated_classes

_REGISTRY: dict[str, type] = {}
# transformer pipelines diffusers has that no family here loads yet: named in the refusal
NOT_YET = ("SanaPipeline", "SanaSprintPipeline", "QwenImagePipeline", "HunyuanDiTPipeline", "PixArtSigmaPipeline",
           "LuminaPipeline", "CogView4Pipeline", "HiDreamImagePipeline", "AuraFlowPipeline")


@functools.cache
def declared() -> dict[str, dict]:
    """family name -> {"module", "summary", "pipelines"} for every registered family."""
    return decorated_classes(Path(__file__).parent, "register_backbone", __name__)


def register_backbone(name: str, pipelines: tuple[str, ...]):
    """Class decorator: a backbone family called `name`, loading directories of the diffusers `pipelines`."""

    def deco(cls):
        if name not in declared():
            raise RuntimeError(f"backbone {name!r} must be registered with @register_backbone on a class in "
                               "methods/backbones/")
        cls.family, cls.pipelines = name, tuple(pipelines)
        _REGISTRY[name] = cls
        return cls

    return deco


def names() -> list[str]:
    return sorted(declared())


def get(name: str) -> type:
    """The family class registered as `name` (its module imported on first use); UserError when unknown."""
    known = declared()
    if name not in known:
        raise unknown("backbone family", name, known)
    if name not in _REGISTRY:
        importlib.import_module(known[name]["module"])
    return _REGISTRY[name]


def pipeline_class(path: Path) -> str | None:
    """``_class_name`` of a directory's ``model_index.json`` (None without one); UserError when it is not JSON."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return None
    try:
        name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise UserError(f"{index}: not a valid model_index.json (a JSON object with _class_name)") from None
    return name if isinstance(name, str) else None


def family_of(path: Path) -> str:
    """The family that loads the diffusers directory `path`, by its model_index.json's pipeline class (a directory
    without one: SDXL when it has unet/ and text_encoder_2/, SD when it has unet/).

    Raises UserError (one line) for a missing folder or a pipeline no family loads, naming the supported ones.
    """
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"[backbone] path {path} is not a folder; give a local diffusers pipeline directory")
    by_pipeline = {p: name for name, d in declared().items() for p in d["pipelines"]}
    pipeline = pipeline_class(path)
    if pipeline in by_pipeline:
        return by_pipeline[pipeline]
    supported = ", ".join(sorted(by_pipeline))
    if pipeline is not None:
        later = " (not supported yet)" if pipeline in NOT_YET or (path / "transformer").is_dir() else ""
        raise UserError(f"{path}: a {pipeline}{later}; flashbench loads {supported} directories")
    if (path / "unet").is_dir():
        return "sdxl" if (path / "text_encoder_2").is_dir() else "sd"
    raise UserError(f"{path} is not a diffusers pipeline directory (no model_index.json, no unet/); flashbench loads "
                    f"{supported} directories")


SHARED_KEYS = ("kind",)  # [backbone] keys every kind has


def settings(spec: dict, where: str = "[backbone]"):
    """(family class, its Settings) for a suite's ``[backbone]`` table of kind "diffusers": the family detected from
    the directory, every key checked against its Settings (types, values; unknown keys with a "did you mean")."""
    from methods.base import coerce_config

    if not isinstance(spec.get("path"), str) or not spec["path"]:
        raise UserError(f"{where}: kind = 'diffusers' needs path = a local SD/SDXL/SD3/FLUX diffusers directory")
    cls = get(family_of(Path(spec["path"])))
    given = {k: v for k, v in spec.items() if k not in SHARED_KEYS and k != "family"}
    return cls, coerce_config(cls.Settings, given, f"{where} ({cls.family})")


def load(spec: dict, device: str = "cpu"):
    """The backbone a ``[backbone]`` table of kind "diffusers" names, loaded on `device` (UserError on bad input)."""
    cls, s = settings(spec)
    return cls.load(s, device)


def load_dir(path, device: str = "cpu", **settings):
    """The backbone of the diffusers directory `path` with [backbone] `settings` (paths may be Path objects)."""
    spec = {"kind": "diffusers", "path": str(path), **{k: str(v) if isinstance(v, Path) else v for k, v in settings.items()}}
    return load(spec, device)
