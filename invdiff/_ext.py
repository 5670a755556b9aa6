"""Guarded load of the C++/CUDA extension `invdiff._C`.

The extension is optional (see setup.py). If it is missing, was built against another torch, or
disagrees with the Python coefficient layout, importing invdiff gives one warning with the reason
and the PyTorch reference path takes over; `python -m invdiff.info` shows the state.
"""
from __future__ import annotations

import importlib
import json
import os
import warnings
from typing import Callable, Optional, Tuple

import torch

_STATE: dict = {}

# The argument block's version that csrc/guided_step.h declares (kAbiVersion) and this Python
# side is written for. 2: guided_step takes 16-bit model outputs with an fp32 state. A _C built
# from older sources would refuse (or, worse, misread) what dispatch now sends it, so it is not
# used: the reference path takes over until it is rebuilt.
ABI_VERSION = 2


def _torch_release(version: str) -> str:
    return version.split("+")[0]


def build_metadata() -> dict:
    """What setup.py recorded about the build (invdiff/_build_info.json), or {} if nothing."""
    path = os.path.join(os.path.dirname(__file__), "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def load_extension(importer: Callable[[str], object] = importlib.import_module) -> Tuple[Optional[object], str]:
    """(module, "") if invdiff._C is usable, else (None, reason). Warns once with the reason."""
    from .ops_contract import NUM_COEFFS, Col  # not invdiff.ops.*: that package loads this one

    module, reason = None, ""
    try:
        module = importer("invdiff._C")
    except ImportError as err:
        meta = build_metadata()
        if meta and not meta.get("built", True):
            reason = f"invdiff._C was not built: {meta.get('reason', 'unknown reason')}"
        else:
            reason = f"invdiff._C could not be imported ({err}); rebuild with pip install --no-build-isolation -e ."
    if module is not None:
        info = module.build_info()
        layout = dict(module.coeff_layout())
        if _torch_release(info["torch_version"]) != _torch_release(torch.__version__):
            reason = (f"invdiff._C was built against torch {info['torch_version']} but torch "
                      f"{torch.__version__} is installed; rebuild with pip install --no-build-isolation -e .")
        elif info["num_coeffs"] != NUM_COEFFS or layout != {c.name: int(c) for c in Col}:
            reason = "invdiff._C's coefficient layout differs from invdiff.ops_contract.Col; rebuild the extension"
        elif info.get("abi_version") != ABI_VERSION:
            reason = (f"invdiff._C has argument-block version {info.get('abi_version')} but invdiff expects "
                      f"{ABI_VERSION} (it was built from older sources); rebuild with pip install --no-build-isolation -e .")
        if reason:
            module = None
    if reason:
        warnings.warn(f"{reason}. Using the PyTorch reference path.", RuntimeWarning, stacklevel=2)
    return module, reason


def extension() -> Tuple[Optional[object], str]:
    """The loaded extension (cached) and, if unusable, why."""
    if "module" not in _STATE:
        module, reason = load_extension()
        _STATE.update(module=module, reason=reason)
        if module is not None:
            _register_fakes()
    return _STATE["module"], _STATE["reason"]


def _register_fakes() -> None:
    """Meta implementations, so torch.compile and CUDA-graph capture can trace the op."""

    @torch.library.register_fake("invdiff_C::guided_step")
    def _(x, eps_uncond, eps_cond, g_uncond, g_cond, coeffs, noise):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("invdiff_C::guided_step.out")
    def _(x, eps_uncond, eps_cond, g_uncond, g_cond, coeffs, noise, *, out):
        return out


def cpp_guided_step(x, eps_uncond, eps_cond, g_uncond, g_cond, coeffs, noise=None, out=None):
    """torch.ops.invdiff_C.guided_step (or its .out variant when `out` is given)."""
    if out is None:
        return torch.ops.invdiff_C.guided_step(x, eps_uncond, eps_cond, g_uncond, g_cond, coeffs, noise)
    return torch.ops.invdiff_C.guided_step.out(x, eps_uncond, eps_cond, g_uncond, g_cond, coeffs, noise, out=out)
