#!/usr/bin/env bash
# One prepared script for a lent GPU (H100/H200), run once, in at most 8 minutes including the
# build, that loses nothing:
#   bash benchmarks/gpu_check.sh                   # on the device: writes under $OUT
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh   # the same steps on this CPU, tiny sizes (tests/test_gpu_check_dry.py)
#
# Steps, in order (each has a time budget, cut to what is left of GPU_CHECK_BUDGET_S):
#   machine                  GPU, driver, torch/triton/diffusers versions -> part "machine"
#   wheels                   pip install the wheels of a carried .whl/ folder (the device has no network)
#   install                  pip install -e . without building invdiff._C (seconds), so the
#                            Triton steps can start while the extension builds
#   triton_gate              STOP unless the Triton backend is live on CUDA (a real launch)
#   build                    invdiff._C with CUDA for sm_90, in the background; its full log is
#                            appended to this log when it ends -> part "build"
#   correctness_triton       Triton kernels vs the reference (gpu_correctness.py --only triton)
#   interpreter_suite        the interpreter-tested suite on CUDA: pytest tests/kernels tests/ops,
#                            Hypothesis capped at 8 examples, without tests/ops/test_guided_step.py
#                            (CPU tensors only, and it needs _C: `make test` runs it; the CUDA step
#                            is correctness_guided_step's)
#   cuda_gate                waits for the build; STOP unless invdiff._C reports CUDA and runs there
#   correctness_guided_step  the CUDA guided step vs the reference (every flag combination, ...)
#   invariant_loss, guided_step   kernel benchmarks, fp32 and bf16, B = 16, 64, 1024
#   e2e_train, e2e_sample    SD-1.5-shaped UNet (random weights, 64x64 latents): training at B = 8
#                            and 32, sampling 32 images
#   guidance_combine         the combine and CFG kernels' benchmark (last: the least needed)
#   merge, summary           results.json (every part, keyed by name) and summary.txt
# The order is the priority: when the budget runs out, the steps left are reported as
# "no time left" (a failure), never silently dropped.
# $OUT gets exactly three files: gpu_check.log (everything printed, tracebacks and the build log
# included), results.json and summary.txt; sub-steps write into a temporary folder. The exit
# status is non-zero if any step failed or was cut for time; later steps still run after a failed
# one, except after a failed gate, where only merge and summary do.
#
# Environment:
#   OUT                  where the three files go (default /tmp/invdiff_gpu)
#   PYTHON               the interpreter (default python3; in the dry run .venv/bin/python if present)
#   GPU_CHECK_DRY=1      CPU dry run: Triton interpreter, tiny sizes, no wheels/install/build/CUDA
#                        gates (the installed package in .venv is used); each benchmark in --dry mode
#   GPU_CHECK_BUDGET_S   the whole script's time budget in seconds (default 460; dry 300)
#   GPU_CHECK_ONLY       run only these steps (space- or comma-separated names); merge and summary always run
#   GPU_CHECK_SKIP_E2E=1 leave out e2e_train and e2e_sample
#   GPU_CHECK_DRY_FAIL   (dry run only) make the named step fail, to test that the exit status shows it
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"
START=$(date +%s)
DRY="${GPU_CHECK_DRY:-0}"
OUT="${OUT:-/tmp/invdiff_gpu}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
# Everything from here on, stdout and stderr of every step, goes to the terminal and the log.
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

if [[ "$DRY" == "1" ]]; then
  DEFAULT_PY=python3
  [[ -x "$REPO/.venv/bin/python" ]] && DEFAULT_PY="$REPO/.venv/bin/python"
  PY="${PYTHON:-$DEFAULT_PY}"
  BUDGET="${GPU_CHECK_BUDGET_S:-300}"
  # The interpreter runs the Triton kernels on CPU tensors (each step forces INVDIFF_BACKEND=triton
  # where it means to: dispatch never picks the interpreter by itself).
  export TRITON_INTERPRET=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
  PY="${PYTHON:-python3}"
  BUDGET="${GPU_CHECK_BUDGET_S:-460}"
