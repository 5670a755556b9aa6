"""benchmarks/gpu_check.sh runs on a rarely lent GPU, in two device calls, so its CPU dry run
(GPU_CHECK_DRY=1: the Triton interpreter, tiny sizes, every step's code path) runs here, where it
cannot rot; its plan (--plan) is checked against each call's time limit; and the pieces that
keep results through a cut (per-row JSON, the live pytest report) are tested on their own."""
import json
import os
import subprocess
import sys
import time

import pytest

from benchmarks import common, gpu_summary
from benchmarks.gpu_summary import CALL_PARTS, PARTS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.sh")
# The lent device returns at most 8 files from $OUT.
MAX_OUT_FILES = 8
# One device command runs at most this long (the call's timeout_s, as RESULTS.md gives it).
DEVICE_CALL_S = 480


def run_dry(out, *args, **env):
    full_env = dict(os.environ, OUT=str(out), GPU_CHECK_DRY="1", PYTHON=sys.executable, OMP_NUM_THREADS="1", **env)
    full_env.pop("INVDIFF_BACKEND", None)
    return subprocess.run(["bash", SCRIPT, *args], env=full_env, capture_output=True, text=True, timeout=900)


def out_files(out):
    return [os.path.join(root, f) for root, _, files in os.walk(out) for f in files]


def results_of(out, suffix=""):
    with open(os.path.join(out, f"results{suffix}.json")) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- the plan and the budget


