"""pytest-benchmark suite for the reference ops (`make bench`). These are CPU timings of the
plain-PyTorch path; the fused kernels of later changes are compared against them side by side."""
import pytest
import torch

from invdiff.ops import reference


def _inputs(b=128, c=3, h=16, k=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn(b, c, h, h, generator=gen)
    g = torch.randn(b, c, h, h, generator=gen, requires_grad=True)
    target = torch.randn(b, c, h, h, generator=gen)
    w = torch.rand(b, k, generator=gen)
    return eps, g, target, w


@pytest.mark.parametrize("b", [128, 512])
def test_invariant_loss_forward_backward(benchmark, b):
    eps, g, target, w = _inputs(b)

    def step():
        loss = reference.invariant_loss(eps, target, w, 1.0, g=g, ratio=2.0)
        loss.backward()
        return loss

    benchmark(step)


@pytest.mark.parametrize("b", [128, 512])
def test_guidance_combine(benchmark, b):
    eps, g, _, _ = _inputs(b)
    benchmark(lambda: reference.guidance_combine(eps, g.detach(), 2.0))
