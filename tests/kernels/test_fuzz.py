"""Hypothesis fuzzing of the fused kernels over shapes, dtypes, strides, groups and launch plans."""
import contextlib
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from invdiff import ops
from invdiff.ops import reference
from tests.utils import compare_to_reference, kernel_device

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "batch_slice", "channels_last", "permuted"]
FUZZ = settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@contextlib.contextmanager
def forced_triton(**knobs):
    from invdiff.kernels.utils import TUNING

    saved_env, saved_knobs = os.environ.get("INVDIFF_BACKEND"), dict(TUNING)
    os.environ["INVDIFF_BACKEND"] = "triton"
    TUNING.update(knobs)
    try:
        yield
    finally:
        TUNING.clear()
        TUNING.update(saved_knobs)
        if saved_env is None:
            os.environ.pop("INVDIFF_BACKEND", None)
        else:
            os.environ["INVDIFF_BACKEND"] = saved_env


def _tensor(shape, layout, dtype, gen, device, scale=1.0):
    """A (B, C, H, W) tensor with the requested memory layout."""
    b, c, h, w = shape
    if layout == "batch_slice":
        t = torch.randn(2 * b, c, h, w, generator=gen)[::2]
    elif layout == "permuted":
        t = torch.randn(b, h, w, c, generator=gen).permute(0, 3, 1, 2)
    else:
        t = torch.randn(b, c, h, w, generator=gen)
    t = (scale * t).to(dtype).to(device)
    if layout == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    if layout == "batch_slice":  # keep the view: .to() above may have copied it
        full = torch.zeros(2 * b, c, h, w, dtype=dtype, device=device)
        full[::2] = t
        t = full[::2]
    return t


shapes = st.tuples(st.integers(1, 6), st.integers(1, 4), st.integers(1, 9), st.integers(1, 9))


@FUZZ
@given(
    shape=shapes,
    groups=st.integers(1, 6),
    dtype=st.sampled_from(DTYPES),
    layouts=st.tuples(*[st.sampled_from(LAYOUTS)] * 3),
    lam=st.sampled_from([0.0, 0.5, 3.0]),
    ratio=st.sampled_from([None, 0.5, 1.0, 2.0]),
    zero_fraction=st.sampled_from([0.0, 0.5, 0.9]),
    block=st.sampled_from([16, 32, 2048]),
    programs=st.sampled_from([1, 8]),
    seed=st.integers(0, 2**16),
)
def test_invariant_loss_fuzz(shape, groups, dtype, layouts, lam, ratio, zero_fraction, block, programs, seed):
    device = kernel_device()
    gen = torch.Generator().manual_seed(seed)
    pred = _tensor(shape, layouts[0], dtype, gen, device).requires_grad_()
    target = _tensor(shape, layouts[1], dtype, gen, device)
    g = _tensor(shape, layouts[2], dtype, gen, device, scale=0.3).requires_grad_(ratio is not None)
    weights = torch.rand(shape[0], groups, generator=gen)
    weights = torch.where(torch.rand(shape[0], groups, generator=gen) < zero_fraction, 0.0, weights).to(device)
    if ratio is None:
        fast = lambda p, t, gg, w: ops.invariant_loss(p, t, w, lam)  # noqa: E731
        ref = lambda p, t, gg, w: reference.invariant_loss(p, t, w, lam)  # noqa: E731
    else:
        fast = lambda p, t, gg, w: ops.invariant_loss(p, t, w, lam, g=gg, ratio=ratio)  # noqa: E731
        ref = lambda p, t, gg, w: reference.invariant_loss(p, t, w, lam, g=gg, ratio=ratio)  # noqa: E731
    with forced_triton(block=block, interpreter_programs=programs):
        compare_to_reference(fast, ref, [pred, target, g, weights], name="fuzz/invariant_loss")


@FUZZ
@given(
    shape=shapes,
    dtype=st.sampled_from(DTYPES),
    layouts=st.tuples(*[st.sampled_from(LAYOUTS)] * 2),
    ratio=st.sampled_from([0.25, 1.0, 3.0]),
    block=st.sampled_from([16, 2048]),
    seed=st.integers(0, 2**16),
)
def test_guidance_combine_fuzz(shape, dtype, layouts, ratio, block, seed):
    device = kernel_device()
    gen = torch.Generator().manual_seed(seed)
    eps = _tensor(shape, layouts[0], dtype, gen, device).requires_grad_()
    g = _tensor(shape, layouts[1], dtype, gen, device).requires_grad_()
    go = torch.randn(shape, generator=gen, dtype=torch.float64).to(device)
    with forced_triton(block=block):
        compare_to_reference(
            lambda e, gg: ops.guidance_combine(e, gg, ratio),
            lambda e, gg: reference.guidance_combine(e, gg, ratio),
            [eps, g], grad_output=go, name="fuzz/combine",
        )


def test_fuzz_layouts_are_what_they_claim():
    """The fuzzer's layouts really are non-contiguous, so the strided paths are exercised."""
    gen = torch.Generator().manual_seed(0)
    for layout in LAYOUTS[1:]:
        assert not _tensor((3, 2, 4, 5), layout, torch.float32, gen, "cpu").is_contiguous(), layout
    sliced = _tensor((3, 2, 4, 5), "batch_slice", torch.float32, gen, "cpu")
    assert sliced.stride(0) == 2 * 2 * 4 * 5


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
def test_backend_declines_are_explained(triton_backend, dtype):
    x = torch.ones(2, 3, device=triton_backend, dtype=dtype)
    with pytest.raises(ops.BackendError, match="dtype"):
        ops.guidance_combine(x, x, 2.0)