fi
DEADLINE=$((START + BUDGET))
RESERVE=20  # seconds kept for merge and summary
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
STEPS_TSV="$WORK/steps.tsv"
: >"$STEPS_TSV"
FAILED=()
STOPPED=""   # set by a failed gate: the remaining steps are skipped
declare -A BG_PID BG_T0 BG_BUDGET  # background steps (start_bg), by name

finish() {
  local rc=$?
  local pid
  for pid in "${BG_PID[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
  # Close our end of the tee and wait for it, so the log is complete when the caller reads it.
  exec 1>&- 2>&-
  wait "$TEE_PID" 2>/dev/null || true
  exit "$rc"
}
trap finish EXIT

banner() { echo; echo "=== $* ($(date -u +%H:%M:%S), $(( $(date +%s) - START ))s in)"; }

selected() {  # selected NAME: whether GPU_CHECK_ONLY (if set) names this step
  [[ -z "${GPU_CHECK_ONLY:-}" ]] && return 0
  [[ " ${GPU_CHECK_ONLY//,/ } " == *" $1 "* ]]
}

record() {  # record NAME STATUS SECONDS NOTE
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$STEPS_TSV"
  if [[ "$2" != "ok" && "$2" != "skipped" ]]; then
    FAILED+=("$1 ($2${4:+: $4})")
  fi
}

# run_step NAME BUDGET_S COMMAND...: run COMMAND under `timeout`, its budget cut to the time left
# before the deadline; record ok / failed (exit N) / timed out / no time left. Never aborts the
# script: the exit status at the end reports every failed step.
run_step() {
  local name=$1 budget=$2
  shift 2
  if ! selected "$name"; then return 0; fi
  if [[ -n "$STOPPED" ]]; then
    record "$name" skipped 0 "after $STOPPED"
    return 0
  fi
  local left=$((DEADLINE - RESERVE - $(date +%s)))
  if ((left < 5)); then
    banner "$name: no time left in the ${BUDGET}s budget"
    record "$name" "no time left" 0 ""
    return 0
  fi
  ((budget > left)) && budget=$left
  banner "$name (budget ${budget}s)"
  if [[ "$DRY" == "1" && "${GPU_CHECK_DRY_FAIL:-}" == "$name" ]]; then
    set -- bash -c "echo 'GPU_CHECK_DRY_FAIL=$name: failing this step on purpose' >&2; exit 3"
  fi
  local t0 rc=0
  t0=$(date +%s)
  timeout --kill-after=10 "$budget" "$@" || rc=$?
  record_exit "$name" "$rc" $(($(date +%s) - t0)) "$budget"
}

record_exit() {  # record_exit NAME EXIT_STATUS SECONDS BUDGET_S
  local name=$1 rc=$2 took=$3 budget=$4
  if ((rc == 0)); then
    record "$name" ok "$took" ""
  elif ((rc == 124 || rc == 137)); then
    echo "FAIL $name: timed out after ${budget}s"
    record "$name" "timed out" "$took" "after ${budget}s"
  else
    echo "FAIL $name: exit $rc"
    record "$name" failed "$took" "exit $rc"
  fi
}

# start_bg NAME BUDGET_S COMMAND...: as run_step, but COMMAND runs in the background with its
# output kept in a file of its own (so it does not interleave with the steps running meanwhile);
# finish_bg NAME waits for it, appends that output to the log in one piece, and records it.
start_bg() {
  local name=$1 budget=$2
  shift 2
  if ! selected "$name"; then return 0; fi
  if [[ -n "$STOPPED" ]]; then
    record "$name" skipped 0 "after $STOPPED"
    return 0
  fi
  local left=$((DEADLINE - RESERVE - $(date +%s)))
  if ((left < 5)); then
    record "$name" "no time left" 0 ""
    return 0
  fi
  ((budget > left)) && budget=$left
  banner "$name (budget ${budget}s) starts in the background; its output follows when it ends"
  if [[ "$DRY" == "1" && "${GPU_CHECK_DRY_FAIL:-}" == "$name" ]]; then
    set -- bash -c "echo 'GPU_CHECK_DRY_FAIL=$name: failing this step on purpose' >&2; exit 3"
  fi
  BG_T0[$name]=$(date +%s)
  BG_BUDGET[$name]=$budget
  timeout --kill-after=10 "$budget" "$@" >"$WORK/$name.out" 2>&1 </dev/null &
  BG_PID[$name]=$!
}

