"""Build the shipped shapes-world prompt sets into prompts/data: `python -m bench.shapes.prompt_sets`
(deterministic; `--check` verifies the shipped files against a rebuild)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from bench.shapes import world
from core import io
from prompts.loaders import DATA, MANIFEST

SETS = {"shapes-eval": ("eval", 2000), "shapes-val": ("val", 500)}
MIN_TWO_OBJECT_FRACTION = 0.4


def build_set(split: str, count: int) -> tuple[str, dict]:
    lines, two = [], 0
    for i, scene in enumerate(world.scenes(split, 0, count)):
        two += len(scene.objects) == 2
        row = {"id": f"shapes-{split}-{i:05d}", "text": scene.caption, "scene_seed": scene.seed,
               "objects": [dataclasses.asdict(o) for o in scene.objects]}
        lines.append(json.dumps(row, sort_keys=True))
    assert two / count >= MIN_TWO_OBJECT_FRACTION, (split, two / count)
    text = "\n".join(lines) + "\n"
    return text, {"count": count, "two_object_fraction": round(two / count, 4), "split": split}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true", help="verify the shipped files instead of writing them")
    args = ap.parse_args(argv)
    manifest = {"world_resolution": world.RESOLUTION, "sets": {}}
    ok = True
    for name, (split, count) in SETS.items():
        text, info = build_set(split, count)
        fname = f"{name}.jsonl"
        info.update(file=fname, sha256=io.sha256_bytes(text.encode()))
        manifest["sets"][name] = info
        if args.check:
            ok &= (DATA / fname).read_bytes() == text.encode()
        else:
            io.write_text(DATA / fname, text)
    if args.check:
        ok &= json.loads(MANIFEST.read_text()) == manifest
        print("prompt sets match" if ok else "prompt sets differ from a rebuild")
        return 0 if ok else 1
    io.write_json(MANIFEST, manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
