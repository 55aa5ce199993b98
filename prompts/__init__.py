"""Prompt sets: the shipped shapes-world sets and loaders for PartiPrompts, GenEval and caption files."""

from prompts.loaders import Obj, Prompt, PromptFileError, load_prompts, prompt_sets

__all__ = ["Obj", "Prompt", "PromptFileError", "load_prompts", "prompt_sets"]
