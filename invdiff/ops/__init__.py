"""invdiff's fast ops: the public, stable face.

Each op dispatches to the first backend that accepts its inputs:
  triton     the fused kernels of kernels/ (installed as invdiff.kernels) for CUDA tensors;
  reference  plain PyTorch (reference.py), for every device and dtype, and the test oracle.
  cpp        the C++/CUDA extension invdiff._C (csrc/): the fused guided sampling step, on the
             CPU always and on CUDA when built with it.
`INVDIFF_BACKEND=<name>` forces one backend; a forced backend that declines an input says why
instead of silently falling back. The Triton interpreter (TRITON_INTERPRET=1) runs the kernels on
CPU tensors, but only when forced: it is a test vehicle, far slower than the reference.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import reference
from .reference import (  # noqa: F401
    InvariantLossStats,
    combine_coefficients,
    group_risks,
    invariant_objective,
    per_sample_mse,
)

OPS = ("guidance_combine", "cfg_combine", "invariant_loss", "invariant_loss_with_stats", "guided_step")


@dataclass
class Backend:
    """A set of op implementations with the devices and dtypes it accepts.

    `ops` maps an op name to its implementation.
    """

    name: str
    ops: Dict[str, Callable]
    devices: Sequence[str] = ("cpu", "cuda")
    dtypes: Sequence[torch.dtype] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    available: bool = True
    unavailable_reason: str = ""
    extra_checks: List[Callable] = field(default_factory=list)
    note: str = ""

    def not_supported_reasons(
        self, op: str, tensors: Sequence[torch.Tensor], aux: Sequence[torch.Tensor] = (), forced: bool = False
    ) -> List[str]:
        """Why this backend cannot run `op`; [] if it can. `tensors` are the op's data tensors,
        `aux` small side inputs (weights, per-sample scales) whose dtype the backend converts."""
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
        for t in aux:
            if t.device.type not in self.devices:
                reasons.append(f"device {t.device.type} not in {list(self.devices)}")
        if self.available:
            for check in self.extra_checks:
                reasons.extend(check(op, tensors, aux, forced))
        return sorted(set(reasons))

    def impl(self, op: str) -> Callable:
        return self.ops[op]


def _triton_checks(op: str, tensors: Sequence[torch.Tensor], aux: Sequence[torch.Tensor], forced: bool) -> List[str]:
    from invdiff import kernels

    return kernels.not_supported_reasons(op, tensors, aux, forced)


def _triton_backend() -> Backend:
    # Called when invdiff.ops is imported (BACKENDS below), not on first use: torch.compile cannot
    # trace an import, and with torch already loaded importing Triton costs little. Triton reads
    # TRITON_INTERPRET now, when the kernels are defined, so set it before importing invdiff.ops
    # (or a kernel module); `import invdiff.kernels` alone imports no Triton. The kernels import
    # invdiff.ops_contract, never invdiff.ops.*, so that this is no import cycle
    # (tests/test_import_graph.py checks both).
    impls, missing = {}, None
    kernel_dtypes = (torch.float16, torch.bfloat16, torch.float32)
    try:
        from invdiff import kernels

        kernel_dtypes = kernels.KERNEL_DTYPES
        missing = kernels.unavailable_reason()
        if missing is None:
            from invdiff.kernels import guidance_combine as combine_kernel
            from invdiff.kernels import invariant_loss as loss_kernel

            impls = {
                "guidance_combine": combine_kernel.guidance_combine,
                "cfg_combine": combine_kernel.cfg_combine,
                "invariant_loss": loss_kernel.invariant_loss,
                "invariant_loss_with_stats": loss_kernel.invariant_loss_with_stats,
            }
    except ImportError as err:  # a source tree on PYTHONPATH without `pip install -e .`, or a broken Triton
        missing = f"invdiff.kernels could not be imported ({err})"
    return Backend(
        name="triton",
        ops=impls or dict.fromkeys(OPS),
        devices=("cuda", "cpu"),  # cpu: the interpreter, forced only (see _triton_checks)
        dtypes=kernel_dtypes,
        available=missing is None,
        unavailable_reason=missing or "",
        extra_checks=[_triton_checks],
        note="cpu only in Triton's interpreter, forced: TRITON_INTERPRET=1 INVDIFF_BACKEND=triton",
    )


def _cpp_checks(op: str, tensors: Sequence[torch.Tensor], aux: Sequence[torch.Tensor], forced: bool) -> List[str]:
    reasons = []
    for t in list(tensors) + list(aux):
        if not t.is_contiguous():
            reasons.append("non-contiguous input: the fused step reads flat arrays (the reference takes any strides)")
            break
    return reasons


def _cpp_backend() -> Backend:
    from .. import _ext

    module, reason = _ext.extension()
    with_cuda = bool(module is not None and module.build_info()["with_cuda"])
    return Backend(
        name="cpp",
        ops={"guided_step": _ext.cpp_guided_step} if module is not None else dict.fromkeys(["guided_step"]),
        devices=("cpu", "cuda") if with_cuda else ("cpu",),
        dtypes=(torch.float16, torch.bfloat16, torch.float32),
        available=module is not None,
        unavailable_reason=reason,
        extra_checks=[_cpp_checks],
        note="" if module is None else ("built with CUDA" if with_cuda else "built without CUDA (CPU path only)"),
    )


BACKENDS: List[Backend] = [
    _triton_backend(),
    _cpp_backend(),
    Backend(
        name="reference",
        ops={
            "guidance_combine": reference.guidance_combine,
            "cfg_combine": reference.cfg_combine,
            "invariant_loss": reference.invariant_loss,
            "invariant_loss_with_stats": reference.invariant_loss_with_stats,
            "guided_step": reference.guided_step,
        },
    ),
]


class BackendError(RuntimeError):
    pass


def select_backend(op: str, tensors: Sequence[torch.Tensor], aux: Sequence[torch.Tensor] = ()) -> Backend:
    """The backend that runs `op` on `tensors`: the forced one, or the first that accepts them."""
    forced = os.environ.get("INVDIFF_BACKEND")
    if forced:
        match = [b for b in BACKENDS if b.name == forced]
        if not match:
            raise BackendError(f"INVDIFF_BACKEND={forced!r} is unknown; known: {[b.name for b in BACKENDS]}")
        reasons = match[0].not_supported_reasons(op, tensors, aux, forced=True)
        if reasons:
            raise BackendError(f"INVDIFF_BACKEND={forced} cannot run {op}: " + "; ".join(reasons))
        return match[0]
    declined = {}
    for backend in BACKENDS:
        reasons = backend.not_supported_reasons(op, tensors, aux)
        if not reasons:
            return backend
        declined[backend.name] = reasons
    raise BackendError(f"no backend can run {op}: {declined}")


def guidance_combine(eps: torch.Tensor, g: torch.Tensor, ratio: float) -> torch.Tensor:
    """eps_tilde = combine(eps, g; r) from the frozen eps and G's output, both (B, C, H, W).

    a*eps + b*g with (a, b) = (1-r, r) for r <= 1 and (1, r) for r > 1. Returns (B, C, H, W).
    """
    return select_backend("guidance_combine", (eps, g)).impl("guidance_combine")(eps, g, ratio)


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, scale) -> torch.Tensor:
    """Classifier-free guidance uncond + w*(cond - uncond). uncond, cond: (B, C, H, W);
    scale: a float or a (B,) tensor of per-sample scales. Returns (B, C, H, W)."""
    aux = (scale,) if torch.is_tensor(scale) else ()
    return select_backend("cfg_combine", (uncond, cond), aux).impl("cfg_combine")(uncond, cond, scale)


def _loss_tensors(pred, target, g):
    return [t for t in (pred, target, g) if t is not None]


def invariant_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
    lam: float = 1.0,
    *,
    g: Optional[torch.Tensor] = None,
    ratio: Optional[float] = None,
) -> torch.Tensor:
    """Scalar L_e = mean_k R_k + lam * Var_k R_k over the groups present in the batch.

    pred, target: (B, C, H, W); with `g` (B, C, H, W) and `ratio`, pred is the frozen eps and is
    combined with g first. weights: (B, K), the batch's slice of the environment weights.
    Returns a 0-dim fp32 tensor (fp64 for fp64 inputs).
    """
    impl = select_backend("invariant_loss", _loss_tensors(pred, target, g), (weights,)).impl("invariant_loss")
    return impl(pred, target, weights, lam, g=g, ratio=ratio)


def invariant_loss_with_stats(
    pred: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
    lam: float = 1.0,
    *,
    g: Optional[torch.Tensor] = None,
    ratio: Optional[float] = None,
) -> InvariantLossStats:
    """`invariant_loss` plus per_sample (B,), risks (K,) and weight_sums (K,), computed on the
    way, so that logging costs no second pass over the batch. Only `.loss` carries gradients."""
    backend = select_backend("invariant_loss_with_stats", _loss_tensors(pred, target, g), (weights,))
    impl = backend.impl("invariant_loss_with_stats")
    return impl(pred, target, weights, lam, g=g, ratio=ratio)


def guided_step(
    x: torch.Tensor,
    eps_uncond: Optional[torch.Tensor],
    eps_cond: torch.Tensor,
    g_uncond: Optional[torch.Tensor],
    g_cond: Optional[torch.Tensor],
    coeffs: torch.Tensor,
    noise: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One fused sampling step: CFG of the two branches, each combined with G, then the scheduler
    update, with per-sample coefficients (samples may sit at different timesteps and scales).

    x, eps_uncond, eps_cond, g_uncond, g_cond, noise, out: (B, C, H, W). The state (x, noise,
    out) shares one dtype S, the model outputs (eps_*, g_*) one dtype M: M == S, or an fp32 state
    with bf16/fp16 model outputs, read as they are (no upcast copy; the math is fp32). Any other
    pair is one ValueError before dispatch.
    coeffs: (B, 16) float32 from `invdiff.sampling.step_coeffs` (plan_steps + guidance_columns).
    eps_uncond=None: no CFG; g_*=None: no guidance module; noise=None: no noise term.
    Returns x_prev (B, C, H, W), written into `out` when given (which may be x itself).
    """
    reference.check_guided_step_args(x, eps_uncond, eps_cond, g_uncond, g_cond, coeffs, noise, out)
    tensors = [t for t in (x, eps_uncond, eps_cond, g_uncond, g_cond, noise, out) if t is not None]
    impl = select_backend("guided_step", tensors, (coeffs,)).impl("guided_step")
    return impl(x, eps_uncond, eps_cond, g_uncond, g_cond, coeffs, noise, out=out)


def backend_table() -> List[Dict[str, str]]:
    """One row per backend, for `python -m invdiff.info`."""
    return [
        {
            "backend": b.name,
            "available": "yes" if b.available else f"no ({b.unavailable_reason})",
            "devices": ",".join(b.devices),
            "dtypes": ",".join(str(d).replace("torch.", "") for d in b.dtypes),
            "ops": ",".join(sorted(b.ops)),
            "note": b.note,
        }
        for b in BACKENDS
    ]
