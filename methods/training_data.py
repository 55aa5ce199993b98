"""Real training images as users have them, for the methods that train on real data (real scale).

Two layouts: an image folder with ``metadata.jsonl`` (``{"file_name", "text"}`` per line, the
Hugging Face imagefolder convention), or webdataset shards (``.tar`` files, or a folder of them,
whose members pair ``KEY.jpg|png|webp`` with ``KEY.txt`` or ``KEY.json`` holding ``text``/``caption``).

Each image is resized keeping its aspect (shorter side to the resolution, bicubic, antialiased) and
centre-cropped, as SD/SDXL training does; its original size and crop corner are kept for SDXL's
micro-conditioning. Batches are read by a ``torch.utils.data.DataLoader`` with worker processes and
are a function of their key alone (the key encodes training seed, stream, process rank and step),
so workers, resumption and process count never change what a step sees.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from core.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def preprocess(im: Image.Image, resolution: int) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """(image float32 [3, R, R] in [0, 1], original (height, width), crop (top, left)): shorter side to R, centre crop."""
    from torchvision.transforms.v2 import functional as TF

    im = im.convert("RGB")
    w, h = im.size
    scale = resolution / min(w, h)
    rw, rh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    x = torch.from_numpy(np.asarray(im, dtype=np.uint8)).permute(2, 0, 1)
    x = TF.resize(x, [rh, rw], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    top, left = (rh - resolution) // 2, (rw - resolution) // 2
    x = x[:, top : top + resolution, left : left + resolution]
    return x.float() / 255.0, (h, w), (top, left)


class ImageCaptions(torch.utils.data.Dataset):
    """Item i: (image [3, R, R], caption, original (h, w), crop (top, left)) from a folder or tar shards."""

    def __init__(self, root: Path, resolution: int):
        self.root, self.resolution = Path(root), resolution
        if (self.root / "metadata.jsonl").is_file():
            self.rows = self._folder()
            self.shards = []
        else:
            shards = [self.root] if self.root.suffix == ".tar" else sorted(self.root.glob("*.tar"))
            if not shards:
                raise UserError(f"training data {root}: neither an image folder with metadata.jsonl nor webdataset "
                                ".tar shards")
            self.shards = shards
            self.rows = self._index_shards(shards)
        if not self.rows:
            raise UserError(f"training data {root} holds no (image, caption) pairs")
        self._open: dict[int, tarfile.TarFile] = {}

    def _folder(self) -> list[tuple]:
        meta = self.root / "metadata.jsonl"
        rows = []
        for n, line in enumerate(meta.read_text().splitlines(), 1):
            if line.strip():
                try:
                    d = json.loads(line)
                    rows.append((None, d["file_name"], d["text"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UserError(f"{meta.name}:{n}: expected a JSON object with file_name and text") from None
        missing = [f for _, f, _ in rows if not (self.root / f).is_file()]
        if missing:
            raise UserError(f"training data {self.root}: {len(missing)} images listed in metadata.jsonl are missing "
                            f"(first: {missing[0]})")
        return rows

    @staticmethod
    def _index_shards(shards: list[Path]) -> list[tuple]:
        rows = []
        for s, path in enumerate(shards):
            try:
                with tarfile.open(path) as tar:
                    members = {m.name: m for m in tar.getmembers() if m.isfile()}
                    for name in sorted(members):
                        stem, suffix = name.rsplit(".", 1) if "." in name else (name, "")
                        if f".{suffix.lower()}" not in IMAGE_SUFFIXES:
                            continue
                        cap = members.get(f"{stem}.txt") or members.get(f"{stem}.json")
                        if cap is None:
                            raise UserError(f"training shard {path.name}: image {name} has no {stem}.txt or {stem}.json")
                        text = tar.extractfile(cap).read().decode("utf-8")
                        if cap.name.endswith(".json"):
                            d = json.loads(text)
                            text = d.get("text", d.get("caption"))
                        rows.append((s, name, text.strip()))
            except (tarfile.TarError, OSError, json.JSONDecodeError) as e:
                raise UserError(f"training shard {path}: cannot be read ({type(e).__name__})") from None
        return rows

    def __len__(self) -> int:
        return len(self.rows)

    def _image(self, shard: int | None, name: str) -> Image.Image:
        if shard is None:
            return Image.open(self.root / name)
        if shard not in self._open:  # one handle per shard and worker process
            self._open[shard] = tarfile.open(self.shards[shard])  # noqa: SIM115 - kept open for the worker's life
        return Image.open(io.BytesIO(self._open[shard].extractfile(name).read()))

    def __getitem__(self, i: int):
        shard, name, text = self.rows[i]
        try:
            with self._image(shard, name) as im:
                image, size, crop = preprocess(im, self.resolution)
        except OSError as e:
            raise UserError(f"training image {name} cannot be read ({type(e).__name__})") from None
        return image, text, size, crop


class KeyedBatches(torch.utils.data.Dataset):
    """Item `key`: the batch of n items at indices (key·n + j) mod N, collated."""

    def __init__(self, data: ImageCaptions, n: int):
        self.data, self.n = data, n

    def __len__(self) -> int:  # keys are unbounded; the sampler says which
        return 2**62

    def __getitem__(self, key: int):
        items = [self.data[(key * self.n + j) % len(self.data)] for j in range(self.n)]
        images = torch.stack([it[0] for it in items])
        micro = torch.tensor([[*it[2], *it[3]] for it in items], dtype=torch.long)  # orig h, w, crop top, left
        return images, [it[1] for it in items], micro


class _Keys(torch.utils.data.Sampler):
    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        k = self.start
        while True:
            yield k
            k += 1


class TrainingData:
    """Batches by key through a prefetching DataLoader: consecutive keys stream; any other key restarts there."""

    def __init__(self, root: Path, resolution: int, workers: int = 2):
        self.data = ImageCaptions(root, resolution)
        self.workers = workers
        self._iter, self._next, self._n = None, None, None

    def __call__(self, n: int, key: int):
        """(images [n, 3, R, R] in [0, 1], captions, micro [n, 4] = original h, w and crop top, left)."""
        if self._iter is None or key != self._next or n != self._n:
            loader = torch.utils.data.DataLoader(KeyedBatches(self.data, n), batch_size=None, sampler=_Keys(key),
                                                 num_workers=self.workers, prefetch_factor=2 if self.workers else None,
                                                 persistent_workers=False)
            self._iter, self._n = iter(loader), n
        self._next = key + 1
        return next(self._iter)
