"""The method registry: a method is declared once, in its own file, by ``@register("name")`` on its class.

The name map is read from the source files themselves (``ast``, no import), so ``flashbench list``
and "unknown method" errors name every method and its summary (the first line of its class
docstring) without importing torch or diffusers; ``get`` imports a method's module only when it is
used (the lazy name map of lm-evaluation-harness, without a second list to keep in step).
"""

from __future__ import annotations

import ast
import functools
import importlib
from pathlib import Path

from core.errors import unknown
from core.registry import decorated_classes

_REGISTRY: dict[str, type] = {}


@functools.cache
def declared() -> dict[str, tuple[str, str]]:
    """name -> (module, summary) for every class decorated with ``@register("name")`` under methods/."""
    return {name: (d["module"], d["summary"])
            for name, d in decorated_classes(Path(__file__).parent, "register", "methods").items()}


@functools.cache
def module_sources(module: str, root: Path | None = None) -> tuple[Path, ...]:
    """The files of `module` (a ``methods.*`` module) and of every ``methods.*`` module it imports, transitively (read
    with ``ast``, imports inside functions included): the code a method's students are trained by. `root`: the
    methods/ folder to read (default this package's)."""
    root = Path(root or Path(__file__).parent)
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen or not name.startswith("methods"):
            continue
        rel = Path(*name.split(".")[1:])
        path = root / rel / "__init__.py" if (root / rel).is_dir() else (root / rel).with_suffix(".py")
        if not path.is_file():
            continue
        seen[name] = path
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                todo.append(node.module)
                todo += [f"{node.module}.{a.name}" for a in node.names]  # `from methods import x`
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
    return tuple(sorted(seen.values()))


def register(name: str):
    """Class decorator: register a Method subclass under ``name`` (the one place a method is named)."""

    def deco(cls):
        if name not in declared():
            raise RuntimeError(f"method {name!r} must be registered with @register({name!r}) on a class in methods/")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def names() -> list[str]:
    return sorted(declared())


def summary(name: str) -> str:
    return declared()[name][1]


def get(name: str):
    """The Method class registered as ``name``; UserError with the known names (and a "did you mean") if none."""
    known = declared()
    if name not in known:
        raise unknown("method", name, known)
    if name not in _REGISTRY:
        importlib.import_module(known[name][0])
    return _REGISTRY[name]
