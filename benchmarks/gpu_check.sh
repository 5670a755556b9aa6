#!/usr/bin/env bash
# The prepared script for a lent GPU (H100/H200), in two calls that each fit one 480 s device
# command and lose nothing:
#   bash benchmarks/gpu_check.sh --call 1    # build, correctness, kernel timings (the goals)
#   bash benchmarks/gpu_check.sh --call 2    # e2e, and the combine kernels' timings
#   bash benchmarks/gpu_check.sh             # both in one run (--call all: your own machine)
#   bash benchmarks/gpu_check.sh --call 1 --plan   # print the steps and budgets; run nothing
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh   # the same steps on this CPU, tiny sizes (tests/test_gpu_check_dry.py)
# Through the device tool: `run` with command "bash benchmarks/gpu_check.sh --call 1",
# carry [".whl"], timeout_s 480; then at once, while the machine is still warm (30 s), the same
# with "--call 2". Each call stands alone: call 2 on a fresh machine installs and builds what it
# needs itself; on call 1's warm machine it reuses the install and the extension built from the
# same sources. benchmarks/RESULTS.md ("The GPU check") gives the exact calls and what to carry.
#
# Steps, in order. Every call starts with:
#   wheels                   pip install a carried .whl/ folder (the device has no network)
#   machine                  GPU, driver, package versions; FAILS if a package the later steps need
#                            is missing or does not import (diffusers: the guided-step benchmark,
#                            the e2e runs and the tests that train a tiny base)
#   install                  pip install -e . without building invdiff._C (seconds; reused if an
#                            earlier call on this machine did it)
# Call 1:
#   build (background)       invdiff._C with CUDA for sm_90, built outside the source tree and then
#                            moved into invdiff/ in one rename, so no step ever imports a half-written
#                            .so; FAILS if setup.py only warned -> part "build"
#   triton_gate              the Triton backend live on CUDA (a real launch)
#   correctness_triton       Triton kernels vs the reference (gpu_correctness.py --only triton)
#   interpreter_suite (bg)   pytest tests/kernels tests/ops on CUDA (Hypothesis capped at 8
#                            examples), a per-test timeout, one JSON line per finished test
#                            (benchmarks/pytest_live_report.py), so a cut suite keeps its results
#   invariant_loss           the fused loss's benchmark, B = 1024 first (the graded batch); it
#                            needs Triton, not _C, so it does not wait for the build
#   cuda_gate                waits for the build: invdiff._C loads, reports CUDA, runs there
#   correctness_guided_step  the CUDA guided step vs the reference
#   guided_step              the guided step's benchmark, B = 1024 first
# Call 2:
#   build (background)       only if no extension from these sources is in place (call 1's is reused)
#   triton_gate
#   e2e_train                SD-1.5-shaped UNet (random weights, 64x64 latents), training at B = 8, 32
#   e2e_debias               whole debias runs (max step + min step) vs the official pipeline, SD-1.5
#                            shape, 64 samples, 10 min steps at B = 8
#   cuda_gate
#   e2e_sample               sampling 32 images
#   guidance_combine         the combine and CFG kernels' benchmark (the least needed)
# Each call ends with merge and summary.
#
# Gates: a step runs only if the steps it needs passed (STEP_NEEDS below): a failed _C build
# skips cuda_gate and the steps that need invdiff._C (correctness_guided_step, guided_step,
# e2e_sample), and nothing else; a failed Triton gate skips the Triton steps. Other failures
# never stop a later step. The exit status is non-zero if any step failed, was skipped by a
# failed gate, or was cut for time.
#
# Time: each step has a budget (STEP_BUDGET below), cut to what is left of the call's budget
# (GPU_CHECK_BUDGET_S, default 450 s a call, 900 for both; 20 s of it kept for merge and
# summary). The budgets of each call add up, along its longest path (background steps beside
# the foreground ones), to at most its budget: tests/test_gpu_check_dry.py checks that from
# --plan. A step cut at its budget keeps what it measured: the benchmarks and gpu_correctness.py
# rewrite their JSON after every row or case, and the benchmarks stop starting rows shortly
# before their budget ends (GPU_CHECK_STEP_DEADLINE, set for every step): rows they did not
# reach are reported as such, and the graded rows (B = 1024, the loss's full step) come first.
# The benchmarks (ELASTIC_STEPS) may also use the time earlier steps left unused, never any
# later step's budget.
#
# $OUT gets exactly three files a call (the device returns at most 8): gpu_check.log (everything
# printed, tracebacks and the build log included), results.json and summary.txt, named
# gpu_check-call1.log, results-call1.json, summary-call1.txt etc. with --call 1 or 2, so that the
# two calls never overwrite each other. Sub-steps write into a temporary folder.
#
# Environment:
#   OUT                  where the files go (default /tmp/invdiff_gpu)
#   PYTHON               the interpreter (default python3; in the dry run .venv/bin/python if present)
#   GPU_CHECK_DRY=1      CPU dry run: Triton interpreter, tiny sizes, no wheels/install/build
#                        (the package installed in .venv is used); each benchmark in --dry mode
#   GPU_CHECK_BUDGET_S   the call's time budget in seconds (default 450 a call, 900 for both; dry 600)
#   GPU_CHECK_ONLY       run only these steps (space- or comma-separated names); merge and summary always run
#   GPU_CHECK_SKIP_E2E=1 leave out e2e_train, e2e_debias and e2e_sample
#   GPU_CHECK_DRY_FAIL   (dry run only) make the named step fail, to test what a failure skips and keeps
set -euo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SELF")/.."
REPO="$(pwd)"

