"""HPSv3 (Ma et al. 2025, "HPSv3: Towards Wide-Spectrum Human Preference Score"): a Qwen2-VL-7B vision-language model
with a reward head on one token's hidden state; GPU tier (about 16 GB of weights in bfloat16).

Declared, not measured. What is public and mapped here: the backbone (a transformers ``Qwen2VLForConditionalGeneration``
directory) and the head's shape as a third-party copy of the HPSv3 code shows it (Linear(hidden, 1024), ReLU,
Dropout(0.05), Linear(1024, 16), ReLU, Linear(16, 2): a mean and an uncertainty; the score is the mean). What is not
reproduced faithfully from public sources read here: the instruction prompt and chat template the image and prompt are
wrapped in, the special token whose hidden state feeds the head, the image resolution limits given to the processor,
and whether the released checkpoint stores the head beside the backbone. A score built on guesses would not be HPSv3,
so ``check`` refuses every suite that asks for it, and an instance refuses a CPU evaluators device (GPU tier).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from bench.metrics.base import Metric
from bench.metrics.preference import require_file
from bench.metrics.registry import register_metric
from core.errors import UserError


@dataclasses.dataclass
class HPSv3Config:
    path: str = ""  # a local HPSv3 directory: a transformers Qwen2-VL config.json and its weights


def reward_head(hidden: int) -> nn.Sequential:
    """HPSv3's head as a third-party copy of its code shows it: hidden state [n, hidden] -> (mean, uncertainty) [n, 2]."""
    return nn.Sequential(nn.Linear(hidden, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(),
                         nn.Linear(16, 2))


def hpsv3_skeleton(path: str | Path):
    """(Qwen2-VL backbone, reward head) built from the directory's config.json on the meta device (no weights read or
    allocated): the loading and shape contract of the declared metric."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(**json.loads((Path(path) / "config.json").read_text(encoding="utf-8")))
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(config)
        head = reward_head(config.get_text_config().hidden_size)
    return model, head


@register_metric("hpsv3", order=64, reward="hpsv3",
    source="Ma et al. 2025 (HPSv3); github.com/MizzenAI/HPSv3 — declared and refused (scoring head not reproduced)",
    weights="an HPSv3 directory (Qwen2-VL-7B reward model), GPU tier",
    license="not checked",
    columns=(
    {"key": "hpsv3", "header": "HPSv3 ↑", "decimals": 3, "direction": "higher", "show_ci": True, "main": False,
     "title": "HPSv3 ↑"},))
class HPSv3(Metric):
    """HPSv3 (Qwen2-VL reward model): declared with its loading contract; refused by ``check`` until its scoring input
    (instruction, reward token) is reproduced from the authors' code (see the module docstring)."""

    width = 1
    Config = HPSv3Config

    @classmethod
    def check(cls, prompts, where, evaluators_kind, config=None):
        require_file("hpsv3", "path", (config or HPSv3Config()).path, "HPSv3 (Qwen2-VL)", directory=True)
        raise UserError("metric 'hpsv3' is declared but not measured: its scoring prompt and reward token are not "
                        "reproduced from the authors' code yet (and it is GPU-tier, a 7B vision-language model); "
                        "remove \"hpsv3\" from metrics (use hpsv2, pickscore or image_reward)")

    def setup(self):
        if torch.device(self.evaluators.device).type == "cpu":
            raise UserError("metric 'hpsv3' is GPU-tier (a 7B vision-language model) and the evaluators run on the CPU; "
                            "remove \"hpsv3\" from metrics or run on a GPU")

    def per_sample(self, images, prompts):
        raise NotImplementedError("hpsv3 is refused by check(); see bench/metrics/hpsv3.py")

    def compute(self, values):
        raise NotImplementedError("hpsv3 is refused by check(); see bench/metrics/hpsv3.py")
