"""Wall time of `invdiff inspect` on the embedded benchmark (issue 26: under a minute on the CPU).

    python benchmarks/bench_inspect.py --threads 1 --json benchmarks/results/inspect_cpu.json

Runs `invdiff inspect --base invdiff/assets/base_p0.9 --out DIR` (the colored digits at p = 0.9,
1438 images, the max step at the debias defaults: 20 timesteps x 1 draw) as a fresh process, as
a user types it, `--repeats` times, with OMP_NUM_THREADS=--threads: the time includes starting
Python and importing torch. The report is checked (10 prompts, a grid each) so that a broken run
cannot pass for a fast one. benchmarks/test_bench_inspect.py is its pytest-benchmark view.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import write_json  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(REPO, "invdiff", "assets", "base_p0.9")
TARGET_S = 60.0


def inspect_once(out: str, threads: int, extra=()) -> float:
    """One `invdiff inspect --base BASE --out OUT` in a fresh process; its wall time in seconds.
    OUT must not exist. Raises when the command fails or its report is not whole."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "invdiff.cli", "inspect", "--base", BASE, "--out", out, *extra], cwd=REPO,
                   env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    grids = [os.path.join(out, row["grid"]) for row in report["prompts"]]
    if len(report["prompts"]) != 10 or not all(map(os.path.isfile, grids)):
        raise RuntimeError(f"the report in {out} is not whole")
    return seconds


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the timed process")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    scratch = tempfile.mkdtemp(prefix="invdiff-bench-inspect-")
    try:
        times = [inspect_once(os.path.join(scratch, f"out{i}"), args.threads) for i in range(args.repeats)]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # the benchmark's own scratch folder
    median = statistics.median(times)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d"), "threads": args.threads, "repeats": args.repeats,
              "command": "invdiff inspect --base invdiff/assets/base_p0.9 --out DIR", "runs_s": times,
              "median_s": median, "under_a_minute": median < TARGET_S}
    print(f"invdiff inspect, embedded benchmark, {args.threads} thread(s): median {median:.1f} s over {args.repeats} "
          f"(target < {TARGET_S:.0f} s: {'met' if median < TARGET_S else 'MISSED'})")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
