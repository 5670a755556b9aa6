"""invdiff's fused Triton kernels (installed as `invdiff.kernels`).

One file per kernel: guidance_combine.py (combine and CFG, forward and backward) and
invariant_loss.py (the min-step objective, forward and backward). Importing this package does not
import Triton. The kernel modules do, and invdiff.ops imports them when it is itself imported (if
Triton is installed), not on their first use: Triton decides whether a kernel runs in its CPU
interpreter when the kernel is defined, so TRITON_INTERPRET must be set before importing
invdiff.ops, anything that imports it, or a kernel module (tests/test_import_graph.py checks this
order). This file says which inputs the kernels can take, and why not, for the dispatch in
invdiff.ops.
"""
from __future__ import annotations

import sys as _sys

if __name__ == "kernels":
    # This folder is invdiff's `invdiff.kernels`. Imported as a top-level `kernels`, it was found
    # only because the root of an invdiff clone is on sys.path (python or pytest run from it),
    # where it shadows the Hugging Face `kernels` package that transformers (>= 5.25) requires
    # and diffusers imports. Give way to that package: the import system hands the importer
    # whatever sys.modules holds once this module has run. Where it is not installed this folder
    # stays what `kernels` names, as before: transformers (5.24) then imports it to read a version,
    # finds none, and takes the hub kernels for absent.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os

    _clone = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = _machinery.PathFinder.find_spec(
        "kernels", [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _clone])
    if _spec is not None:
        _sys.modules["kernels"] = _util.module_from_spec(_spec)
        _spec.loader.exec_module(_sys.modules["kernels"])

import importlib.util
import os
from typing import List, Optional, Sequence

import torch

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The invariant loss's group kernel holds all K groups in one tile.
MAX_GROUPS = 1024


def unavailable_reason() -> Optional[str]:
    """None if Triton can be imported, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'invdiff[triton]')"
    return None


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def not_supported_reasons(op: str, tensors: Sequence[torch.Tensor], aux: Sequence[torch.Tensor], forced: bool) -> List[str]:
    """Why the Triton kernels decline these inputs ([] if they take them). The device and dtype
    lists are checked by the caller; these are the kernels' own conditions."""
    reasons = []
    devices = {t.device for t in tensors} | {t.device for t in aux}
    if len(devices) > 1:
        reasons.append(f"inputs on several devices {sorted(map(str, devices))}")
    device_types = {d.type for d in devices}
    if "cuda" in device_types and interpreting():
        reasons.append("TRITON_INTERPRET=1 runs Triton on the CPU only; unset it for CUDA tensors")
    if "cpu" in device_types:
        if not interpreting():
            # Says how to force it too, as the interpreter's reason below does: off the
            # interpreter (a CUDA machine's test run) this is the reason a CPU input gets.
            reasons.append("CPU tensors run Triton only in its interpreter (TRITON_INTERPRET=1 before importing "
                           "invdiff, then INVDIFF_BACKEND=triton to force it)")
        elif not forced:
            reasons.append("the Triton interpreter is a test vehicle; INVDIFF_BACKEND=triton forces it on CPU tensors")
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        reasons.append(f"mixed dtypes {sorted(map(str, dtypes))}; cast to one (the reference promotes)")
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        reasons.append(f"shapes differ {sorted(shapes)}; the kernels do not broadcast (the reference does)")
    if tensors and tensors[0].ndim >= 1 and tensors[0].numel() == 0:
        reasons.append("empty input")
    if op.startswith("invariant_loss") and tensors:
        if tensors[0].ndim < 1:
            reasons.append("invariant_loss needs (B, ...) inputs")
        weights = aux[0] if aux else None
        if weights is not None and weights.ndim == 2 and weights.shape[1] > MAX_GROUPS:
            reasons.append(f"K={weights.shape[1]} groups > {MAX_GROUPS}, the group kernel's tile")
    for t in aux:
        if not (t.is_floating_point() or t.dtype == torch.bool):
            reasons.append(f"side input of dtype {t.dtype}; pass floating-point weights or scales")
    return reasons