def plan(call):
    """gpu_check.sh --plan for `call`: its header, and the ("fg"|"bg"|"join", name, budget, command)
    entries in the order the call would run them (GPU_CHECK_DRY unset: the device's plan)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK")}
    env["PYTHON"] = sys.executable
    result = subprocess.run(["bash", SCRIPT, "--call", call, "--plan"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = dict(field.split("=") for field in lines[0].split()[1:])
    entries = []
    for line in lines[1:]:
        head, _, command = line.partition(" :: ")
        kind, name, *budget = head.split()
        entries.append((kind, name, int(budget[0]) if budget else 0, command))
    return header, entries


def longest_path_s(entries):
    """The call's time if every step takes its whole budget: foreground steps one after another,
    a background step beside them from its start until the join that waits for it."""
    now, ends = 0, {}
    for kind, name, budget, _ in entries:
        if kind == "fg":
            now += budget
        elif kind == "bg":
            ends[name] = now + budget
        else:
            now = max(now, ends.pop(name))
    assert not ends, f"background steps never joined: {sorted(ends)}"
    return now


@pytest.mark.parametrize("call", ["1", "2", "all"])
def test_each_calls_step_budgets_fit_its_time_limit(call):
    header, entries = plan(call)
    budget, reserve = int(header["budget"]), int(header["reserve"])
    assert longest_path_s(entries) + reserve <= budget, (longest_path_s(entries), reserve, budget)
    if call != "all":  # a device command: the script's budget, then its start and the last kill-after inside 480 s
        assert budget + 20 <= DEVICE_CALL_S


def test_the_calls_split_the_work_and_each_stands_alone():
    steps = {call: [name for kind, name, _, _ in plan(call)[1] if kind != "join"] for call in ("1", "2", "all")}
    setup = ["wheels", "machine", "install", "build", "triton_gate"]
    assert steps["1"][:5] == setup and steps["2"][:5] == setup  # either runs on a fresh machine
    assert {"correctness_triton", "interpreter_suite", "invariant_loss", "cuda_gate", "correctness_guided_step",
            "guided_step"} <= set(steps["1"])
    assert {"e2e_train", "e2e_debias", "cuda_gate", "e2e_sample", "guidance_combine"} <= set(steps["2"])
    assert set(steps["all"]) == set(steps["1"]) | set(steps["2"])
    # Part names in the merge follow the calls' steps.
    assert set(CALL_PARTS["1"]) <= set(steps["1"]) | {"machine"} and set(CALL_PARTS["2"]) <= set(steps["2"])


def test_the_graded_numbers_come_first():
    """The fused loss is timed before the wait for the build, and each kernel benchmark starts at
    B = 1024, the graded batch, in the graded full mode, with the fused kernel ahead of its
    baselines: a call cut short keeps those rows."""
    _, entries = plan("1")
    order = [(kind, name) for kind, name, _, _ in entries]
    assert order.index(("fg", "invariant_loss")) < order.index(("join", "build"))
    for kind, name, _, command in entries + plan("2")[1]:
        if name in ("invariant_loss", "guided_step", "guidance_combine"):
            batches = command.split("--batches ")[1].split(" --")[0].split()
            modes = command.split("--modes ")[1].split(" --")[0].split()
            providers = command.split("--providers ")[1].split(" --")[0].split()
            assert batches[0] == "1024" and modes[0] == "full", (name, batches, modes)
            assert providers[0] in ("triton", "fused") and providers[-1] != "triton", (name, providers)


def test_a_benchmark_takes_the_time_earlier_steps_left_and_no_more(tmp_path):
    """A benchmark may use the time the steps before it left unused (invariant_loss's nominal
    budget is 80 s), but leaves every later step its whole budget (guided_step's 60 s)."""
    result = run_dry(tmp_path, "--call", "1", GPU_CHECK_ONLY="invariant_loss guided_step", GPU_CHECK_BUDGET_S="400")
    assert result.returncode == 0, result.stdout[-3000:]
    log = (tmp_path / "gpu_check-call1.log").read_text()
    budgets = {name: int(log.split(f"=== {name} (budget ")[1].split("s)")[0]) for name in ("invariant_loss", "guided_step")}
    assert 250 < budgets["invariant_loss"] <= 400 - 20 - 60, budgets  # the call's 400 s less the reserve and guided_step's 60
    assert budgets["guided_step"] >= 60, budgets


FAKE_SETUP = """
import json, os, sys
lib = os.path.join(sys.argv[sys.argv.index("--build-lib") + 1], "invdiff")
os.makedirs(lib, exist_ok=True)
ok = os.environ.get("FAKE_BUILD_OK") == "1"
# As setup.py's OptionalBuildExtension: a failed build is a warning, exit 0, and the reason is in the JSON.
json.dump({"built": ok, "with_cuda": ok, "reason": "" if ok else "nvcc failed (fake)"}, open(os.path.join(lib, "_build_info.json"), "w"))
if ok:
    open(os.path.join(lib, "_C.fake.so"), "w").write("new")
"""


@pytest.mark.parametrize("builds", [True, False], ids=["built", "setup_py_only_warned"])
def test_the_build_lands_in_one_rename_and_a_warned_failure_fails(tmp_path, builds):
    """The Triton steps import invdiff while invdiff._C builds: the plan's build command (run here
    in a fake source tree) builds outside the tree and renames the .so into invdiff/, never
    writing there in place; and a build that setup.py only warned about fails the step, leaving
    what was there."""
    _, entries = plan("1")
    (command,) = [c for kind, name, _, c in entries if name == "build" and kind == "bg"]
    assert "--inplace" not in command
    tree, work = tmp_path / "tree", tmp_path / "work"
    (tree / "csrc").mkdir(parents=True)
    (tree / "invdiff").mkdir()
    (tree / "csrc" / "step.cu").write_text("// fake\n")
    (tree / "setup.py").write_text(FAKE_SETUP)
    (tree / "invdiff" / "_C.fake.so").write_text("old")
    command = command.replace("/tmp/gpu_check.PLAN", str(work))
    result = subprocess.run(["bash", "-c", command], cwd=tree, env=dict(os.environ, FAKE_BUILD_OK=str(int(builds))),
                            capture_output=True, text=True, timeout=60)
    assert sorted(os.listdir(tree / "invdiff")) == ["_C.fake.so"]  # no half-copied file left beside it
    if builds:
        assert result.returncode == 0, result.stdout + result.stderr
        assert (tree / "invdiff" / "_C.fake.so").read_text() == "new" and (tree / "build").is_dir()
    else:
        assert result.returncode != 0 and "invdiff._C was not built: nvcc failed (fake)" in result.stderr
        assert (tree / "invdiff" / "_C.fake.so").read_text() == "old"


# ----------------------------------------------------------------------------- per-row JSON and the soft stop


def _grid(rows_seen, json_path, measured=3):
    def run_grid(shapes, dtypes, modes, providers, device):
        for i in range(measured):
            if i:  # the previous row is on disk before this one is measured
                with open(json_path) as f:
                    rows_seen.append(json.load(f))
            yield {"op": "fake", "shape": "B=1024", "batch": 1024, "dtype": "fp32", "mode": "full", "provider": "triton",
                   "ms": 1.0 + i}

    return run_grid


def test_bench_main_writes_each_row_as_it_is_measured(tmp_path, monkeypatch):
    monkeypatch.delenv(common.STEP_DEADLINE_ENV, raising=False)
    path = str(tmp_path / "rows.json")
    seen = []
    common.bench_main("fake", _grid(seen, path), ["--device", "cpu", "--json", path])
    assert [len(s["rows"]) for s in seen] == [1, 2] and not any(s["complete"] for s in seen)
    final = json.load(open(path))
    assert final["complete"] is True and len(final["rows"]) == 3 and final["graph_l2"].startswith("warm")
    assert not os.path.exists(path + ".partial")  # written beside, then renamed over


def test_bench_main_stops_starting_rows_before_its_deadline(tmp_path, monkeypatch):
    path = str(tmp_path / "rows.json")
    now = [1000.0]
    monkeypatch.setattr(common.time, "time", lambda: now[0])

    def run_grid(shapes, dtypes, modes, providers, device):
        for i in range(5):
            now[0] += 10.0  # each row takes 10 s
            yield {"op": "fake", "shape": "B=1", "dtype": "fp32", "mode": "full", "provider": "triton", "ms": 1.0}

    # A row starts only with 1.5 of the slowest row's time (15 s) left: at 40, 30 and 20 s before
    # the deadline, not at 10, so the step ends 10 s early, by itself, with 3 rows written.
    monkeypatch.setenv(common.STEP_DEADLINE_ENV, "1040")
    common.bench_main("fake", run_grid, ["--device", "cpu", "--json", path])
    result = json.load(open(path))
    assert len(result["rows"]) == 3 and result["complete"] is False and "3 rows measured" in result["stopped_early"]


# ----------------------------------------------------------------------------- the live pytest report


def _run_suite(tmp_path, body, *args, timeout=120):
    (tmp_path / "test_sample.py").write_text(body)
    report = tmp_path / "report.jsonl"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "benchmarks.pytest_live_report",
           "--live-report", str(report), *args, str(tmp_path / "test_sample.py")]
    return cmd, report


