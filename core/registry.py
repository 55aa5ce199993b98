"""Registries read from source: the classes of a folder decorated with ``@decorator("name", ...)``, found with
``ast`` (nothing imported), so a name map costs a file read and a module loads only when it is used (methods,
backbone families, metrics)."""

from __future__ import annotations

import ast
from pathlib import Path


def decorated_classes(folder: Path, decorator: str, package: str) -> dict[str, dict]:
    """name -> {"module", "summary", "description", and the decorator's literal keyword arguments} for every class of
    ``folder/*.py`` decorated with ``@decorator("name", ...)``, read with ``ast`` (nothing is imported)."""
    out = {}
    for path in sorted(Path(folder).glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if not isinstance(node, ast.ClassDef):
                continue
            for d in node.decorator_list:
                if (isinstance(d, ast.Call) and isinstance(d.func, ast.Name) and d.func.id == decorator
                        and d.args and isinstance(d.args[0], ast.Constant)):
                    doc = (ast.get_docstring(node) or "").strip().splitlines()
                    para = " ".join(doc[: doc.index("")] if "" in doc else doc)
                    out[d.args[0].value] = {"module": f"{package}.{path.stem}",
                                            "summary": doc[0].rstrip(".") if doc else "",
                                            "description": para,  # the docstring's first paragraph, on one line
                                            **{k.arg: ast.literal_eval(k.value) for k in d.keywords}}
    return out
