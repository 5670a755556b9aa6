"""Benchmark the fused invariant loss against eager and compiled PyTorch.

    python benchmarks/bench_invariant_loss.py                      # CUDA if present, else CPU
    python benchmarks/bench_invariant_loss.py --dtypes bf16 fp32 --batches 64 256 --json out.json

Ideal bytes (the physical minimum the kernels are built to): forward reads eps, g and target once
(3 x B x D elements); backward reads them once more and writes grad_g (4 x B x D); full is 7 x.
GB/s is those bytes over the measured time, and "% copy BW" compares it with a device-to-device
copy measured in the same run.
"""
from __future__ import annotations

import os
import sys
from typing import Dict, Iterator, List

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402
    DTYPES, Shape, bench_main, make_inputs, measured_row, mode_runner, op_for,
)
from invdiff.ops import reference  # noqa: E402

RATIO = 2.0
LAM = 1.0
IDEAL_TENSOR_PASSES = {"forward": 3, "backward": 4, "full": 7}


def reference_loss(eps, g, target, weights):
    return reference.invariant_loss(eps, target, weights, LAM, g=g, ratio=RATIO)


def triton_loss(eps, g, target, weights):
    from invdiff.kernels.invariant_loss import invariant_loss

    return invariant_loss(eps, target, weights, LAM, g=g, ratio=RATIO)


def setup(provider: str, mode: str, shape: Shape, dtype: torch.dtype, device: str):
    """(callable doing one step, ideal bytes) for one benchmark point: the shared factory that the
    pytest-benchmark suite reuses."""
    inputs = make_inputs(shape, dtype, device)
    fn = op_for(provider, reference_loss, triton_loss)
    run = mode_runner(mode, lambda: fn(inputs["eps"], inputs["g"], inputs["target"], inputs["weights"]), [inputs["g"]])
    ideal = IDEAL_TENSOR_PASSES[mode] * shape.numel * inputs["eps"].element_size()
    return run, ideal


def run_grid(shapes: List[Shape], dtypes: List[str], modes: List[str], providers: List[str], device: str) -> Iterator[Dict]:
    for shape in shapes:
        for dtype_name in dtypes:
            for mode in modes:
                for provider in providers:
                    row = {"op": "invariant_loss", "shape": str(shape), "dtype": dtype_name, "mode": mode, "provider": provider}
                    yield measured_row(row, provider, device, lambda: setup(provider, mode, shape, DTYPES[dtype_name], device))


if __name__ == "__main__":
    bench_main(__doc__.splitlines()[0], run_grid)
