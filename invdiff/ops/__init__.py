"""invdiff's fast ops: the public, stable face.

Each op dispatches to the first backend that accepts its inputs. Today only the pure-PyTorch
reference is registered; the Triton kernels and the C++/CUDA extension slot in ahead of it
without changing these signatures. `INVDIFF_BACKEND=<name>` forces one backend, and a forced
backend that declines an input says why instead of silently falling back.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence

import torch

from . import reference
from .reference import cfg_combine, group_risks, invariant_objective, per_sample_mse  # noqa: F401


@dataclass
class Backend:
    """A set of op implementations with the devices and dtypes it accepts."""

    name: str
    ops: Dict[str, Callable]
    devices: Sequence[str] = ("cpu", "cuda")
    dtypes: Sequence[torch.dtype] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    available: bool = True
    unavailable_reason: str = ""
    extra_checks: List[Callable] = field(default_factory=list)

    def not_supported_reasons(self, op: str, tensors: Sequence[torch.Tensor]) -> List[str]:
        reasons = []
        if not self.available:
            reasons.append(self.unavailable_reason or "not available")
        if op not in self.ops:
            reasons.append(f"does not implement {op}")
        for t in tensors:
            if t.device.type not in self.devices:
                reasons.append(f"device {t.device.type} not in {list(self.devices)}")
            if t.dtype not in self.dtypes:
                reasons.append(f"dtype {t.dtype} not supported")
        for check in self.extra_checks:
            reasons.extend(check(op, tensors))
        return sorted(set(reasons))


BACKENDS: List[Backend] = [
    Backend(
        name="reference",
        ops={"guidance_combine": reference.guidance_combine, "invariant_loss": reference.invariant_loss},
    )
]


class BackendError(RuntimeError):
    pass


def select_backend(op: str, tensors: Sequence[torch.Tensor]) -> Backend:
    forced = os.environ.get("INVDIFF_BACKEND")
    if forced:
        match = [b for b in BACKENDS if b.name == forced]
        if not match:
            raise BackendError(f"INVDIFF_BACKEND={forced!r} is unknown; known: {[b.name for b in BACKENDS]}")
        reasons = match[0].not_supported_reasons(op, tensors)
        if reasons:
            raise BackendError(f"INVDIFF_BACKEND={forced} cannot run {op}: " + "; ".join(reasons))
        return match[0]
    declined = {}
    for backend in BACKENDS:
        reasons = backend.not_supported_reasons(op, tensors)
        if not reasons:
            return backend
        declined[backend.name] = reasons
    raise BackendError(f"no backend can run {op}: {declined}")


def guidance_combine(eps: torch.Tensor, g: torch.Tensor, ratio: float) -> torch.Tensor:
    """eps_tilde from the frozen eps and G's output, both (B, C, H, W); see reference.guidance_combine."""
    return select_backend("guidance_combine", (eps, g)).ops["guidance_combine"](eps, g, ratio)


def invariant_loss(pred, target, weights, lam: float = 1.0, *, g=None, ratio=None) -> torch.Tensor:
    """Scalar L_e = mean_k R_k + lam * Var_k R_k. pred/target/g: (B, C, H, W); weights: (B, K)."""
    tensors = [t for t in (pred, target, g) if t is not None]
    impl = select_backend("invariant_loss", tensors).ops["invariant_loss"]
    return impl(pred, target, weights, lam, g=g, ratio=ratio)


def backend_table() -> List[Dict[str, str]]:
    """One row per backend, for `python -m invdiff.info`."""
    return [
        {
            "backend": b.name,
            "available": "yes" if b.available else f"no ({b.unavailable_reason})",
            "devices": ",".join(b.devices),
            "ops": ",".join(sorted(b.ops)),
        }
        for b in BACKENDS
    ]