def test_a_hung_test_fails_at_the_per_test_timeout_and_the_suite_goes_on(tmp_path):
    body = "import time\ndef test_a(): pass\ndef test_hang(): time.sleep(60)\ndef test_b(): assert False\n"
    cmd, report = _run_suite(tmp_path, body, "--per-test-timeout", "2")
    subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    counts = gpu_summary.live_report_counts(str(report))
    assert counts["finished"] and counts["tests"] == 3 and counts["failures"] == 2
    assert any("test_hang" in t and "per-test-timeout" in t for t in counts["failed_tests"])


def test_a_killed_suite_keeps_the_tests_it_finished(tmp_path):
    body = "import time\ndef test_a(): pass\ndef test_b(): pass\ndef test_hang(): time.sleep(600)\n"
    cmd, report = _run_suite(tmp_path, body)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if report.exists() and report.read_text().count('"passed"') >= 2:
                break
            time.sleep(0.2)
    finally:
        proc.kill()  # as `timeout --kill-after` ends a step: no chance to write anything more
        proc.wait()
    counts = gpu_summary.live_report_counts(str(report))
    assert counts["tests"] == 2 and counts["failures"] == 0 and not counts["finished"]
    assert "stopped before its end" in counts["cut"]


# ----------------------------------------------------------------------------- grading


def _row(batch, pct_copy, provider="triton"):
    return {"op": "invariant_loss", "shape": f"B={batch} 4x64x64 K=2", "batch": batch, "dtype": "bf16", "mode": "full",
            "provider": provider, "ms": 0.1, "pct_copy": pct_copy, "vs_eager": 5.0, "vs_compile": 2.0}


def test_goals_are_graded_at_b_1024_only():
    lines, missed = gpu_summary.kernel_lines({"invariant_loss": {"rows": [_row(16, 10.0), _row(1024, 90.0)]}})
    assert missed == 0
    small = next(line for line in lines if "B=16 " in line)
    assert "MISS" not in small and " ok" not in small
    _, missed = gpu_summary.kernel_lines({"invariant_loss": {"rows": [_row(1024, 10.0)]}})
    assert missed == 1


def test_merge_flags_a_kernel_part_without_its_graded_rows(tmp_path):
    part = tmp_path / "invariant_loss.json"
    part.write_text(json.dumps({"rows": [_row(16, 90.0), _row(1024, 90.0)]}))  # bf16 only: fp32 missing
    rc = gpu_summary.merge(str(tmp_path / "results.json"), None, [f"invariant_loss={part}"], dry=False, call="1")
    problems = json.load(open(tmp_path / "results.json"))["problems"]
    assert rc == 1 and problems == ["invariant_loss: no measured graded row at B = 1024 for invariant_loss fp32"]


# ----------------------------------------------------------------------------- the dry run


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    return out, run_dry(out)


@pytest.mark.slow  # the whole dry run: about two minutes on 2 shared cores
def test_dry_run_passes_and_writes_three_files(dry_run):
    out, result = dry_run
    assert result.returncode == 0, result.stdout[-4000:]
    files = sorted(os.path.relpath(f, out) for f in out_files(out))
    assert len(files) <= MAX_OUT_FILES
    assert files == ["gpu_check.log", "results.json", "summary.txt"]


