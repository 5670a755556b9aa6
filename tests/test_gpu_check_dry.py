"""benchmarks/gpu_check.sh runs once on a rarely lent GPU, so its CPU dry run (GPU_CHECK_DRY=1:
the Triton interpreter, tiny sizes, every step's code path) runs here, where it cannot rot."""
import json
import os
import subprocess
import sys

import pytest

from benchmarks.gpu_summary import PARTS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.sh")
# The lent device returns at most 8 files from $OUT.
MAX_OUT_FILES = 8


def run_dry(out, **env):
    full_env = dict(os.environ, OUT=str(out), GPU_CHECK_DRY="1", PYTHON=sys.executable, OMP_NUM_THREADS="1", **env)
    full_env.pop("INVDIFF_BACKEND", None)
    return subprocess.run(["bash", SCRIPT], env=full_env, capture_output=True, text=True, timeout=600)


def out_files(out):
    return [os.path.join(root, f) for root, _, files in os.walk(out) for f in files]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    return out, run_dry(out)


@pytest.mark.slow  # the whole dry run: about a minute and a half on 2 shared cores
def test_dry_run_passes_and_writes_three_files(dry_run):
    out, result = dry_run
    assert result.returncode == 0, result.stdout[-4000:]
    files = sorted(os.path.relpath(f, out) for f in out_files(out))
    assert len(files) <= MAX_OUT_FILES
    assert files == ["gpu_check.log", "results.json", "summary.txt"]


@pytest.mark.slow  # the whole dry run: about a minute and a half on 2 shared cores
def test_results_hold_every_part_with_data(dry_run):
    out, _ = dry_run
    with open(out / "results.json") as f:
        results = json.load(f)
    assert results["dry"] is True
    assert results["failed_steps"] == [] and results["problems"] == []
    missing = {name: part["missing"] for name, part in results["parts"].items() if "missing" in part}
    # The dry run builds nothing: "build" is the cuda_gate's report on the installed extension.
    assert set(results["parts"]) >= set(PARTS) and not missing, missing
    for name in ("invariant_loss", "guided_step", "guidance_combine"):
        providers = {r["provider"] for r in results["parts"][name]["rows"] if "ms" in r}
        assert providers >= ({"fused"} if name == "guided_step" else {"triton"}), (name, providers)
        assert all("pct_copy" in r and "wall_ms" in r and "min_bytes" in r for r in results["parts"][name]["rows"] if "ms" in r)
    assert results["parts"]["correctness_triton"]["passed"] > 0
    assert results["parts"]["correctness_guided_step"]["passed"] > 0


@pytest.mark.slow  # the whole dry run: about a minute and a half on 2 shared cores
def test_log_keeps_everything_and_has_no_traceback(dry_run):
    out, result = dry_run
    log = (out / "gpu_check.log").read_text()
    assert "Traceback" not in log
    assert "gpu_check passed" in log and "=== e2e_sample" in log  # the whole run, to its last line
    assert (out / "summary.txt").read_text().startswith("== invdiff gpu_check on cpu (DRY RUN")


@pytest.mark.parametrize("failing", ["correctness_triton", "interpreter_suite"])  # a foreground and a background step
def test_a_failing_step_fails_the_script_and_the_rest_still_runs(tmp_path, failing):
    result = run_dry(tmp_path, GPU_CHECK_DRY_FAIL=failing, GPU_CHECK_ONLY=f"machine {failing} cuda_gate")
    assert result.returncode != 0
    log = (tmp_path / "gpu_check.log").read_text()
    assert f"FAIL {failing}: exit 3" in log
    assert "=== cuda_gate" in log  # a failed step is not a gate: the steps after it still run
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    assert results["failed_steps"] == [failing]
    assert (tmp_path / "summary.txt").exists()


def test_a_failed_gate_stops_the_steps_after_it(tmp_path):
    result = run_dry(tmp_path, GPU_CHECK_DRY_FAIL="triton_gate", GPU_CHECK_ONLY="triton_gate correctness_triton")
    assert result.returncode != 0
    log = (tmp_path / "gpu_check.log").read_text()
    assert "STOP: the Triton backend is not live" in log
    assert "=== correctness_triton" not in log
    with open(tmp_path / "results.json") as f:
        steps = {s["name"]: s["status"] for s in json.load(f)["steps"]}
    assert steps == {"triton_gate": "failed", "correctness_triton": "skipped"}
