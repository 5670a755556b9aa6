"""pytest-benchmark points for the fused guided step vs the eager chain and torch.compile
(`make bench`), built on bench_guided_step.setup. CPU at 1M elements (64 x 4x64x64); on a CUDA
machine with a CUDA build of invdiff._C, B = 1024."""
import pytest
import torch

from benchmarks import bench_guided_step
from benchmarks.common import Shape

DEVICE = bench_guided_step.default_device()
SHAPE = Shape(batch=1024 if DEVICE == "cuda" else 64, size=64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
@pytest.mark.parametrize("provider", bench_guided_step.PROVIDERS)
def test_guided_step(benchmark, provider, kind, dtype):
    why = bench_guided_step.provider_unavailable(provider, DEVICE)
    if why:
        pytest.skip(why)
    if provider == "torch.compile" and DEVICE == "cpu":
        pytest.skip("torch.compile's CPU codegen is not what this benchmark is about (CUDA only)")
    benchmark.group = f"guided_step {kind} {dtype} {SHAPE}"
    run, design_bytes, min_bytes = bench_guided_step.setup(provider, kind, SHAPE, dtype, DEVICE)
    benchmark.extra_info.update(bytes=design_bytes, min_bytes=min_bytes, device=DEVICE)
    benchmark(run)
