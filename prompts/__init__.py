"""Prompt sets: the shipped shapes-world evaluation sets and loaders for PartiPrompts, GenEval and caption files."""

from prompts.loaders import Prompt, PromptFileError, load_prompts, prompt_sets

__all__ = ["Prompt", "PromptFileError", "load_prompts", "prompt_sets"]
