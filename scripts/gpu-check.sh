#!/usr/bin/env bash
# The GPU check: what only a CUDA device can show, in one prepared call (no downloads; about 8 minutes on one
# H100/H200, each step timed into $OUT/steps.tsv). Every step runs even when an earlier one fails; the exit status
# says whether all passed.
#   bash scripts/gpu-check.sh            on a CUDA machine:
#     1. the CUDA tests (tests/test_cuda.py: every method and family on the device, bf16, compile, NCCL);
#     2. Dist's collectives on NCCL under torchrun, one process per GPU (bench.gpucheck collectives);
#     3. the smoke suite on CUDA (seeds 0, 1) filed as the gate's reference of this GPU model
#        (results/reference/gate/<key>/: commit it; docs/gpu-ci.md);
#     4. real-sized SDXL and FLUX.1-dev pipelines with random weights in bf16 through the run's own code: latency by
#        stage at 1, 4 and 25 steps, throughput, peak memory against the memory plan, compiled against eager
#        (bench.gpucheck arch) into results/reference/gpu-check/figures.{json,md}.
#   bash scripts/gpu-check.sh --dry-run  the same steps tiny on a CPU (gloo for NCCL, scaled-down archs in fp32),
#                                        into a temporary folder: what CI and a fresh clone check.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 )}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
status=0
step() {  # step NAME CMD...: run, time and record it; a failure is reported and remembered, the next step still runs
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name" >&2
  if "$@"; then r=ok; else r=FAILED; status=1; fi
  printf '%s\t%s\t%ss\n' "$name" "$r" "$((SECONDS - t0))" | tee -a "$OUT/steps.tsv" >&2
}
if [ "${1:-}" = "--dry-run" ]; then
  OUT=$(mktemp -d)
  step "cuda tests (collected; skipped without CUDA)" "$PY" -m pytest -q -m cuda tests/test_cuda.py
  step "collectives (2 processes, gloo)" "$PY" -m torch.distributed.run --nproc_per_node 2 -m bench.gpucheck collectives
  step "smoke suite plan" "$PY" -m bench run smoke --dry-run --out "$OUT/smoke"
  step "archs (tiny, fp32)" "$PY" -m bench.gpucheck arch --tiny --device cpu --dtype fp32 --batch 2 --repeats 1 \
    --out "$OUT/gpu-check"
  cat "$OUT/gpu-check/figures.md" 2>/dev/null
  exit $status
fi
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: use --dry-run on a CPU')" || exit 2
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
NGPU=$(nvidia-smi -L | wc -l)
OUT=results/reference/gpu-check
mkdir -p "$OUT" && : > "$OUT/steps.tsv"
step "cuda tests" env FLASHBENCH_DEVICE=cuda "$PY" -m pytest -q -m cuda tests/test_cuda.py
step "collectives ($NGPU processes, nccl)" "$PY" -m torch.distributed.run --nproc_per_node "$NGPU" -m bench.gpucheck collectives
rm -rf "$OUT/smoke"
step "smoke suite on CUDA" "$PY" -m bench run smoke --device cuda --seeds 0,1 --out "$OUT/smoke" --no-progress
step "gate reference" "$PY" -m bench baseline "$OUT/smoke" --store results/reference/gate --device-class "$GPU" --bootstrap
step "real-sized archs" "$PY" -m bench.gpucheck arch --device cuda --dtype bf16 --out "$OUT"
cat "$OUT/figures.md" 2>/dev/null
exit $status
