"""Seconds per FID bootstrap resample at real-scale shapes, on this machine: the figures in docs/protocols.md.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/bootstrap_timing.py --device cpu --resamples 20 \\
        --sizes 500x2048 1000x2048 5000x2048

For each n x d (samples x feature width, the reference as large as the generated set) it times
``resampled_fids`` (the kernel ``fid_kernel`` picks: Gram below about 1.58 d rows, covariance above) with the reference
resampled (paired) and held fixed: seconds per resample = (time of k resamples - time of the kernel's one-off
set-up: Gram matrices, the whole reference's covariance and Cholesky factor) / k, after an untimed warm-up;
then the extrapolated time of the protocol's 1000 resamples. Features are random (time does not depend on
values).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from bench.metrics.bootstrap import BOOTSTRAP
from bench.metrics.fid import DISTINCT, fid_kernel, resampled_fids


def seconds(fn, device: str) -> float:
    t0 = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def per_resample(gen: torch.Tensor, ref: torch.Tensor, reference: str, k: int, device: str) -> float:
    """Seconds per resample of ``resampled_fids`` over k resamples, the kernel's set-up left out."""
    seconds(lambda: resampled_fids(gen[:64], ref[:64], reference, 2, device), device)  # warm-up
    shift = ref.mean(0)
    setup = seconds(lambda: fid_kernel((gen - shift).to(device), (ref - shift).to(device)), device)
    return (seconds(lambda: resampled_fids(gen, ref, reference, k, device), device) - setup) / k


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--resamples", type=int, default=3, help="timed resamples per case")
    p.add_argument("--sizes", nargs="+", default=["1000x2048", "5000x2048", "30000x2048"], help="n x d")
    args = p.parse_args(argv)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {args.device}")
    print("| n | d | kernel | reference | s / resample | 1000 resamples (min) |")
    print("|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for size in args.sizes:
        n, d = map(int, size.split("x"))
        gen, ref = torch.rand(n, d, generator=g, dtype=torch.float64), torch.rand(n, d, generator=g, dtype=torch.float64)
        kernel = "Gram" if DISTINCT * n < d else "covariance"
        for reference in ("paired", "fixed"):
            per = per_resample(gen, ref, reference, args.resamples, args.device)
            print(f"| {n} | {d} | {kernel} | {reference} | {per:.3f} | {per * BOOTSTRAP / 60:.1f} |", flush=True)


if __name__ == "__main__":
    main()
