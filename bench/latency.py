"""Latency and throughput of a whole sample call.

What is timed: text encoding, drawing the starting noise, every network evaluation of the sampler
and the map to images in [0, 1] — one ``method.sample`` call, nothing else (no metrics, no I/O).
Warm-up calls first, then the median and inter-quartile range of repeated calls; CUDA is
synchronised before and after each call.
"""

from __future__ import annotations

import time

import numpy as np
import torch


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn, device: str = "cpu", warmup: int = 2, repeats: int = 7) -> dict:
    """Median and IQR (seconds) of `repeats` calls of fn after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    t = np.asarray(times)
    q1, med, q3 = np.percentile(t, [25, 50, 75])
    return {"median_s": float(med), "iqr_s": float(q3 - q1), "repeats": repeats, "warmup": warmup}


def measure(method, prompts, steps: int, batch: int, device: str = "cpu", warmup: int = 2, repeats: int = 7) -> dict:
    """Per-image latency at batch 1 (ms) and throughput at batch `batch` (images/s) at `steps` sampler steps."""
    p1 = prompts[:1]
    pb = (prompts * (batch // max(1, len(prompts)) + 1))[:batch]
    with method.unpadded():
        one = time_call(lambda: method.sample([p.text for p in p1], [(p.id, 0) for p in p1], steps), device,
                        warmup, repeats)
        many = time_call(lambda: method.sample([p.text for p in pb], [(p.id, 0) for p in pb], steps), device,
                         1, max(2, repeats // 2))
    return {
        "latency_ms": 1000 * one["median_s"],
        "latency_iqr_ms": 1000 * one["iqr_s"],
        "throughput": batch / many["median_s"],
        "throughput_batch": batch,
        "latency_protocol": {"warmup": warmup, "repeats": repeats, "timed": "method.sample (text encoding, noise, "
                             "all network evaluations, decode to [0,1])", "threads": torch.get_num_threads()},
    }
