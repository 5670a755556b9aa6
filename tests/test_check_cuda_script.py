"""scripts/check_cuda.sh (`make check-cuda`) without nvcc: a failure under CI, a skip elsewhere."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_cuda.sh"


def _run_without_nvcc(tmp_path, ci):
    # An empty PATH folder: the script finds nvcc by `command -v` (a bash builtin), NVCC or
    # CUDA_HOME, so with none of them it must take the no-nvcc branch even where nvcc is installed.
    env = {k: v for k, v in os.environ.items() if k not in ("NVCC", "CUDA_HOME", "CI")}
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    env["PATH"] = str(empty_bin)
    if ci is not None:
        env["CI"] = ci
    bash = shutil.which("bash")
    assert bash, "bash is needed to run the script"
    return subprocess.run(
        [bash, str(SCRIPT), sys.executable], env=env, cwd=SCRIPT.parents[1], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("ci", ["true", "1"])
def test_missing_nvcc_fails_under_ci(tmp_path, ci):
    result = _run_without_nvcc(tmp_path, ci)
    assert result.returncode != 0
    assert "nvcc not found" in result.stderr
    assert "CI" in result.stderr


@pytest.mark.parametrize("ci", [None, "false"])
def test_missing_nvcc_is_skipped_outside_ci(tmp_path, ci):
    result = _run_without_nvcc(tmp_path, ci)
    assert result.returncode == 0, result.stderr
    assert "skipped" in result.stderr
    assert "nvcc not found" in result.stderr
