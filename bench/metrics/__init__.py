"""Metrics as accumulators with their protocol attached (torchmetrics style).

``update()`` per batch on each process keeps per-sample values (float64 scalars, or FID features),
never images; ``compute()`` on process 0 after the values are gathered in sample order gives each
metric with a bootstrap CI. A cell therefore holds at most one batch of images, whatever the
number of prompts. Evaluator networks sit behind ``evaluators.Evaluators``.
"""
