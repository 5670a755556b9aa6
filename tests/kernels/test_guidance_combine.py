"""The fused guidance combine and CFG combine against the fp64 reference, forward and backward."""
import pytest
import torch

from invdiff import ops
from invdiff.ops import reference
from tests.utils import compare_to_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = {
    "non_pow2_D": (3, 3, 5, 7),
    "batch_of_1": (1, 4, 8, 8),
    "one_element_rows": (5, 1),
}


def _pair(shape, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen).to(dtype).to(device).requires_grad_()
    y = torch.randn(*shape, generator=gen).to(dtype).to(device).requires_grad_()
    return x, y


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("ratio", [0.3, 1.0, 2.0], ids=["interpolation", "r_equals_1", "residual"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_guidance_combine_matches_the_reference(triton_backend, shape, ratio, dtype):
    eps, g = _pair(SHAPES[shape], dtype, triton_backend)
    go = torch.randn(SHAPES[shape], dtype=torch.float64)
    compare_to_reference(
        lambda e, gg: ops.guidance_combine(e, gg, ratio),
        lambda e, gg: reference.guidance_combine(e, gg, ratio),
        [eps, g], grad_output=go.to(triton_backend), name=f"combine/{shape}/r={ratio}",
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("scale", ["float", "per_sample", "per_sample_learned"])
def test_cfg_combine_matches_the_reference(triton_backend, scale, dtype):
    uncond, cond = _pair((4, 3, 5, 7), dtype, triton_backend, seed=1)
    if scale == "float":
        w = 7.5
    else:
        w = torch.tensor([0.0, 1.0, 4.0, 7.5], device=triton_backend).requires_grad_(scale == "per_sample_learned")
    inputs = [uncond, cond] + ([w] if torch.is_tensor(w) else [])

    def fast(u, c, *s):
        return ops.cfg_combine(u, c, s[0] if s else w)

    def ref(u, c, *s):
        return reference.cfg_combine(u, c, s[0] if s else w)

    compare_to_reference(fast, ref, inputs, name=f"cfg/{scale}")


def test_a_cfg_doubled_batch_is_used_in_place(triton_backend):
    """Sampling's uncond/cond halves of one (2B, ...) output are strided views: same result as
    contiguous copies, and the backward reaches the shared parent."""
    both = torch.randn(8, 3, 5, 7, device=triton_backend, requires_grad=True)
    uncond, cond = both.chunk(2)
    out = ops.cfg_combine(uncond[:, :2], cond[:, :2], 3.0)  # channel slice: rows not unit-stride -> copied
    ref = reference.cfg_combine(uncond[:, :2].detach(), cond[:, :2].detach(), 3.0)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    expected = torch.zeros_like(both)
    expected[:4, :2] = -2.0
    expected[4:, :2] = 3.0
    torch.testing.assert_close(both.grad, expected)


def test_only_requested_gradients(triton_backend):
    eps = torch.randn(2, 3, 4, 4, device=triton_backend)
    g = torch.randn(2, 3, 4, 4, device=triton_backend, requires_grad=True)
    ops.guidance_combine(eps, g, 2.0).sum().backward()
    assert eps.grad is None
    torch.testing.assert_close(g.grad, torch.full_like(g, 2.0))


@pytest.mark.parametrize("need_x, need_y", [(False, False), (True, False), (False, True), (True, True)])
def test_the_backward_op_returns_no_aliased_outputs(triton_backend, need_x, need_y):
    """Issue 14: with only a learned CFG scale asking for a gradient, axpby_backward returned one
    empty tensor twice, which a custom op must not (PyTorch raises on the call)."""
    go = torch.randn(4, 3, 5, 7, device=triton_backend)
    w = torch.tensor([0.0, 1.0, 4.0, 7.5], device=triton_backend)
    args = (go, 0.0, 0.0, w, need_x, need_y)
    grad_x, grad_y = torch.ops.invdiff.axpby_backward(*args)
    assert grad_x is not grad_y
    # Empty tensors all have data_ptr 0, so compare the storage objects themselves.
    assert grad_x.untyped_storage()._cdata != grad_y.untyped_storage()._cdata
    if grad_x.numel() and grad_y.numel():
        assert grad_x.untyped_storage().data_ptr() != grad_y.untyped_storage().data_ptr()
    torch.library.opcheck(torch.ops.invdiff.axpby_backward, args)


def test_a_learned_cfg_scale_alone_gets_its_gradient(triton_backend):
    uncond = torch.randn(4, 3, 5, 7, device=triton_backend)
    cond = torch.randn(4, 3, 5, 7, device=triton_backend)
    w = torch.tensor([0.0, 1.0, 4.0, 7.5], device=triton_backend, requires_grad=True)
    ops.cfg_combine(uncond, cond, w).sum().backward()
    torch.testing.assert_close(w.grad, (cond - uncond).flatten(1).sum(1))


def test_the_module_combine_goes_through_the_op(triton_backend, frozen_tiny_base, monkeypatch):
    """GuidanceModule.combine, which sampling calls, dispatches to the fused kernel."""
    from invdiff.kernels import guidance_combine as kernel
    from invdiff.models.guidance import GuidanceModule

    calls = []
    original = kernel.Axpby.apply

    def spy(*args):
        calls.append(args[2:4])
        return original(*args)

    monkeypatch.setattr(kernel.Axpby, "apply", spy)
    module = GuidanceModule.from_frozen(frozen_tiny_base.unet.config, preset="tiny", ratio=2.0)
    eps = torch.randn(2, 3, 4, 4, device=triton_backend)
    g = torch.randn(2, 3, 4, 4, device=triton_backend)
    out = module.combine(eps, g)
    assert calls == [(1.0, 2.0)]
    torch.testing.assert_close(out, eps + 2.0 * g)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_low_precision_results_are_rounded_to_nearest(triton_backend, dtype):
    """eps + 2g of bf16/fp16 inputs is exact in fp32, so the stored result must be exactly the fp64
    value rounded once to nearest even, as a GPU does (the interpreter alone would truncate bf16)."""
    eps, g = _pair((4, 3, 16, 16), dtype, triton_backend, seed=5)
    out = ops.guidance_combine(eps.detach(), g.detach(), 2.0)
    expected = (eps.detach().double() + 2.0 * g.detach().double()).to(dtype)
    assert torch.equal(out, expected)
    grad_in = torch.randn(4, 3, 16, 16, device=triton_backend).to(dtype)
    g2 = g.detach().clone().requires_grad_()
    ops.guidance_combine(eps.detach(), g2, 0.75).backward(grad_in)
    assert torch.equal(g2.grad, (0.75 * grad_in.double()).to(dtype))
