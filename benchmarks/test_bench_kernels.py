"""pytest-benchmark suite for the fused ops (`make bench`), built on the same setup factories as
bench_invariant_loss.py and bench_guidance_combine.py. Each point records its ideal bytes and
achieved GB/s in extra_info; compare providers with `--benchmark-group-by=param:mode` etc.
On a machine without CUDA the triton points are skipped: the interpreter is not timed."""
import pytest
import torch

from benchmarks import bench_guidance_combine, bench_invariant_loss
from benchmarks.common import DTYPES, MODES, PROVIDERS, Shape, provider_unavailable

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = Shape(batch=256, size=64) if DEVICE == "cuda" else Shape(batch=64, size=32)


def _run(benchmark, run, ideal_bytes):
    benchmark.extra_info["ideal_bytes"] = ideal_bytes
    benchmark.extra_info["device"] = DEVICE
    benchmark(run)
    if benchmark.stats is not None:
        benchmark.extra_info["gbs_at_median"] = ideal_bytes / benchmark.stats.stats.median / 1e9


def _skip_unavailable(provider):
    why = provider_unavailable(provider, DEVICE)
    if why:
        pytest.skip(why)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_invariant_loss(benchmark, provider, mode, dtype):
    _skip_unavailable(provider)
    benchmark.group = f"invariant_loss {mode} {dtype} {SHAPE}"
    _run(benchmark, *bench_invariant_loss.setup(provider, mode, SHAPE, DTYPES[dtype], DEVICE))


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_guidance_combine(benchmark, provider, mode, dtype):
    _skip_unavailable(provider)
    benchmark.group = f"combine {mode} {dtype} {SHAPE}"
    _run(benchmark, *bench_guidance_combine.setup("combine", provider, mode, SHAPE, DTYPES[dtype], DEVICE))


@pytest.mark.parametrize("provider", PROVIDERS)
def test_cfg_combine(benchmark, provider):
    _skip_unavailable(provider)
    benchmark.group = f"cfg forward bf16 {SHAPE}"
    _run(benchmark, *bench_guidance_combine.setup("cfg", provider, "forward", SHAPE, torch.bfloat16, DEVICE))