CALL=all
PLAN=0
while (($#)); do
  case "$1" in
    --call) CALL="${2:-}"; shift; shift || true ;;
    --call=*) CALL="${1#--call=}"; shift ;;
    --plan) PLAN=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$SELF" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case "$CALL" in
  1 | 2 | all) ;;
  *) echo "gpu_check.sh: --call takes 1, 2 or all, not '$CALL'" >&2; exit 2 ;;
esac

# Each step's budget in seconds: the most it may take on an H200, cold caches included. Until a
# GPU run has timed them (the log's per-step seconds), these are estimates; a step that needs
# more is cut at its budget and keeps what it measured.
declare -A STEP_BUDGET=(
  [wheels]=20 [machine]=25 [install]=45 [build]=180 [triton_gate]=30
  [correctness_triton]=100 [interpreter_suite]=100 [invariant_loss]=80
  [cuda_gate]=20 [correctness_guided_step]=35 [guided_step]=60
  [e2e_train]=100 [e2e_debias]=60 [e2e_sample]=80 [guidance_combine]=50
)
# The steps a step needs to have passed (or not to have run in this call) before it runs.
declare -A STEP_NEEDS=(
  [build]="install" [triton_gate]="install"
  [correctness_triton]="install triton_gate" [interpreter_suite]="install triton_gate"
  [invariant_loss]="install triton_gate" [guidance_combine]="install triton_gate"
  [e2e_train]="install triton_gate" [e2e_debias]="install triton_gate" [cuda_gate]="install build"
  [correctness_guided_step]="install cuda_gate" [guided_step]="install cuda_gate"
  [e2e_sample]="install triton_gate cuda_gate"
)
STEP_ORDER=(wheels machine install build triton_gate correctness_triton interpreter_suite invariant_loss cuda_gate
  correctness_guided_step guided_step e2e_train e2e_debias e2e_sample guidance_combine)
# Steps that may also take the time earlier steps left unused, as long as every later step keeps
# its whole budget: the benchmarks, which stop starting rows before their time is up, so more
# time is more rows, never a hang that eats the call.
ELASTIC_STEPS=" invariant_loss guided_step e2e_train e2e_debias e2e_sample guidance_combine "
CALL_BUDGET_S=450  # a device call runs with timeout_s 480: 30 s for the start-up and the kill-after margin
RESERVE=20         # seconds of the budget kept for merge and summary

DRY="${GPU_CHECK_DRY:-0}"
if [[ "$DRY" == "1" ]]; then
  DEFAULT_PY=python3
  [[ -x "$REPO/.venv/bin/python" ]] && DEFAULT_PY="$REPO/.venv/bin/python"
  PY="${PYTHON:-$DEFAULT_PY}"
  # The interpreter on 2 shared cores, not the GPU's minutes: a budget of its own.
  BUDGET="${GPU_CHECK_BUDGET_S:-600}"