@pytest.mark.slow  # the whole dry run: about two minutes on 2 shared cores
def test_results_hold_every_part_with_data(dry_run):
    out, _ = dry_run
    results = results_of(out)
    assert results["dry"] is True
    assert results["failed_steps"] == [] and results["problems"] == []
    missing = {name: part["missing"] for name, part in results["parts"].items() if "missing" in part}
    # The dry run builds nothing: "build" is the cuda_gate's report on the installed extension.
    assert set(results["parts"]) >= set(PARTS) and not missing, missing
    for name in ("invariant_loss", "guided_step", "guidance_combine"):
        part = results["parts"][name]
        providers = {r["provider"] for r in part["rows"] if "ms" in r}
        assert providers >= ({"fused"} if name == "guided_step" else {"triton"}), (name, providers)
        assert all("pct_copy" in r and "wall_ms" in r and "min_bytes" in r for r in part["rows"] if "ms" in r)
        assert part["complete"] is True
    assert results["parts"]["correctness_triton"]["passed"] > 0
    assert results["parts"]["correctness_guided_step"]["passed"] > 0
    suite = results["parts"]["interpreter_suite"]
    assert suite["finished"] and suite["tests"] > 0 and suite["failures"] == 0


@pytest.mark.slow  # the whole dry run: about two minutes on 2 shared cores
def test_log_keeps_everything_and_has_no_traceback(dry_run):
    out, result = dry_run
    log = (out / "gpu_check.log").read_text()
    assert "Traceback" not in log
    assert "gpu_check --call all passed" in log and "=== guidance_combine" in log  # the whole run, to its last line
    assert (out / "summary.txt").read_text().startswith("== invdiff gpu_check on cpu (DRY RUN")


@pytest.mark.parametrize("call, kept, lost", [
    ("1", ["invariant_loss"], ["guided_step"]),
    ("2", ["guidance_combine"], ["e2e_sample"]),
])
def test_a_failed_build_skips_only_what_needs_invdiff_c(tmp_path, call, kept, lost):
    """setup.py makes a failed build a warning; gpu_check makes it a failed step, and the steps
    that need invdiff._C are skipped, while the Triton benchmarks still run and land."""
    only = " ".join(["build", "cuda_gate"] + kept + lost)
    result = run_dry(tmp_path, "--call", call, GPU_CHECK_DRY_FAIL="build", GPU_CHECK_ONLY=only)
    assert result.returncode != 0
    assert sorted(os.listdir(tmp_path)) == [f"gpu_check-call{call}.log", f"results-call{call}.json", f"summary-call{call}.txt"]
    results = results_of(tmp_path, f"-call{call}")
    steps = {s["name"]: s["status"] for s in results["steps"]}
    assert steps == {"build": "failed", "cuda_gate": "skipped", **{k: "ok" for k in kept}, **{k: "skipped" for k in lost}}
    for name in kept:
        assert results["parts"][name]["rows"] and results["parts"][name]["complete"]
    for name in lost:
        assert "missing" in results["parts"][name]
    log = (tmp_path / f"gpu_check-call{call}.log").read_text()
    assert "cuda_gate: skipped, since build did not pass" in log
    assert f"{lost[0]}: skipped, since cuda_gate did not pass" in log


def test_the_machine_step_fails_when_diffusers_does_not_import(tmp_path):
    broken = tmp_path / "site" / "diffusers"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('diffusers is not installed (simulated)')\n")
    out = tmp_path / "out"
    result = run_dry(out, "--call", "1", GPU_CHECK_ONLY="machine", PYTHONPATH=str(tmp_path / "site"))
    assert result.returncode != 0
    assert results_of(out, "-call1")["failed_steps"] == ["machine"]
    assert "diffusers does not import" in (out / "summary-call1.txt").read_text()


@pytest.mark.parametrize("failing", ["correctness_triton", "interpreter_suite"])  # a foreground and a background step
def test_a_failing_step_fails_the_script_and_the_rest_still_runs(tmp_path, failing):
    result = run_dry(tmp_path, GPU_CHECK_DRY_FAIL=failing, GPU_CHECK_ONLY=f"machine {failing} cuda_gate")
    assert result.returncode != 0
    log = (tmp_path / "gpu_check.log").read_text()
    assert f"FAIL {failing}: exit 3" in log
    assert "=== cuda_gate" in log  # a failed step is not a gate: the steps after it still run
    results = results_of(tmp_path)
    assert results["failed_steps"] == [failing]
    assert (tmp_path / "summary.txt").exists()


def test_a_failed_gate_skips_the_steps_that_need_it(tmp_path):
    result = run_dry(tmp_path, GPU_CHECK_DRY_FAIL="triton_gate", GPU_CHECK_ONLY="triton_gate correctness_triton cuda_gate")
    assert result.returncode != 0
    log = (tmp_path / "gpu_check.log").read_text()
    assert "STOP for the steps that need triton_gate" in log and "the Triton backend is not live" in log
    assert "=== correctness_triton (budget" not in log
    steps = {s["name"]: s["status"] for s in results_of(tmp_path)["steps"]}
    assert steps == {"triton_gate": "failed", "correctness_triton": "skipped", "cuda_gate": "ok"}
