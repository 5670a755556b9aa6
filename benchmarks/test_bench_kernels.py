"""pytest-benchmark suite for the fused ops (`make bench`), built on the same setup factories as
bench_invariant_loss.py and bench_guidance_combine.py. Each point records this design's bytes,
the minimum bytes and the achieved GB/s in extra_info; compare providers with
`--benchmark-group-by=param:mode` etc. On a machine without CUDA the triton points are skipped:
the interpreter is not timed."""
import pytest
import torch

from benchmarks import bench_guidance_combine, bench_invariant_loss
from benchmarks.common import DTYPES, MODES, PROVIDERS, Shape, provider_unavailable

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The training batch sizes and a B >= 1024 point on a GPU; one small point on the CPU.
SHAPES = [Shape(batch=b, size=64) for b in (16, 64, 1024)] if DEVICE == "cuda" else [Shape(batch=64, size=32)]


def _run(benchmark, run, design_bytes, min_bytes):
    benchmark.extra_info.update(bytes=design_bytes, min_bytes=min_bytes, device=DEVICE)
    benchmark(run)
    if benchmark.stats is not None:
        benchmark.extra_info["gbs_at_median"] = design_bytes / benchmark.stats.stats.median / 1e9


def _skip_unavailable(provider):
    why = provider_unavailable(provider, DEVICE)
    if why:
        pytest.skip(why)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_invariant_loss(benchmark, provider, mode, dtype, shape):
    _skip_unavailable(provider)
    benchmark.group = f"invariant_loss {mode} {dtype} {shape}"
    _run(benchmark, *bench_invariant_loss.setup(provider, mode, shape, DTYPES[dtype], DEVICE))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_guidance_combine(benchmark, provider, mode, dtype, shape):
    _skip_unavailable(provider)
    benchmark.group = f"combine {mode} {dtype} {shape}"
    _run(benchmark, *bench_guidance_combine.setup("combine", provider, mode, shape, DTYPES[dtype], DEVICE))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_cfg_combine(benchmark, provider, shape):
    _skip_unavailable(provider)
    benchmark.group = f"cfg forward bf16 {shape}"
    _run(benchmark, *bench_guidance_combine.setup("cfg", provider, "forward", shape, torch.bfloat16, DEVICE))
