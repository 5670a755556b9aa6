"""pytest-benchmark view of benchmarks/bench_cli_startup.py: `invdiff --help` as a fresh process."""
import subprocess
import sys


def test_bench_cli_help(benchmark):
    benchmark.pedantic(subprocess.run, args=([sys.executable, "-m", "invdiff.cli", "--help"],),
                       kwargs={"stdout": subprocess.DEVNULL, "check": True}, rounds=5, iterations=1)
