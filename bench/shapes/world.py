"""The captioned-shapes world: a procedural text-to-image world with exact ground truth.

A scene holds one or two objects; each has a shape, a colour, a size and a position drawn from the
small vocabularies below. Scenes are a pure function of their seed; renders are a pure function of
(scene, render variant). Train, validation and evaluation scenes come from disjoint seed ranges.

Images are float tensors in [0, 1], NCHW, RESOLUTION x RESOLUTION pixels.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from prompts import Obj

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {
    "red": (0.90, 0.13, 0.12),
    "orange": (0.98, 0.55, 0.08),
    "yellow": (0.95, 0.90, 0.16),
    "green": (0.16, 0.72, 0.22),
    "blue": (0.16, 0.32, 0.95),
    "purple": (0.62, 0.22, 0.86),
}
COLOR_NAMES = tuple(COLORS)
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
CORNERS = POSITIONS[:4]
POSITION_PHRASE = {p: ("in the center" if p == "center" else f"at the {p}") for p in POSITIONS}

RESOLUTION = 16
SUPERSAMPLE = 4  # renders at 4x and box-filters down: soft, anti-aliased edges
# Slot centres in pixel units of the final image; each corner slot owns one quadrant.
SLOT_CENTER = {
    "top left": (4.0, 4.0),
    "top right": (12.0, 4.0),
    "bottom left": (4.0, 12.0),
    "bottom right": (12.0, 12.0),
    "center": (8.0, 8.0),
}
RADIUS = {"small": 2.1, "large": 3.4}
P_TWO_OBJECTS = 0.6

# Disjoint seed ranges: scene seed = SPLIT_OFFSET[split] + index.
SPLIT_OFFSET = {"train": 0, "val": 1_000_000_000, "eval": 2_000_000_000}
SPLIT_SIZE = 1_000_000_000


def phrase(obj: Obj) -> str:
    """The grammar's phrase for one object: "a large red circle at the top left"."""
    return f"a {obj.size} {obj.color} {obj.shape} {POSITION_PHRASE[obj.position]}"


def caption(objects: tuple[Obj, ...]) -> str:
    """The grammar's caption of a scene's objects (phrases joined by "and")."""
    return " and ".join(phrase(o) for o in objects)


@dataclasses.dataclass(frozen=True)
class Scene:
    """A scene: its objects (the ground truth) and the seed its attributes and renders derive from."""

    objects: tuple[Obj, ...]
    seed: int

    @property
    def caption(self) -> str:
        return caption(self.objects)

    def to_dict(self) -> dict:
        return {"seed": self.seed, "objects": [dataclasses.asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls(tuple(Obj(**o) for o in d["objects"]), int(d["seed"]))


def scene_of(prompt) -> Scene | None:
    """The scene a prompt's ground truth describes (None without objects or a scene seed)."""
    if prompt.objects is None or prompt.scene_seed is None:
        return None
    return Scene(prompt.objects, prompt.scene_seed)


def scene_seed(split: str, index: int) -> int:
    if split not in SPLIT_OFFSET:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_OFFSET)}")
    if not 0 <= index < SPLIT_SIZE:
        raise ValueError(f"scene index {index} out of range [0, {SPLIT_SIZE})")
    return SPLIT_OFFSET[split] + index


def sample_scene(seed: int) -> Scene:
    """Draw a scene's attributes from its seed alone."""
    rng = np.random.default_rng([seed, 0])
    two = rng.random() < P_TWO_OBJECTS
    if two:
        positions = [CORNERS[i] for i in rng.choice(len(CORNERS), size=2, replace=False)]
    else:
        positions = [POSITIONS[rng.integers(len(POSITIONS))]]
    objs = tuple(
        Obj(
            shape=SHAPES[rng.integers(len(SHAPES))],
            color=COLOR_NAMES[rng.integers(len(COLOR_NAMES))],
            size=SIZES[rng.integers(len(SIZES))],
            position=p,
        )
        for p in positions
    )
    return Scene(objs, seed)


def scenes(split: str, start: int, count: int) -> list[Scene]:
    return [sample_scene(scene_seed(split, start + i)) for i in range(count)]


_PHRASE_RE = re.compile(
    r"^an? (?P<size>\w+) (?P<color>\w+) (?P<shape>\w+) "
    r"(?:at the (?P<pos>top left|top right|bottom left|bottom right)|in the (?P<center>center))$"
)


def parse_caption(text: str) -> tuple[Obj, ...] | None:
    """Objects named by a caption of the world's grammar, or None if it is not one."""
    parts = [p.strip() for p in text.strip().lower().rstrip(".").split(" and ")]
    objs = []
    for part in parts:
        m = _PHRASE_RE.match(part)
        if m is None:
            return None
        pos = m["pos"] or m["center"]
        if m["size"] not in SIZES or m["color"] not in COLORS or m["shape"] not in SHAPES:
            return None
        objs.append(Obj(m["shape"], m["color"], m["size"], pos))
    if not 1 <= len(objs) <= 2 or len({o.position for o in objs}) != len(objs):
        return None
    return tuple(objs)


# ---------------------------------------------------------------------------------------------
# Rendering


