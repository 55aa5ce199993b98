"""flashbench: a benchmark and evaluation harness for few-step text-to-image diffusion distillation."""

import os as _os

# No network access at run time: model hubs are forced offline (weights come from local paths only).
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "DIFFUSERS_OFFLINE"):
    _os.environ.setdefault(_var, "1")

__version__ = "0.1.0"
