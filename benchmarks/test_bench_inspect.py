"""pytest-benchmark view of benchmarks/bench_inspect.py: `invdiff inspect` on the embedded
benchmark, as a fresh process at one thread (about half a minute: one round)."""
import os
import shutil
import tempfile

from benchmarks.bench_inspect import inspect_once


def test_bench_inspect_embedded(benchmark):
    scratch = tempfile.mkdtemp(prefix="invdiff-bench-inspect-")
    outs = iter(os.path.join(scratch, f"out{i}") for i in range(100))
    try:
        benchmark.pedantic(lambda: inspect_once(next(outs), threads=1), rounds=1, iterations=1)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