finish_bg() {
  local name=$1
  [[ -n "${BG_PID[$name]:-}" ]] || return 0
  local rc=0
  wait "${BG_PID[$name]}" || rc=$?
  unset "BG_PID[$name]"
  local took=$(($(date +%s) - ${BG_T0[$name]}))
  banner "$name ended (exit $rc after ${took}s); its full output:"
  cat "$WORK/$name.out"
  echo "----- end of $name's output"
  record_exit "$name" "$rc" "$took" "${BG_BUDGET[$name]}"
}

step_ok() {  # step_ok NAME: whether NAME's last record is ok
  [[ "$(awk -F'\t' -v n="$1" '$1 == n {s = $2} END {print s}' "$STEPS_TSV")" == "ok" ]]
}

gate() {  # gate NAME MESSAGE: after a gate step, STOP the remaining steps if it did not pass
  if selected "$1" && [[ -z "$STOPPED" ]] && ! step_ok "$1"; then
    STOPPED="$1"
    banner "STOP: $2"
  fi
}

banner "gpu_check: dry=$DRY, python $PY, budget ${BUDGET}s, results in $OUT"
[[ "$DRY" == "1" ]] && echo "DRY RUN on the CPU: the Triton interpreter and tiny sizes; no timing below means anything."

# --------------------------------------------------------------------------- wheels
if [[ "$DRY" == "1" ]]; then
  echo "dry: no wheels, no install, no build: the package installed in .venv is used as it is"
elif compgen -G ".whl/*.whl" >/dev/null; then
  # Into a folder of their own on PYTHONPATH (the device README's way): nothing the image
  # ships is replaced, and a read-only site-packages does not matter.
  SITE="$WORK/site"
  run_step wheels 60 "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir \
    --disable-pip-version-check --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no .whl/ folder: using the packages the device already has (docs/kernels.md, 'The GPU check', says how to carry them)"
fi

# --------------------------------------------------------------------------- machine
run_step machine 60 "$PY" - "$WORK/machine.json" "$DRY" <<'PY'
import json, platform, subprocess, sys
from importlib import metadata
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "dry": sys.argv[2] == "1", "cuda_available": torch.cuda.is_available()}
for name in ("triton", "diffusers", "transformers", "huggingface_hub", "hypothesis"):
    try:  # metadata, not an import: importing transformers alone takes seconds
        info[name] = metadata.version(name)
    except metadata.PackageNotFoundError:  # a missing package is information, not a failure here
        info[name] = "missing"
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    info.update(device=torch.cuda.get_device_name(), sms=props.multi_processor_count, memory_gib=props.total_memory / 2**30)
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                             "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as err:
        info["nvidia_smi"] = f"failed: {err}"
else:
    info["device"] = "cpu"
print(json.dumps(info, indent=1))
json.dump(info, open(sys.argv[1], "w"), indent=1)
PY

# --------------------------------------------------------------------------- install
if [[ "$DRY" != "1" ]]; then
  # INVDIFF_SKIP_EXT=1: the Python package only (with invdiff.kernels); _C is built below. If
  # site-packages cannot be written, the source tree is used as it is: kernels/ is linked where
  # the package expects invdiff.kernels, and the repository root is on every step's sys.path.
  run_step install 90 bash -c '
    INVDIFF_SKIP_EXT=1 "$0" -m pip install --no-deps --no-build-isolation --no-index --disable-pip-version-check -e . \
      || { echo "pip install -e . failed: importing invdiff from the source tree instead"; ln -sfn ../kernels invdiff/kernels; }
    "$0" -c "import invdiff.kernels, invdiff.ops; print(\"invdiff imports from\", invdiff.__file__)"' "$PY"
  gate install "the package does not import; nothing below can run"
fi

# --------------------------------------------------------------------------- Triton gate
run_step triton_gate 90 "$PY" - "$DRY" <<'PY'
import os, sys
import torch
from invdiff import ops
dry = sys.argv[1] == "1"
for row in ops.backend_table():
    print(row)
