"""flashbench: a benchmark and evaluation harness for few-step text-to-image diffusion distillation."""

__version__ = "0.1.0"
