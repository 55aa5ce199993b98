"""COCO captions as prompts paired with their images, and the seeded draws that published protocols use.

``load_coco_captions`` reads a COCO captions annotation file (``captions_val2014.json``: ``images`` with ``id``,
``file_name``, ``width``, ``height``; ``annotations`` with ``id``, ``image_id``, ``caption``). The draws are pure
functions of (the file's contents, n, seed), so the same seed gives the same draw on any machine:

* ``draw_seeded`` (preset ``coco2014-30k``): n images drawn without replacement by a seeded permutation, one of
  each drawn image's captions picked by the same seeded stream: GigaGAN's COCO-30k
  (mingukkang/GigaGAN ``evaluation/README.md``: "30K images-caption pairs ... sampled from COCO val2014 ... for
  each image, a caption out of 5 paired captions is randomly sampled"), made reproducible by a stated seed.
* ``draw_mlperf`` (preset ``mlperf-sdxl-coco2014-5k``): MLPerf Inference's SDXL set, as
  mlcommons/inference ``text_to_image/tools/coco.py`` builds it from the same file.

Every prompt's id is ``<prefix>-<image_id>`` (e.g. ``coco2014-391895``); its ``meta`` holds ``caption_id``,
``file_name`` (the image file, relative to the images folder), ``height``, ``width`` and ``image_id``, so the
reference image of prompt i is the file of prompt i. A malformed file raises PromptFileError naming it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from prompts.loaders import Prompt, PromptFileError, _check_text, _read_text

SEEDED_DRAW_SEED = 0  # coco2014-30k's seed: numpy.random.default_rng(0) (PCG64)
MLPERF_SEED = 2023  # tools/coco.py's default --seed


@dataclasses.dataclass(frozen=True)
class CocoImage:
    """One annotated image: its id, file, size (pixels) and captions as (annotation id, text), in file order."""

    id: int
    file_name: str
    width: int
    height: int
    captions: tuple[tuple[int, str], ...]


def load_coco_captions(path: Path) -> list[CocoImage]:
    """The images of a COCO captions file that have at least one caption, sorted by image id.

    Raises PromptFileError (a UserError) naming the file when it is missing, not JSON, or lacks the COCO fields.
    """
    path = Path(path)
    try:
        data = json.loads(_read_text(path))
        images = {int(im["id"]): (str(im["file_name"]), int(im["width"]), int(im["height"])) for im in data["images"]}
        captions: dict[int, list[tuple[int, str]]] = {}
        for a in data["annotations"]:
            captions.setdefault(int(a["image_id"]), []).append((int(a["id"]), str(a["caption"])))
    except json.JSONDecodeError as e:
        raise PromptFileError(f"{path.name}: not valid JSON ({e.msg} at line {e.lineno}); expected a COCO captions "
                              "file such as captions_val2014.json") from None
    except (KeyError, TypeError, ValueError) as e:
        raise PromptFileError(f"{path.name}: not a COCO captions file ({type(e).__name__}: {e}); expected 'images' "
                              "with id, file_name, width, height and 'annotations' with id, image_id, caption") from None
    unknown = sorted(set(captions) - set(images))
    if unknown:
        raise PromptFileError(f"{path.name}: {len(unknown)} captions name images the file does not list "
                              f"(image_id {unknown[0]}, ...); expected every annotation's image_id among 'images'")
    out = [CocoImage(i, *images[i], tuple(captions[i])) for i in sorted(captions)]
    if not out:
        raise PromptFileError(f"{path.name}: no captioned images; expected a COCO captions file")
    return out


def _prompt(image: CocoImage, caption_id: int, text: str, prefix: str, where: str) -> Prompt:
    meta = (("caption_id", str(caption_id)), ("file_name", image.file_name), ("height", str(image.height)),
            ("image_id", str(image.id)), ("width", str(image.width)))
    return Prompt(f"{prefix}-{image.id}", _check_text(text, where), meta=meta)


def _too_many(n: int, images: list[CocoImage], where: str) -> None:
    if not 1 <= n <= len(images):
        raise PromptFileError(f"{where}: cannot draw {n} (image, caption) pairs from {len(images)} captioned images; "
                              f"give samples between 1 and {len(images)}")


def draw_seeded(images: list[CocoImage], n: int, seed: int = SEEDED_DRAW_SEED, prefix: str = "coco2014",
                where: str = "COCO captions") -> list[Prompt]:
    """n (image, caption) pairs: distinct images in the order of ``default_rng(seed).permutation`` of the images
    sorted by id, each with the caption ``pick[k] % len(captions)`` where ``pick = rng.integers(0, 2**62, N)`` is
    drawn next from the same generator (k: the image's place by id; captions in file order).

    A prefix of a draw is the smaller draw: ``draw_seeded(images, m)`` equals ``draw_seeded(images, n)[:m]`` for
    m <= n, so a smoke run's prompts are the first prompts of the full protocol. PromptFileError when n is not in
    1..len(images).
    """
    _too_many(n, images, where)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    pick = rng.integers(0, 2**62, size=len(images))
    out = []
    for k in order[:n]:
        image = images[k]
        caption_id, text = image.captions[int(pick[k] % len(image.captions))]
        out.append(_prompt(image, caption_id, text, prefix, f"{where} (caption {caption_id})"))
    return out


def draw_mlperf(images: list[CocoImage], n: int = 5000, seed: int = MLPERF_SEED, prefix: str = "coco2014",
                where: str = "COCO captions") -> list[Prompt]:
    """MLPerf Inference SDXL's (image, caption) set, as mlcommons/inference ``text_to_image/tools/coco.py`` makes it
    from ``captions_val2014.json``: the first caption of each image in file order (``drop_duplicates(subset=
    ["image_id"], keep="first")``), sorted by caption id, shuffled by ``DataFrame.sample(frac=1,
    random_state=seed)`` (which is ``numpy.random.RandomState(seed).permutation``), the first n kept, captions
    with newlines removed and stripped, then ordered by caption id.

    PromptFileError when n is not in 1..len(images).
    """
    _too_many(n, images, where)
    first = sorted((image.captions[0][0], image.captions[0][1], image) for image in images)  # by caption id
    kept = sorted(first[i] for i in np.random.RandomState(seed).permutation(len(first))[:n])
    return [_prompt(image, cid, text.replace("\n", "").strip(), prefix, f"{where} (caption {cid})")
            for cid, text, image in kept]