else
  PY="${PYTHON:-python3}"
  if [[ "$CALL" == "all" ]]; then
    BUDGET="${GPU_CHECK_BUDGET_S:-$((2 * CALL_BUDGET_S))}"
  else
    BUDGET="${GPU_CHECK_BUDGET_S:-$CALL_BUDGET_S}"
  fi
fi
SUFFIX=""
if [[ "$CALL" != "all" ]]; then SUFFIX="-call$CALL"; fi

if ((PLAN)); then
  # --plan: the steps this call would run, in order, with their budgets and commands; nothing
  # runs and nothing is written. Every gate passes, and what a real run decides on the machine
  # (a carried .whl/, an extension to reuse) takes the longer way.
  WORK="/tmp/gpu_check.PLAN"
  echo "plan call=$CALL budget=$BUDGET reserve=$RESERVE dry=$DRY"
else
  START=$(date +%s)
  OUT="${OUT:-/tmp/invdiff_gpu}"
  mkdir -p "$OUT"
  LOG="$OUT/gpu_check$SUFFIX.log"
  # Everything from here on, stdout and stderr of every step, goes to the terminal and the log.
  exec > >(tee -a "$LOG") 2>&1
  TEE_PID=$!
  DEADLINE=$((START + BUDGET))
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
  # This call's own plan (same options and environment): what the elastic steps leave to the
  # steps after them.
  PLAN_FILE="$WORK/plan.txt"
  bash "$SELF" --call "$CALL" --plan >"$PLAN_FILE"
fi
if [[ "$DRY" == "1" ]]; then
  # The interpreter runs the Triton kernels on CPU tensors (each step forces INVDIFF_BACKEND=triton
  # where it means to: dispatch never picks the interpreter by itself).
  export TRITON_INTERPRET=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
STEPS_TSV="$WORK/steps.tsv"
((PLAN)) || : >"$STEPS_TSV"
FAILED=()
declare -A BG_PID BG_T0 BG_BUDGET  # background steps (start_bg), by name

finish() {
  local rc=$?
  ((PLAN)) && exit "$rc"
  local pid
  # A background step still running (the script stopped early): its subshell's children (the
  # step's `timeout`, which passes the signal on) first, then the subshell.
  for pid in "${BG_PID[@]}"; do
    pkill -TERM -P "$pid" 2>/dev/null || true
    kill "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK"
  # Close our end of the tee and wait for it, so the log is complete when the caller reads it.
  exec 1>&- 2>&-
  wait "$TEE_PID" 2>/dev/null || true
  exit "$rc"
}
trap finish EXIT

banner() { echo; echo "=== $* ($(date -u +%H:%M:%S), $(($(date +%s) - START))s in)"; }

selected() {  # selected NAME: whether GPU_CHECK_ONLY (if set) names this step
  [[ -z "${GPU_CHECK_ONLY:-}" ]] && return 0
  [[ " ${GPU_CHECK_ONLY//,/ } " == *" $1 "* ]]
}

record() {  # record NAME STATUS SECONDS NOTE: STATUS other than ok or "left out" fails the call
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$STEPS_TSV"
  if [[ "$2" != "ok" && "$2" != "left out" ]]; then
    FAILED+=("$1 ($2${4:+: $4})")
  fi
}

passed() {  # passed NAME: NAME's last record is ok, or NAME has not run in this call
  [[ "$(awk -F'\t' -v n="$1" '$1 == n {s = $2} END {print (s == "" ? "ok" : s)}' "$STEPS_TSV")" == "ok" ]]
}

blocking_need() {  # blocking_need NAME: print the first step NAME needs that did not pass
  local need
  for need in ${STEP_NEEDS[$1]:-}; do
    if ! passed "$need"; then echo "$need"; return 0; fi
  done
  return 1
}

plan_line() {  # plan_line KIND NAME BUDGET COMMAND...
  local kind=$1 name=$2 budget=$3
  shift 3
  printf '%s %s %s ::' "$kind" "$name" "$budget"
  printf ' %q' "$@"
  echo
}

