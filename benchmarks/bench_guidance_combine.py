"""Benchmark the fused guidance combine against eager and compiled PyTorch.

    python benchmarks/bench_guidance_combine.py                    # CUDA if present, else CPU
    python benchmarks/bench_guidance_combine.py --dtypes bf16 --batches 16 64 1024 --json out.json

Two ops, as invdiff uses them:
  combine  eps_tilde = eps + r*g in the min step: eps is frozen, so the backward writes grad_g
           only. Traffic: forward reads eps and g and writes eps_tilde (3 x B x D); backward
           reads grad_out and writes grad_g (2 x); full 5 x. This design moves exactly that:
           the minimum traffic equals the design's.
  cfg      uncond + w*(cond - uncond) with per-sample w, at sampling (forward only, 3 x).
"""
from __future__ import annotations

import os
import sys
from typing import Dict, Iterator, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402
    DTYPES, PROVIDERS, Shape, bench_main, make_inputs, measured_row, mode_runner, op_for,
)
from invdiff.ops import reference  # noqa: E402

RATIO = 2.0
# Passes over B x D elements; design and minimum agree for these single-pass ops.
PASSES = {("combine", "forward"): 3, ("combine", "backward"): 2, ("combine", "full"): 5, ("cfg", "forward"): 3}
IDEAL_TENSOR_PASSES = PASSES  # the name the pytest-benchmark suite used before


def reference_combine(eps, g):
    return reference.guidance_combine(eps, g, RATIO)


def triton_combine(eps, g):
    from invdiff.kernels.guidance_combine import guidance_combine

    return guidance_combine(eps, g, RATIO)


def reference_cfg(uncond, cond, scale):
    return reference.cfg_combine(uncond, cond, scale)


def triton_cfg(uncond, cond, scale):
    from invdiff.kernels.guidance_combine import cfg_combine

    return cfg_combine(uncond, cond, scale)


def setup(op: str, provider: str, mode: str, shape: Shape, dtype: torch.dtype, device: str):
    """(callable doing one step, design bytes, minimum bytes): the factory the pytest-benchmark
    suite reuses. Inputs are (B, C, H, W) in `dtype`; cfg's scale is (B,) float32."""
    if (op, mode) not in PASSES:
        raise ValueError(f"{op} has no {mode} benchmark; known: {sorted(PASSES)}")
    inputs = make_inputs(shape, dtype, device)
    if op == "combine":
        fn = op_for(provider, reference_combine, triton_combine)
        run = mode_runner(mode, lambda: fn(inputs["eps"], inputs["g"]), [inputs["g"]])
    else:
        uncond, cond = inputs["eps"], inputs["target"]
        scale = torch.linspace(1.0, 9.0, shape.batch, device=device)
        fn = op_for(provider, reference_cfg, triton_cfg)

        def run():
            with torch.no_grad():
                fn(uncond, cond, scale)

    nbytes = PASSES[(op, mode)] * shape.numel * inputs["eps"].element_size()
    return run, nbytes, nbytes


def run_grid(shapes: List[Shape], dtypes: List[str], modes: List[str], providers: Optional[List[str]], device: str) -> Iterator[Dict]:
    for op in ("combine", "cfg"):
        for shape in shapes:
            for dtype_name in dtypes:
                for mode in modes:
                    if (op, mode) not in PASSES:
                        continue
                    for provider in providers or PROVIDERS:
                        row = {"op": op, "shape": str(shape), "batch": shape.batch, "dtype": dtype_name, "mode": mode,
                               "provider": provider}
                        yield measured_row(row, provider, device, lambda: setup(op, provider, mode, shape, DTYPES[dtype_name], device),
                                           graph=mode != "backward")  # see bench_invariant_loss.run_grid


if __name__ == "__main__":
    bench_main(__doc__.splitlines()[0], run_grid)
