"""GenEval's compositional score (Ghosh et al. 2023) per task and overall, its rules over a local detector's boxes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from bench import geneval
from bench.metrics.base import Metric, prompt_ids
from bench.metrics.bootstrap import BOOTSTRAP, BOOTSTRAP_SEED, percentile_ci
from bench.metrics.registry import register_metric
from core.errors import UserError, unknown


@dataclasses.dataclass
class Config:
    """The models GenEval's rules need, from local files only (nothing is downloaded)."""

    detector: str = ""  # folder of the detector (transformers: save_pretrained's config, weights, preprocessor)
    detector_kind: str = "transformers"  # bench.geneval.DETECTORS
    colour_model: str = ""  # open_clip architecture ("ViT-L-14", GenEval's) or "local-dir:<folder>"
    colour_weights: str = ""  # the architecture's local weights file (GenEval: OpenAI's ViT-L-14); "" for local-dir
    colour_kind: str = "open_clip"  # bench.geneval.COLOUR_JUDGES


def stratified_bootstrap(correct: np.ndarray, strata: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
    """BOOTSTRAP resampled means of `correct` within each stratum (index arrays; each resampled with replacement
    within itself, one rng stream drawn stratum after stratum) and of their mean: the tasks keep their sizes, as
    the benchmark fixes them, and the overall score stays the mean over tasks in every resample."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    per = [correct[s][rng.integers(0, len(s), size=(BOOTSTRAP, len(s)))].mean(1) for s in strata]
    return per, np.mean(per, 0)


def is_geneval(prompt) -> bool:
    meta = dict(prompt.meta)
    return meta.get("tag") in geneval.TAGS and "include" in meta


@register_metric(
    "geneval", order=40,
    source="Ghosh et al. 2023 (GenEval, NeurIPS D&B), djghosh13/geneval evaluation/evaluate_images.py and "
           "summary_scores.py (rules, thresholds, task means)",
    weights="a local object detector (transformers AutoModelForObjectDetection; GenEval's own is mmdet Mask2Former) and "
            "a local open_clip model for colours",
    license="as the detector's and CLIP's weights; GenEval metadata: MIT",
    columns=(
        {"key": "geneval", "header": "GenEval ↑", "decimals": 3, "direction": "higher", "show_ci": True,
         "main": False, "table_a": True, "title": "GenEval overall ↑"},
        {"key": "geneval_single_object", "header": "single obj.", "decimals": 3, "direction": "higher",
         "main": False, "table_a": True},
        {"key": "geneval_two_object", "header": "two obj.", "decimals": 3, "direction": "higher", "main": False,
         "table_a": True},
        {"key": "geneval_counting", "header": "counting", "decimals": 3, "direction": "higher", "main": False,
         "table_a": True},
        {"key": "geneval_colors", "header": "colours", "decimals": 3, "direction": "higher", "main": False,
         "table_a": True},
        {"key": "geneval_position", "header": "position", "decimals": 3, "direction": "higher", "main": False,
         "table_a": True},
        {"key": "geneval_color_attr", "header": "colour attr.", "decimals": 3, "direction": "higher", "main": False,
         "table_a": True}))
class GenEval(Metric):
    """GenEval's score: per image, whether a local detector's boxes (and a colour judge on their crops) satisfy
    the prompt's metadata under GenEval's rules (``bench.geneval``); ``geneval_<tag>`` the share of correct images
    of each task, ``geneval`` their mean (``summary_scores.py``); 95% CIs by a bootstrap over prompts within each
    task. Not the official scorer (mmdet Mask2Former): run that on the saved samples for paper numbers.
    """

    width = 2  # correct, task index in geneval.TAGS
    Config = Config

    def setup(self):
        device = str(getattr(self.evaluators, "device", "cpu"))
        c = self.config
        self.detector = geneval.DETECTORS[c.detector_kind](Path(c.detector), device=device)
        self.judge = geneval.COLOUR_JUDGES[c.colour_kind](c.colour_model, c.colour_weights or None, device=device) \
            if c.colour_model else None
        self.records = {p.id: geneval.record(p) for p in self.prompts}

    @classmethod
    def check(cls, prompts, where, evaluators_kind, config=None):
        lacking = [p for p in prompts if not is_geneval(p)]
        if lacking:
            raise UserError(f"geneval needs GenEval prompts (a tag and include clauses each), and {len(lacking)} of "
                            f"{len(prompts)} prompts of {where!r} are not ({prompt_ids(lacking)}): use GenEval's "
                            "evaluation_metadata.jsonl as the prompts or remove \"geneval\" from metrics")
        c = config or Config()
        if c.detector_kind not in geneval.DETECTORS:
            raise unknown("geneval detector_kind", c.detector_kind, geneval.DETECTORS)
        if c.colour_kind not in geneval.COLOUR_JUDGES:
            raise unknown("geneval colour_kind", c.colour_kind, geneval.COLOUR_JUDGES)
        if not c.detector or not Path(c.detector).is_dir():
            raise UserError(f"{where}: [metrics.geneval] detector = {c.detector!r} is not a folder; give the local "
                            "folder of a detector (transformers save_pretrained layout, COCO labels)")
        coloured = any("color" in r for p in prompts for r in json.loads(dict(p.meta)["include"]))
        if coloured:
            local = c.colour_model.startswith("local-dir:")
            path = Path(c.colour_model[len("local-dir:"):]) if local else Path(c.colour_weights) if c.colour_weights \
                else None
            if not c.colour_model or path is None or not (path.is_dir() if local else path.is_file()):
                raise UserError(f"{where}: GenEval's colour tasks need a local CLIP: [metrics.geneval] colour_model = "
                                "\"ViT-L-14\" with colour_weights = its weights file, or colour_model = "
                                f"\"local-dir:<folder>\" (got {c.colour_model!r}, {c.colour_weights!r})")

    def per_sample(self, images, prompts):
        arrays = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        rows = []
        for a, p in zip(arrays, prompts):  # one image at a time: a verdict never depends on the batch
            v = geneval.score_image(np.ascontiguousarray(a), self.records[p.id], self.detector, self.judge)
            rows.append([float(v.correct), float(geneval.TAGS.index(v.tag))])
        return torch.tensor(rows, dtype=torch.float64).view(-1, self.width)

    def compute(self, values):
        v = values.numpy()
        correct, tag = v[:, 0], v[:, 1].astype(int)
        present = [i for i in range(len(geneval.TAGS)) if (tag == i).any()]
        if not present:
            return {}
        score = geneval.summary([geneval.TAGS[i] for i in tag], correct)
        per, overall = stratified_bootstrap(correct, [np.flatnonzero(tag == i) for i in present])
        row = {"geneval": score["overall"]}
        row["geneval_ci_low"], row["geneval_ci_high"] = percentile_ci(overall)
        for i, means in zip(present, per):
            key = f"geneval_{geneval.TAGS[i]}"
            row[key] = score[geneval.TAGS[i]]
            row[f"{key}_ci_low"], row[f"{key}_ci_high"] = percentile_ci(means)
        return row

    def protocol(self):
        return {"geneval": {"detector": self.detector.identity(),
                            "colour_judge": None if self.judge is None else self.judge.identity(),
                            "threshold": geneval.THRESHOLD, "counting_threshold": geneval.COUNTING_THRESHOLD,
                            "max_objects": geneval.MAX_OBJECTS, "position_threshold": geneval.POSITION_THRESHOLD,
                            "official": False}}