triton_row = next(r for r in ops.backend_table() if r["backend"] == "triton")
if triton_row["available"] != "yes":
    sys.exit(f"the Triton backend is not available: {triton_row['available']}")
if not dry and not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device")
device = "cpu" if dry else "cuda"
os.environ["INVDIFF_BACKEND"] = "triton"  # forced: a declined input raises instead of falling back
x = torch.randn(2, 4, 8, 8, device=device)
out = ops.guidance_combine(x, x, 2.0)
torch.testing.assert_close(out, 3 * x)
print(f"Triton backend live on {device}: one combine launched and checked")
PY
gate triton_gate "the Triton backend is not live on CUDA (see above); no kernel result would mean anything"

# --------------------------------------------------------------------------- build (background)
# nvcc keeps a few CPU cores busy for a minute or two while the GPU would sit idle: the Triton
# correctness steps below use it meanwhile (no timing runs until the build has ended).
BUILD_T0=$(date +%s)
if [[ "$DRY" != "1" ]]; then
  # build_ext --inplace puts _C next to the sources, where the editable install finds it.
  start_bg build 300 env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
    "$PY" setup.py build_ext --inplace
fi

# --------------------------------------------------------------------------- Triton correctness and tests
if [[ "$DRY" == "1" ]]; then
  CORRECTNESS_ARGS=(--dry)
  SUITE=(tests/kernels/test_fuzz.py tests/ops/test_dispatch.py::test_backend_table_lists_triton_with_its_dtypes)
  MAX_EXAMPLES=1
else
  CORRECTNESS_ARGS=(--device cuda --size 64 --max-batch 256)
  SUITE=(tests/kernels tests/ops --ignore=tests/ops/test_guided_step.py)
  MAX_EXAMPLES=8
fi
# The suite and the targeted checks only compare numbers, so they share the GPU: the suite runs
# in the background next to correctness_triton (and the build).
start_bg interpreter_suite 150 env INVDIFF_HYPOTHESIS_MAX_EXAMPLES=$MAX_EXAMPLES "$PY" -m pytest -q -p no:cacheprovider \
  "${SUITE[@]}" --junitxml "$WORK/interpreter_suite.xml"
run_step correctness_triton 150 "$PY" benchmarks/gpu_correctness.py "${CORRECTNESS_ARGS[@]}" --only triton \
  --json "$WORK/correctness_triton.json"
finish_bg interpreter_suite

# --------------------------------------------------------------------------- CUDA gate
finish_bg build
[[ "$DRY" != "1" ]] && { cat invdiff/_build_info.json 2>/dev/null || echo "no invdiff/_build_info.json"; }
run_step cuda_gate 60 "$PY" - "$WORK/build.json" "$DRY" "$(($(date +%s) - BUILD_T0))" <<'PY'
import json, sys
import torch
from invdiff import _ext, ops
out, dry, seconds = sys.argv[1], sys.argv[2] == "1", float(sys.argv[3])
module, reason = _ext.extension()
info = {"build_info": _ext.build_metadata(), "backends": ops.backend_table(), "build_seconds": seconds,
        "extension": reason or "loaded"}
info["with_cuda"] = bool(module is not None and module.build_info()["with_cuda"])
json.dump(info, open(out, "w"), indent=1)
for row in info["backends"]:
    print(row)
if module is None:
    sys.exit(f"invdiff._C did not load: {reason}")
if dry:
    print("dry: invdiff._C loads (CPU build); the CUDA requirement is not checked")
    sys.exit(0)
if not info["with_cuda"]:
    sys.exit(f"invdiff._C was built without CUDA: {info['build_info']}")
from invdiff.sampling.step_coeffs import NUM_COEFFS
x = torch.randn(2, 4, 8, 8, device="cuda")
coeffs = torch.zeros(2, NUM_COEFFS, device="cuda")
ops.guided_step(x, None, x, None, None, coeffs)  # through dispatch: must pick cpp on CUDA
assert ops.select_backend("guided_step", [x, x], [coeffs]).name == "cpp", "dispatch does not pick invdiff._C on CUDA"
torch.cuda.synchronize()
print("invdiff._C runs on CUDA")
PY
gate cuda_gate "invdiff._C does not report CUDA (see the build log above); the fused step would fall back to PyTorch"

