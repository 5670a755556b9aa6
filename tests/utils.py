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
