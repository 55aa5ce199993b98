#!/usr/bin/env bash
# The GPU check, prepared to run in under 10 minutes on a CUDA machine with the project's venv:
#   bash scripts/gpu-check.sh            the test suite's CUDA tests; the smoke suite on CUDA into
#                                        results/reference/smoke-cuda with its tolerances (the GPU
#                                        workflow's quality gate); real-sized SD 1.5 / SDXL UNets timed in
#                                        bf16 into results/reference/gpu-check
#   bash scripts/gpu-check.sh --dry-run  the same steps on the CPU, tiny: what CI runs (no results written
#                                        into the repository)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 )}
if [ "${1:-}" = "--dry-run" ]; then
  out=$(mktemp -d)
  "$PY" -m pytest -q -m cuda tests/test_cuda.py          # skipped without CUDA: proves the file collects
  "$PY" -m bench run smoke --dry-run --out "$out/smoke" > /dev/null
  "$PY" -m bench.gpucheck --tiny --device cpu --dtype bf16 --out "$out/gpu-check"
  cat "$out/gpu-check/figures.md"
  exit 0
fi
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: use --dry-run on a CPU')"
FLASHBENCH_DEVICE=cuda "$PY" -m pytest -q -m cuda tests/test_cuda.py
rm -rf results/reference/smoke-cuda
"$PY" -m bench run smoke --device cuda --out results/reference/smoke-cuda --no-progress
"$PY" -m bench baseline results/reference/smoke-cuda
"$PY" -m bench.gpucheck --device cuda --dtype bf16 --out results/reference/gpu-check
cat results/reference/gpu-check/figures.md
