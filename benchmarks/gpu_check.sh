#!/usr/bin/env bash
# One prepared script for a lent GPU (H100/H200): build (invdiff._C with CUDA), check the Triton
# kernels and the CUDA guided step against the reference at SD-sized shapes, run the kernel and
# guided-step benchmarks, and print a short table last.
#   bash benchmarks/gpu_check.sh            # writes logs and JSON under $OUT (or /tmp/invdiff_gpu)
# Never run yet (no session has had a device). Budget: the build is a few minutes on 16 cores;
# every step has its own timeout. GPU_CHECK_SKIP_E2E=1 leaves out the diffusers-based end-to-end
# part (latent cache, e2e_train, e2e_sample) when the 15 device minutes are short.
# The device image has torch and triton but no diffusers and no network: the package is installed
# without dependencies, and only the kernel tests (which need neither) run there.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/invdiff_gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
status=0
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
date -u

step "build: pip install -e . (no deps, no index), invdiff._C with CUDA for sm_90"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
timeout 420 "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -3
cat invdiff/_build_info.json || true
"$PY" -c "import invdiff.ops as o; [print(r) for r in o.backend_table()]" || { echo "invdiff did not import"; exit 1; }

step "correctness at SD-sized shapes (B up to 256, 4x64x64)"
timeout 240 "$PY" benchmarks/gpu_correctness.py 2>&1 | tee "$OUT/correctness.log" || status=1

step "kernel tests on CUDA"
timeout 180 "$PY" -m pytest -q -p no:cacheprovider tests/kernels -k "not module_combine" 2>&1 | tail -5 | tee "$OUT/pytest.log" || status=1

step "bench_invariant_loss"
timeout 240 "$PY" benchmarks/bench_invariant_loss.py --batches 256 --dtypes bf16 fp32 --json "$OUT/invariant_loss.json" 2>"$OUT/invariant_loss.err" | tee "$OUT/invariant_loss.txt" || status=1

step "bench_guidance_combine"
timeout 180 "$PY" benchmarks/bench_guidance_combine.py --batches 256 --dtypes bf16 fp32 --json "$OUT/guidance_combine.json" 2>"$OUT/guidance_combine.err" | tee "$OUT/guidance_combine.txt" || status=1

step "bench_guided_step (fused CUDA step vs the eager chain)"
timeout 120 "$PY" benchmarks/bench_guided_step.py --batches 256 --dtypes bf16 fp32 --json "$OUT/guided_step.json" 2>"$OUT/guided_step.err" | tee "$OUT/guided_step.txt" || status=1

step "bench_latent_cache and the e2e comparison (SD 1.5-sized, random weights; need diffusers on the machine)"
if [[ "${GPU_CHECK_SKIP_E2E:-0}" == "1" ]]; then
  echo "skipped: GPU_CHECK_SKIP_E2E=1"
elif "$PY" -c "import diffusers, transformers" 2>/dev/null; then
  timeout 240 "$PY" benchmarks/bench_latent_cache.py --sd-sized --steps 5 --json "$OUT/latent_cache.json" 2>"$OUT/latent_cache.err" | tee "$OUT/latent_cache.txt" || status=1
  step "e2e_train / e2e_sample (SD 1.5-shaped UNet, random weights) against the official approach"
  timeout 300 "$PY" benchmarks/e2e_train.py --config sd15 --batches 8 32 --steps 5 --json "$OUT/e2e_train.json" 2>"$OUT/e2e_train.err" | tee "$OUT/e2e_train.txt" || status=1
  timeout 300 "$PY" benchmarks/e2e_sample.py --config sd15 --images 32 --batch 16 --steps 20 --json "$OUT/e2e_sample.json" 2>"$OUT/e2e_sample.err" | tee "$OUT/e2e_sample.txt" || status=1
else
  echo "skipped: diffusers is not installed on this machine (carry its wheel, see the device README)"
fi

"$PY" benchmarks/gpu_summary.py "$OUT"/invariant_loss.json "$OUT"/guidance_combine.json "$OUT"/guided_step.json || status=1
echo "gpu_check exit status: $status"
exit $status