def _inside(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Point-in-shape test in object coordinates (u right, v down), extent ~r."""
    if shape == "circle":
        return u * u + v * v <= r * r
    if shape == "square":
        h = 0.86 * r
        return (np.abs(u) <= h) & (np.abs(v) <= h)
    if shape == "triangle":  # pointing up, circumradius 1.2 r, centroid at origin
        R = 1.2 * r
        vy = v - 0.25 * R  # shift so the visual centre sits at the slot centre
        base = vy <= 0.5 * R
        left = np.sqrt(3.0) * u - vy <= R  # edges through the apex (0, -R)
        right = -np.sqrt(3.0) * u - vy <= R
        return base & left & right
    if shape == "cross":
        w = 0.38 * r
        return ((np.abs(u) <= w) & (np.abs(v) <= r)) | ((np.abs(v) <= w) & (np.abs(u) <= r))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _box_down(a: np.ndarray, f: int) -> np.ndarray:
    h, w = a.shape[:2]
    return a.reshape(h // f, f, w // f, f, *a.shape[2:]).mean(axis=(1, 3))


def render_scene(scene: Scene, variant: int = 0, resolution: int = RESOLUTION) -> np.ndarray:
    """Render one scene to an HxWx3 float32 array in [0, 1].

    `variant` picks the nuisance draw (jitter, background, texture); variant 0 is the canonical
    render of the scene, other variants are further real images of the same caption.
    """
    rng = np.random.default_rng([scene.seed, 1, variant])
    scale = resolution / RESOLUTION
    S = resolution * SUPERSAMPLE
    # pixel-centre coordinates of the supersampled grid, in final-image pixel units
    c = (np.arange(S) + 0.5) / SUPERSAMPLE
    yy, xx = np.meshgrid(c, c, indexing="ij")

    # 1. background: tinted grey, vertical gradient, low-frequency mottling
    level = rng.uniform(0.10, 0.35)
    tint = rng.uniform(-0.03, 0.03, size=3)
    grad = rng.uniform(-0.08, 0.08)
    low = rng.normal(0.0, 1.0, size=(5, 5))
    ly = np.linspace(0, 4, resolution)
    i0 = np.clip(np.floor(ly).astype(int), 0, 3)
    fy = ly - i0
    rows = low[i0] * (1 - fy)[:, None] + low[i0 + 1] * fy[:, None]
    mottle = rows[:, i0] * (1 - fy)[None, :] + rows[:, i0 + 1] * fy[None, :]
    y01 = (np.arange(resolution) + 0.5) / resolution
    bg = level + tint[None, None, :] + grad * (2 * y01 - 1)[:, None, None] + 0.035 * mottle[..., None]
    img = np.broadcast_to(bg, (resolution, resolution, 3)).astype(np.float64).copy()

    # 2. objects: anti-aliased coverage, shaded fill, composited in order
    for obj in scene.objects:
        cx, cy = SLOT_CENTER[obj.position]
        cx = (cx + rng.uniform(-0.6, 0.6)) * scale
        cy = (cy + rng.uniform(-0.6, 0.6)) * scale
        r = RADIUS[obj.size] * rng.uniform(0.92, 1.08) * scale
        theta = rng.uniform(-0.15, 0.15)
        u0, v0 = xx * scale - cx, yy * scale - cy
        cos, sin = np.cos(theta), np.sin(theta)
        u, v = cos * u0 + sin * v0, -sin * u0 + cos * v0
        cover = _box_down(_inside(obj.shape, u, v, r).astype(np.float64), SUPERSAMPLE)
        shade = 1.0 + 0.16 * _box_down(-(u + v) / (2 * r), SUPERSAMPLE).clip(-1.5, 1.5)
        base = np.asarray(COLORS[obj.color]) + rng.uniform(-0.04, 0.04, size=3)
        fill = base[None, None, :] * shade[..., None]
        img = img * (1 - cover[..., None]) + fill * cover[..., None]

    # 3. fine texture over everything: the detail few-step samplers tend to lose
    img = img + rng.normal(0.0, 0.02, size=(resolution, resolution, 1))
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def render(scenes_: list[Scene], variant: int = 0, resolution: int = RESOLUTION):
    """Render scenes to a float tensor [N, 3, H, W] in [0, 1]."""
    import torch

    arr = np.stack([render_scene(s, variant, resolution) for s in scenes_])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def slot_labels(scenes_: list[Scene]) -> dict:
    """Ground truth per position slot: shape index (0 = empty), colour and size (-100 where empty).

    Long tensors [N, slots]; the attribute network's targets and the teacher's caption-parse targets.
    """
    import torch

    n = len(scenes_)
    shape = torch.zeros(n, len(POSITIONS), dtype=torch.long)
    color = torch.full((n, len(POSITIONS)), -100, dtype=torch.long)
    size = torch.full((n, len(POSITIONS)), -100, dtype=torch.long)
    for i, s in enumerate(scenes_):
        for o in s.objects:
            j = POSITIONS.index(o.position)
            shape[i, j] = 1 + SHAPES.index(o.shape)
            color[i, j] = COLOR_NAMES.index(o.color)
            size[i, j] = SIZES.index(o.size)
    return {"shape": shape, "color": color, "size": size}
