"""Latency, throughput and memory of the sampler, by stage.

What is timed: one ``method.sample`` call — text encoding, drawing the starting noise, every network
evaluation of the sampler, and the map to images in [0, 1] (VAE decode for latent teachers) —
nothing else (no metrics, no I/O). Warm-up calls first (for a compiled UNet: compilation happens
there, outside the timing), then the median and inter-quartile range of repeated calls; CUDA is
synchronised around each call and each stage. Stages are timed inside the same calls: text
encoding and decoding by wrapping the backbone's ``encode_text`` and ``to_images``; the denoising
loop is the rest (noise, every network evaluation, the solver), also given per step.

Memory: peak accelerator memory (``torch.cuda.max_memory_allocated``) of the timed calls, and the
peak host resident memory of a whole cell (``cell_memory``: Linux's VmHWM, reset per cell).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from methods.backbone import compiled_mode


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
    return {"median_s": float(med), "iqr_s": float(q3 - q1), "repeats": repeats, "warmup": warmup, "all_s": times}


@contextlib.contextmanager
def stage_timer(backbone, device: str):
    """Accumulates seconds spent in the backbone's encode_text and to_images while active: yields the dict."""
    spent = {"text": [], "decode": []}
    originals = {"text": backbone.encode_text, "decode": backbone.to_images}

    def timed(stage):
        fn = originals[stage]

        def wrapper(*a, **k):
            _sync(device)
            t0 = time.perf_counter()
            out = fn(*a, **k)
            _sync(device)
            spent[stage].append(time.perf_counter() - t0)
            return out

        return wrapper

    backbone.encode_text, backbone.to_images = timed("text"), timed("decode")
    try:
        yield spent
    finally:
        del backbone.encode_text, backbone.to_images  # the class's methods again


def measure(method, prompts, steps: int, batch: int, device: str = "cpu", warmup: int = 2, repeats: int = 7) -> dict:
    """Per-image latency at batch 1 (ms, whole and by stage), throughput at batch `batch` (images/s), and peak
    accelerator memory (MB) at `steps` sampler steps. With a compiled UNet, also the eager latency."""
    load = machine_load()
    p1 = prompts[:1]
    pb = (prompts * (batch // max(1, len(prompts)) + 1))[:batch]
    one_call = lambda: method.sample([p.text for p in p1], [(p.id, 0) for p in p1], steps)  # noqa: E731
    cuda = str(device).startswith("cuda")
    with method.unpadded():
        for _ in range(warmup):
            one_call()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with stage_timer(method.backbone, device) as spent:
            one = time_call(one_call, device, 0, repeats)
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
        many = time_call(lambda: method.sample([p.text for p in pb], [(p.id, 0) for p in pb], steps), device,
                         1, max(2, repeats // 2))
        eager = None
        compiled = [compiled_mode(net) for net in method.networks()]
        if any(compiled):
            with torch.compiler.set_stance("force_eager"):
                eager = time_call(one_call, device, 1, repeats)
    text = float(np.median(spent["text"])) if spent["text"] else 0.0
    decode = float(np.median(spent["decode"])) if spent["decode"] else 0.0
    denoise = max(0.0, one["median_s"] - text - decode)
    out = {
        "latency_ms": 1000 * one["median_s"],
        "latency_iqr_ms": 1000 * one["iqr_s"],
        "latency_text_ms": 1000 * float(text),
        "latency_denoise_ms": 1000 * denoise,
        "latency_step_ms": 1000 * denoise / steps,
        "latency_decode_ms": 1000 * float(decode),
        "throughput": batch / many["median_s"],
        "throughput_batch": batch,
        "peak_accelerator_mb": peak,
        "latency_protocol": {"warmup": warmup, "repeats": repeats, "timed": "method.sample (text encoding, noise, "
                             "all network evaluations, decode to [0,1]); stages by wrapping encode_text and "
                             "to_images, denoise = the rest", "threads": torch.get_num_threads(),
                             "compiled": compiled},
    }
    if eager is not None:
        out["latency_eager_ms"] = 1000 * eager["median_s"]
    out.update(latency_load_average=load["load_average_1m"], latency_other_load=load["other_load"])
    if load["loaded"] and not cuda:
        print(f"warning: latency of {method.name} at {steps} steps measured on a loaded machine (1-min load average "
              f"{load['load_average_1m']:.1f} on {load['cpus']} CPUs, {load['other_load']:.1f} beyond this run's "
              f"{load['threads']} threads): its latency and throughput are not comparable with an idle machine's",
              file=sys.stderr, flush=True)
    return out


def machine_load() -> dict:
    """The CPU load around a measurement: Linux's 1-minute load average, the CPUs, this process's torch threads, the
    load beyond them (``other_load`` = load − min(threads, CPUs), ≥ 0) and ``loaded``: other work held at least half
    a CPU, so CPU timings share the machine (None values where the platform has no load average)."""
    cpus, threads = os.cpu_count() or 1, torch.get_num_threads()
    try:
        load1 = os.getloadavg()[0]
    except (OSError, AttributeError):
        return {"load_average_1m": None, "other_load": None, "cpus": cpus, "threads": threads, "loaded": False}
    other = max(0.0, load1 - min(threads, cpus))
    return {"load_average_1m": round(load1, 2), "other_load": round(other, 2), "cpus": cpus, "threads": threads,
            "loaded": other >= 0.5}


@contextlib.contextmanager
def cell_memory(device: str = "cpu"):
    """Peak memory (MB) while active: host resident memory as Linux's VmHWM reset at entry (``peak_rss_mb``: None
    where /proc cannot reset or read it), and on CUDA the accelerator's peak allocation from entry
    (``peak_accelerator_sample_mb``, ``torch.cuda.max_memory_allocated``; None elsewhere). Yields a dict filled at exit.
    The runner wraps a cell's sampling with it, after the previous method was released: the peak is this row's."""
    out = {"peak_rss_mb": None, "peak_accelerator_sample_mb": None}
    status, clear = Path("/proc/self/status"), Path("/proc/self/clear_refs")
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        clear.write_text("5")  # resets VmHWM to the current RSS
        ok = True
    except OSError:
        ok = False
    try:
        yield out
    finally:
        if cuda:
            out["peak_accelerator_sample_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        if ok:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    out["peak_rss_mb"] = round(int(line.split()[1]) / 1024, 1)
