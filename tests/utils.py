"""Shared test helpers (imported as `tests.utils`)."""
from __future__ import annotations

import os

import torch

# A small, fixed slice of the colored-digits train split: every 20th image (72 images, all ten
# digits). Kept small so that a 2-step base model trains in well under a second on one thread.
TINY_INDEX_STEP = 20


def tiny_dataset(split: str = "train", p: float = 0.9, step: int = TINY_INDEX_STEP):
    """A small subset of colored digits; `subset` keeps the full prompt list."""
    from invdiff.data import colored_digits

    ds = colored_digits(split, p=p)
    return ds.subset(torch.arange(0, len(ds), step))


TINY_BASE_CONFIG = dict(batch_size=8, widths=(8, 16), embedding_dim=32)


def train_tiny_base(steps: int = 2):
    """A FrozenBase trained for `steps` steps on `tiny_dataset()` (well under a second)."""
    from invdiff.training import BaseTrainConfig, train_base

    return train_base(tiny_dataset(), BaseTrainConfig(steps=steps, **TINY_BASE_CONFIG), progress=False)


def tiny_base(tmp_path, steps: int = 2, base=None) -> str:
    """Train a tiny base model (or take `base`), save it under tmp_path/'base', return the dir."""
    base = train_tiny_base(steps) if base is None else base
    out = os.path.join(str(tmp_path), "base")
    base.save_pretrained(out)
    return out


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def assert_close_to_ref(out: torch.Tensor, ref_fp64: torch.Tensor, same_dtype_ref: torch.Tensor, atol: float = 0.0, name: str = "output") -> None:
    """DESIGN.md's self-adjusting tolerance.

    The fast op's error against the fp64 reference must be at most twice the error that the
    reference itself makes in the fast op's dtype, plus `atol`:
        max|out - ref_fp64| <= 2 * max|same_dtype_ref - ref_fp64| + atol
    """
    assert out.shape == ref_fp64.shape == same_dtype_ref.shape, (
        f"{name}: shapes differ: out {tuple(out.shape)}, fp64 ref {tuple(ref_fp64.shape)}, "
        f"same-dtype ref {tuple(same_dtype_ref.shape)}"
    )
    assert torch.isfinite(out).all(), f"{name}: non-finite values in the fast op's output"
    err = max_abs_err(out, ref_fp64)
    ref_err = max_abs_err(same_dtype_ref, ref_fp64)
    bound = 2.0 * ref_err + atol
    assert err <= bound, (
        f"{name}: error vs fp64 reference {err:.3e} exceeds 2 x same-dtype reference error "
        f"{ref_err:.3e} + atol {atol:.1e} = {bound:.3e}"
    )


def kernel_device() -> torch.device:
    """Where the Triton kernels run in tests: the GPU when there is one, else the CPU under the
    interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# Extra absolute slack for outputs and gradients, relative to the fp64 reference's magnitude:
# the kernels always accumulate in fp32, in a different order from the reference, so even where
# the same-dtype reference happens to be exact (0 error) a few fp32 ulps must be allowed.
FP32_ACCUMULATION_ATOL = 1e-5


def rounding_atol(dtype: torch.dtype, magnitude: float) -> float:
    """atol for a result stored in `dtype` at about `magnitude`: the fp32 accumulation slack plus
    half an ulp of the storage dtype, the rounding no implementation can avoid. Without the
    latter a bf16 gradient computed exactly in fp32 and rounded once can fail the 2x rule when
    the same-dtype reference's rounding errors happen to be smaller on that draw."""
    return magnitude * (FP32_ACCUMULATION_ATOL + 0.5 * torch.finfo(dtype).eps)


def compare_to_reference(fast_fn, ref_fn, inputs, grad_output=None, name: str = "op") -> None:
    """Run `fast_fn(*inputs)` and `ref_fn` on the same inputs in their own dtype and in fp64, and
    apply `assert_close_to_ref` to the output and to the gradient of every input that requires it.

    inputs: tensors (or non-tensors, passed through). The output must be a single tensor.
    grad_output: the upstream gradient (defaults to ones); given in fp64 and cast per run.
    """

    def prepare(cast):
        prepared = []
        for x in inputs:
            if torch.is_tensor(x):
                y = cast(x.detach())
                prepared.append(y.requires_grad_(x.requires_grad))
            else:
                prepared.append(x)
        return prepared

    def run(fn, args, out_dtype=None):
        out = fn(*args)
        go = torch.ones_like(out, dtype=torch.float64) if grad_output is None else grad_output
        if any(torch.is_tensor(a) and a.requires_grad for a in args):
            out.backward(go.to(out.dtype))
        grads = [a.grad if torch.is_tensor(a) and a.requires_grad else None for a in args]
        return out.detach(), grads

    fast_args, same_args, ref_args = prepare(lambda x: x), prepare(lambda x: x.clone()), prepare(lambda x: x.double())
    out, grads = run(fast_fn, fast_args)
    same_out, same_grads = run(ref_fn, same_args)
    ref_out, ref_grads = run(ref_fn, ref_args)
    scale = max(1.0, float(ref_out.abs().max()))
    assert_close_to_ref(out, ref_out, same_out, atol=rounding_atol(out.dtype, scale), name=f"{name} output")
    for i, (g, sg, rg) in enumerate(zip(grads, same_grads, ref_grads)):
        if rg is None:
            assert g is None, f"{name}: input {i} got a gradient the reference does not give"
            continue
        assert g is not None, f"{name}: input {i} requires grad but the fast op gave none"
        assert g.dtype == fast_args[i].dtype, f"{name}: grad of input {i} is {g.dtype}, not {fast_args[i].dtype}"
        gscale = max(1e-30, float(rg.abs().max()))
        assert_close_to_ref(g, rg, sg, atol=rounding_atol(g.dtype, gscale), name=f"{name} grad of input {i}")