run_step correctness_guided_step 60 "$PY" benchmarks/gpu_correctness.py "${CORRECTNESS_ARGS[@]}" --only guided_step \
  --json "$WORK/correctness_guided_step.json"

# --------------------------------------------------------------------------- benchmarks and e2e, by priority
if [[ "$DRY" == "1" ]]; then
  BENCH_ARGS=(--dry --batches 2 --size 4 --dtypes bf16)
else
  # forward and full: the backward alone is about full minus forward, and the minutes are few.
  BENCH_ARGS=(--device cuda --batches 16 64 1024 --size 64 --dtypes fp32 bf16 --modes forward full)
fi
run_step invariant_loss 110 "$PY" benchmarks/bench_invariant_loss.py "${BENCH_ARGS[@]}" --json "$WORK/invariant_loss.json"
run_step guided_step 100 "$PY" benchmarks/bench_guided_step.py "${BENCH_ARGS[@]}" --json "$WORK/guided_step.json"

if [[ "${GPU_CHECK_SKIP_E2E:-0}" == "1" ]]; then
  echo "e2e skipped: GPU_CHECK_SKIP_E2E=1"
  record e2e_train skipped 0 "GPU_CHECK_SKIP_E2E=1"
  record e2e_sample skipped 0 "GPU_CHECK_SKIP_E2E=1"
elif [[ "$DRY" == "1" ]]; then
  run_step e2e_train 90 "$PY" benchmarks/e2e_train.py --dry --json "$WORK/e2e_train.json"
  run_step e2e_sample 60 "$PY" benchmarks/e2e_sample.py --config small --images 2 --batch 2 --steps 1 --device cpu \
    --json "$WORK/e2e_sample.json"
else
  # Each e2e_train provider runs in a process of its own that builds the 860M-parameter UNet:
  # 3 timed steps and the bank build timed on 32 samples keep it inside its budget.
  run_step e2e_train 140 "$PY" benchmarks/e2e_train.py --config sd15 --batches 8 32 --steps 3 --bank-measure 32 \
    --device cuda --json "$WORK/e2e_train.json"
  run_step e2e_sample 80 "$PY" benchmarks/e2e_sample.py --config sd15 --images 32 --batch 16 --steps 20 --device cuda \
    --json "$WORK/e2e_sample.json"
fi
run_step guidance_combine 70 "$PY" benchmarks/bench_guidance_combine.py "${BENCH_ARGS[@]}" --json "$WORK/guidance_combine.json"

# --------------------------------------------------------------------------- merge and summary
for name in "${!BG_PID[@]}"; do finish_bg "$name"; done  # none, unless a gate stopped the run early
banner "merge: $OUT/results.json"
PARTS=()
for part in machine build correctness_triton correctness_guided_step invariant_loss guided_step guidance_combine \
  e2e_train e2e_sample; do
  PARTS+=("$part=$WORK/$part.json")
done
PARTS+=("interpreter_suite=$WORK/interpreter_suite.xml")
DRY_FLAG=()
[[ "$DRY" == "1" ]] && DRY_FLAG=(--dry)
merge_rc=0
"$PY" benchmarks/gpu_summary.py merge --out "$OUT/results.json" --steps "$STEPS_TSV" "${DRY_FLAG[@]}" "${PARTS[@]}" \
  || merge_rc=$?
((merge_rc == 0)) || FAILED+=("merge (a part reports failures its step's exit status did not show; see 'problem:' above)")
banner "summary: $OUT/summary.txt"
"$PY" benchmarks/gpu_summary.py table "$OUT/results.json" --out "$OUT/summary.txt" || FAILED+=("summary (exit $?)")

echo
if ((${#FAILED[@]})); then
  echo "gpu_check FAILED after $(( $(date +%s) - START ))s; failed steps:"
  printf '  %s\n' "${FAILED[@]}"
  exit 1
fi
echo "gpu_check passed after $(( $(date +%s) - START ))s"
exit 0