# needed_after NAME: the seconds the steps after NAME in this call's plan need if each takes its
# whole budget (the longest path, as tests/test_gpu_check_dry.py adds it up). A background step
# already running counts with all of its time still to go, from the end of NAME: an overestimate.
needed_after() {
  local running=() bg
  for bg in "${!BG_PID[@]}"; do
    running+=("$bg=$((BG_T0[$bg] + BG_BUDGET[$bg] - $(date +%s)))")
  done
  awk -v name="$1" -v running="${running[*]}" '
    BEGIN { n = split(running, pairs, " "); for (i = 1; i <= n; i++) { split(pairs[i], kv, "="); left[kv[1]] = kv[2] } }
    found && $1 == "fg" { t += $3 }
    found && $1 == "bg" { ends[$2] = t + $3 }
    found && $1 == "join" { e = ($2 in ends) ? ends[$2] : (($2 in left) ? left[$2] : 0); if (e > t) t = e }
    $1 == "fg" && $2 == name { found = 1 }
    END { print t + 0 }' "$PLAN_FILE"
}

# may_start NAME: whether NAME runs now; records it as skipped (a failed need, or
# GPU_CHECK_SKIP_E2E) or "no time left" when it does not. Sets BUDGET_NOW: its budget cut to the
# time left before the deadline, or for an elastic step (ELASTIC_STEPS) raised to all the time
# the steps after it do not need.
may_start() {
  local name=$1 blocker
  if blocker=$(blocking_need "$name"); then
    banner "$name: skipped, since $blocker did not pass"
    record "$name" skipped 0 "needs $blocker, which did not pass"
    return 1
  fi
  if [[ "${GPU_CHECK_SKIP_E2E:-0}" == "1" && "$name" == e2e_* ]]; then
    echo "$name left out: GPU_CHECK_SKIP_E2E=1"
    record "$name" "left out" 0 "GPU_CHECK_SKIP_E2E=1"
    return 1
  fi
  local left=$((DEADLINE - RESERVE - $(date +%s)))
  if ((left < 5)); then
    banner "$name: no time left in the ${BUDGET}s budget"
    record "$name" "no time left" 0 ""
    return 1
  fi
  BUDGET_NOW=${STEP_BUDGET[$name]}
  if [[ "$ELASTIC_STEPS" == *" $name "* ]]; then
    local spare=$((left - $(needed_after "$name")))
    ((spare > BUDGET_NOW)) && BUDGET_NOW=$spare
  fi
  ((BUDGET_NOW > left)) && BUDGET_NOW=$left
  return 0
}

# run_step NAME COMMAND...: run COMMAND under `timeout` with NAME's budget (STEP_BUDGET, cut to
# the time left), with GPU_CHECK_STEP_DEADLINE set to when that budget ends (Unix time: the
# benchmarks stop starting rows shortly before it); record ok / failed (exit N) / timed out / no
# time left / skipped. Never aborts the script.
run_step() {
  local name=$1
  shift
  selected "$name" || return 0
  if ((PLAN)); then plan_line fg "$name" "${STEP_BUDGET[$name]}" "$@"; return 0; fi
  may_start "$name" || return 0
  local budget=$BUDGET_NOW
  banner "$name (budget ${budget}s)"
  if [[ "$DRY" == "1" && "${GPU_CHECK_DRY_FAIL:-}" == "$name" ]]; then
    set -- bash -c "echo 'GPU_CHECK_DRY_FAIL=$name: failing this step on purpose' >&2; exit 3"
  fi
  local t0 rc=0
  t0=$(date +%s)
  timeout --kill-after=10 "$budget" env GPU_CHECK_STEP_DEADLINE=$((t0 + budget)) "$@" || rc=$?
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

# start_bg NAME COMMAND...: as run_step, but COMMAND runs in the background with its output kept
# in a file of its own (so it does not interleave with the steps running meanwhile); finish_bg
# NAME waits for it, appends that output to the log in one piece, and records it.
start_bg() {
  local name=$1
  shift
  selected "$name" || return 0
  if ((PLAN)); then plan_line bg "$name" "${STEP_BUDGET[$name]}" "$@"; BG_PID[$name]=plan; return 0; fi
  may_start "$name" || return 0
  local budget=$BUDGET_NOW
  banner "$name (budget ${budget}s) starts in the background; its output follows when it ends"
  if [[ "$DRY" == "1" && "${GPU_CHECK_DRY_FAIL:-}" == "$name" ]]; then
    set -- bash -c "echo 'GPU_CHECK_DRY_FAIL=$name: failing this step on purpose' >&2; exit 3"
  fi
  BG_T0[$name]=$(date +%s)
  BG_BUDGET[$name]=$budget
  # The end time is noted when the step ends, not when it is joined, so the step's seconds are its own.
  {
    rc=0
    timeout --kill-after=10 "$budget" env GPU_CHECK_STEP_DEADLINE=$((BG_T0[$name] + budget)) "$@" || rc=$?
    date +%s >"$WORK/$name.end"
    exit "$rc"
  } >"$WORK/$name.out" 2>&1 </dev/null &
  BG_PID[$name]=$!
}

finish_bg() {
  local name=$1
  [[ -n "${BG_PID[$name]:-}" ]] || return 0
  if ((PLAN)); then echo "join $name"; unset "BG_PID[$name]"; return 0; fi
  local rc=0
  wait "${BG_PID[$name]}" || rc=$?
  unset "BG_PID[$name]"
  local took=$(($(cat "$WORK/$name.end" 2>/dev/null || date +%s) - ${BG_T0[$name]}))
  banner "$name ended (exit $rc after ${took}s); its full output:"
  cat "$WORK/$name.out"
  echo "----- end of $name's output"
  record_exit "$name" "$rc" "$took" "${BG_BUDGET[$name]}"
}

gate() {  # gate NAME MESSAGE: after a gate step that did not pass, say which steps it skips
  ((PLAN)) && return 0
  selected "$1" || return 0
  passed "$1" && return 0
  local dependents=() step
  for step in "${STEP_ORDER[@]}"; do
    if [[ " ${STEP_NEEDS[$step]:-} " == *" $1 "* ]]; then dependents+=("$step"); fi
  done
  banner "STOP for the steps that need $1 (${dependents[*]}): $2; the others still run"
}

((PLAN)) || banner "gpu_check --call $CALL: dry=$DRY, python $PY, budget ${BUDGET}s, results in $OUT"
if [[ "$DRY" == "1" && "$PLAN" == "0" ]]; then
  echo "DRY RUN on the CPU: the Triton interpreter and tiny sizes; no timing below means anything."
fi

# =========================================================================== every call
# --------------------------------------------------------------------------- wheels
SITE="$WORK/site"
if [[ "$DRY" == "1" ]]; then
  ((PLAN)) || echo "dry: no wheels, no install, no build: the package installed in .venv is used as it is"
elif ((PLAN)) || compgen -G ".whl/*.whl" >/dev/null; then
  # Into a folder of their own on PYTHONPATH (the device README's way): nothing the image
  # ships is replaced, and a read-only site-packages does not matter.
  run_step wheels "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir \
    --disable-pip-version-check --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no .whl/ folder: using the packages the device already has (benchmarks/RESULTS.md, 'Prepare', says how to carry them)"
fi

# --------------------------------------------------------------------------- machine
run_step machine "$PY" - "$WORK/machine.json" "$DRY" <<'PY'
import json, platform, subprocess, sys
from importlib import metadata
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "dry": sys.argv[2] == "1", "cuda_available": torch.cuda.is_available()}
# What the later steps import. A package missing here would fail them one by one, minutes later,
# each with its own traceback: fail this step instead, with the list and the fix.
REQUIRED = ("triton", "diffusers", "transformers", "accelerate", "safetensors", "hypothesis", "pytest")
problems = []
for name in REQUIRED + ("huggingface_hub",):
    try:  # metadata, not an import: importing transformers alone takes seconds
        info[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        info[name] = "missing"
        if name in REQUIRED:
            problems.append(f"{name} is not installed")
try:  # diffusers' own requirements show only on import (the guided-step benchmark's schedulers, the e2e UNet)
    from diffusers import DDIMScheduler, UNet2DConditionModel  # noqa: F401
except Exception as err:
    problems.append(f"diffusers does not import: {type(err).__name__}: {err}")
info["problems"] = problems
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
if problems:
    sys.exit("missing or broken packages (the guided-step benchmark, the e2e runs and the tests that train a tiny base "
             "need them): " + "; ".join(problems) + ". Carry their wheels in .whl/ (benchmarks/RESULTS.md, 'Prepare').")
PY

# --------------------------------------------------------------------------- install
if [[ "$DRY" != "1" ]]; then
  # INVDIFF_SKIP_EXT=1: the Python package only (with invdiff.kernels); _C is built by `build`.
  # An earlier call on this machine's install is kept (reinstalling would also overwrite
  # invdiff/_build_info.json with "not built" next to the extension it built). If site-packages
  # cannot be written, the source tree is used as it is: kernels/ is linked where the package
  # expects invdiff.kernels, and the repository root is on every step's sys.path.
  run_step install bash -c '
    py=$0
    if (cd / && "$py" -c "import os, sys, invdiff.kernels; sys.exit(os.path.realpath(os.path.dirname(os.path.dirname(invdiff.__file__))) != os.path.realpath(sys.argv[1]))" "$PWD") 2>/dev/null; then
      echo "invdiff (with invdiff.kernels) already imports from this tree: an earlier call installed it"
    else
      INVDIFF_SKIP_EXT=1 "$py" -m pip install --no-deps --no-build-isolation --no-index --disable-pip-version-check -e . \
        || { echo "pip install -e . failed: importing invdiff from the source tree instead"; ln -sfn ../kernels invdiff/kernels; }
    fi
    "$py" -c "import invdiff.kernels, invdiff.ops; print(\"invdiff imports from\", invdiff.__file__)"' "$PY"
  gate install "the package does not import; nothing below can run"
fi

# --------------------------------------------------------------------------- build, Triton gate, CUDA gate (as functions: both calls use them)
# The build writes outside the source tree and moves the finished .so into invdiff/ with one
# rename(2): a step importing invdiff._C meanwhile (every Triton step imports invdiff) sees the
# old file or the new one, never a half-copied one, which `build_ext --inplace` risked. setup.py
# turns a failed build into a warning (invdiff then runs its reference path); here it is a
# failure. reuse: keep an extension built here from the same sources (call 2 after call 1).
BUILD_SCRIPT='
set -euo pipefail
py=$1 dest=$2 mode=$3
stamp=build/gpu_check_C.sources.sha256
sources=$(find setup.py csrc -type f -print0 | sort -z | xargs -0 cat | sha256sum | cut -d" " -f1)
if [[ $mode == reuse && -f $stamp && "$(cat "$stamp")" == "$sources" ]] &&
  "$py" -c "from invdiff import _ext; m, _ = _ext.extension(); raise SystemExit(0 if m is not None and m.build_info()[\"with_cuda\"] else 1)"; then
  echo "invdiff._C built here from these sources loads with CUDA: reused"
  exit 0
fi
rm -f "$stamp"
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
  "$py" setup.py build_ext --build-lib "$dest/lib" --build-temp "$dest/tmp"
"$py" - "$dest/lib/invdiff/_build_info.json" <<"EOF"
import json, sys
info = json.load(open(sys.argv[1]))
print("build info:", json.dumps(info, sort_keys=True))
if not info.get("built"):
    sys.exit("invdiff._C was not built: %s" % info.get("reason"))
if not info.get("with_cuda"):
    sys.exit("invdiff._C was built without CUDA: %s" % info.get("no_cuda_reason"))
EOF
built=("$dest"/lib/invdiff/_C*.so)
[[ ${#built[@]} == 1 && -f ${built[0]} ]] || { echo "expected one invdiff/_C*.so under $dest/lib, found: ${built[*]}"; exit 1; }
name=$(basename "${built[0]}")
cp "${built[0]}" "invdiff/.$name.partial"
mv -f "invdiff/.$name.partial" "invdiff/$name"
mkdir -p build && echo "$sources" >"$stamp"
echo "invdiff/$name in place (one rename)"
'
start_build() {  # start_build fresh|reuse
  if [[ "$DRY" == "1" ]]; then
    start_bg build "$PY" -c 'import torch, invdiff._C as c; print("dry: nothing is built; the installed", c.__file__, "is used")'
  else
    start_bg build bash -c "$BUILD_SCRIPT" build "$PY" "$WORK/ext" "$1"
  fi
}

triton_gate() {
  run_step triton_gate "$PY" - "$DRY" <<'PY'
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
  gate triton_gate "the Triton backend is not live on CUDA (see above); no Triton result would mean anything"
}

cuda_gate() {
  finish_bg build
  run_step cuda_gate "$PY" - "$WORK/build.json" "$DRY" <<'PY'
import json, sys
import torch
from invdiff import _ext, ops
out, dry = sys.argv[1], sys.argv[2] == "1"
module, reason = _ext.extension()
info = {"build_info": _ext.build_metadata(), "backends": ops.backend_table(), "extension": reason or "loaded"}
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
  gate cuda_gate "invdiff._C does not load with CUDA (see the build log above); the fused step would fall back to PyTorch"
}

if [[ "$DRY" == "1" ]]; then
  CORRECTNESS_ARGS=(--dry)
  SUITE=(tests/kernels/test_fuzz.py tests/ops/test_dispatch.py::test_backend_table_lists_triton_with_its_dtypes)
  MAX_EXAMPLES=1
  PER_TEST_TIMEOUT=120
  BENCH_ARGS=(--dry --batches 2 --size 4 --dtypes bf16)
else
  CORRECTNESS_ARGS=(--device cuda --size 64 --max-batch 256)
  SUITE=(tests/kernels tests/ops --ignore=tests/ops/test_guided_step.py)
  MAX_EXAMPLES=8
  PER_TEST_TIMEOUT=30
  # B = 1024 first, and the loss's full step (forward + backward) before its forward: the goals
  # are graded there (at 16 and 64 the launches, not the bytes, bound the step), and a benchmark
  # cut short keeps its first rows. No backward alone: it is about full minus forward, and the
  # minutes are few. (The guided step has one mode, forward.)
  BENCH_ARGS=(--device cuda --batches 1024 64 16 --size 64 --dtypes fp32 bf16 --modes full forward)
fi
# The fused kernel first at each point, then eager, then torch.compile, whose first graph of each
# shape is the slowest row (a cold Inductor compile): a benchmark cut short still has the fused
# kernel's own numbers (% copy) where the comparison with compile did not fit.
KERNEL_PROVIDERS=(--providers triton reference-eager torch.compile)
STEP_PROVIDERS=(--providers fused eager-chain torch.compile reference)

# =========================================================================== call 1
if [[ "$CALL" != "2" ]]; then
  # nvcc keeps a few CPU cores busy for a minute or two: the Triton steps use the GPU meanwhile.
  start_build fresh
  triton_gate
  # The suite and the targeted checks only compare numbers, so they share the GPU: the suite runs
  # in the background next to correctness_triton (and the build); no timing runs beside it.
  start_bg interpreter_suite env INVDIFF_HYPOTHESIS_MAX_EXAMPLES=$MAX_EXAMPLES "$PY" -m pytest -q -rfE -p no:cacheprovider \
    -p benchmarks.pytest_live_report --live-report "$WORK/interpreter_suite.jsonl" --per-test-timeout "$PER_TEST_TIMEOUT" \
    "${SUITE[@]}"
  run_step correctness_triton "$PY" benchmarks/gpu_correctness.py "${CORRECTNESS_ARGS[@]}" --only triton \
    --json "$WORK/correctness_triton.json"
  finish_bg interpreter_suite
  # Triton only: it needs the Triton gate, not the build, which may still hold 3 of the 16 CPU
  # cores (one compiler per source file): the kernel times (CUDA events) do not see that; the
  # per-call wall times from Python may be a little slower than on an idle machine.
  run_step invariant_loss "$PY" benchmarks/bench_invariant_loss.py "${BENCH_ARGS[@]}" "${KERNEL_PROVIDERS[@]}" \
    --json "$WORK/invariant_loss.json"
  cuda_gate
  run_step correctness_guided_step "$PY" benchmarks/gpu_correctness.py "${CORRECTNESS_ARGS[@]}" --only guided_step \
    --json "$WORK/correctness_guided_step.json"
  run_step guided_step "$PY" benchmarks/bench_guided_step.py "${BENCH_ARGS[@]}" "${STEP_PROVIDERS[@]}" \
    --json "$WORK/guided_step.json"
fi

# =========================================================================== call 2
if [[ "$CALL" != "1" ]]; then
  if [[ "$CALL" == "2" ]]; then
    start_build reuse  # call 1's extension on a warm machine; built afresh on a new one
    triton_gate
  fi
  if [[ "$DRY" == "1" ]]; then
    run_step e2e_train "$PY" benchmarks/e2e_train.py --dry --json "$WORK/e2e_train.json"
  else
    # The 860M-parameter UNet is built once and copied for each provider (in process on a GPU):
    # 3 timed steps and the bank build timed on 32 samples keep it inside its budget.
    run_step e2e_train "$PY" benchmarks/e2e_train.py --config sd15 --batches 8 32 --steps 3 --bank-measure 32 \
      --device cuda --json "$WORK/e2e_train.json"
  fi
  if [[ "$DRY" == "1" ]]; then
    run_step e2e_debias "$PY" benchmarks/e2e_debias.py --dry --json "$WORK/e2e_debias.json"
  else
    # Whole runs at SD 1.5 shape, small enough for its budget (the base built once and copied);
    # invdiff without its calibration, which samples images and does not fit here (said in RESULTS.md).
    run_step e2e_debias "$PY" benchmarks/e2e_debias.py --config sd15 --n 64 --steps 10 --batch 8 --no-calibrate \
      --device cuda --json "$WORK/e2e_debias.json"
  fi
  if [[ "$CALL" == "2" ]]; then cuda_gate; fi
  if [[ "$DRY" == "1" ]]; then
    run_step e2e_sample "$PY" benchmarks/e2e_sample.py --config small --images 2 --batch 2 --steps 2 --device cpu --every 2 \
      --json "$WORK/e2e_sample.json"
  else
    # One reuse row (G every 2nd step) beside the default: each row is a few seconds at this size.
    run_step e2e_sample "$PY" benchmarks/e2e_sample.py --config sd15 --images 32 --batch 16 --steps 20 --device cuda --every 2 \
      --json "$WORK/e2e_sample.json"
  fi
  run_step guidance_combine "$PY" benchmarks/bench_guidance_combine.py "${BENCH_ARGS[@]}" "${KERNEL_PROVIDERS[@]}" \
    --json "$WORK/guidance_combine.json"
fi

# =========================================================================== merge and summary
if ((PLAN)); then
  for name in "${!BG_PID[@]}"; do finish_bg "$name"; done
  exit 0
fi
for name in "${!BG_PID[@]}"; do finish_bg "$name"; done  # none, unless a step was not joined
banner "merge: $OUT/results$SUFFIX.json"
case "$CALL" in
  1) PART_NAMES=(machine build correctness_triton interpreter_suite invariant_loss correctness_guided_step guided_step) ;;
  2) PART_NAMES=(machine build e2e_train e2e_debias e2e_sample guidance_combine) ;;
  *) PART_NAMES=(machine build correctness_triton interpreter_suite invariant_loss correctness_guided_step guided_step
    e2e_train e2e_debias e2e_sample guidance_combine) ;;
esac
PARTS=()
for part in "${PART_NAMES[@]}"; do
  if [[ "$part" == interpreter_suite ]]; then PARTS+=("$part=$WORK/$part.jsonl"); else PARTS+=("$part=$WORK/$part.json"); fi
done
DRY_FLAG=()
[[ "$DRY" == "1" ]] && DRY_FLAG=(--dry)
merge_rc=0
"$PY" benchmarks/gpu_summary.py merge --out "$OUT/results$SUFFIX.json" --steps "$STEPS_TSV" --call "$CALL" "${DRY_FLAG[@]}" \
  "${PARTS[@]}" || merge_rc=$?
((merge_rc == 0)) || FAILED+=("merge (a part reports failures its step's exit status did not show; see 'problem:' above)")
banner "summary: $OUT/summary$SUFFIX.txt"
"$PY" benchmarks/gpu_summary.py table "$OUT/results$SUFFIX.json" --out "$OUT/summary$SUFFIX.txt" || FAILED+=("summary (exit $?)")

echo
if ((${#FAILED[@]})); then
  echo "gpu_check --call $CALL FAILED after $(($(date +%s) - START))s; failed or skipped steps:"
  printf '  %s\n' "${FAILED[@]}"
  exit 1
fi
echo "gpu_check --call $CALL passed after $(($(date +%s) - START))s"
exit 0
