"""Benchmark the fused invariant loss against eager and compiled PyTorch.

    python benchmarks/bench_invariant_loss.py                      # CUDA if present, else CPU
    python benchmarks/bench_invariant_loss.py --dtypes bf16 fp32 --batches 16 64 1024 --json out.json

Traffic, in passes over B x D elements of the input dtype:
  this design (kernels/invariant_loss.py): forward reads eps, g and target once (3); backward
  reads them again and writes grad_g (4); full 7.
  minimum: forward 3; backward 4 (it has only the inputs and per-row scalars to work from);
  full 4: each input read once and grad_g written once, which a design could approach only by
  keeping the inputs (or the residual) on chip between the loss and its gradient.
GB/s counts this design's bytes; "% copy" and "% SOL" compare with a device copy of the design's
and the minimum's byte count, timed the same way in the same run (benchmarks/common.py).
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
LAM = 1.0
# Keep in step with kernels/invariant_loss.py: a kernel that keeps the residual or folds a pass
# changes DESIGN_PASSES, never MIN_PASSES.
DESIGN_PASSES = {"forward": 3, "backward": 4, "full": 7}
MIN_PASSES = {"forward": 3, "backward": 4, "full": 4}


def reference_loss(eps, g, target, weights):
    return reference.invariant_loss(eps, target, weights, LAM, g=g, ratio=RATIO)


def triton_loss(eps, g, target, weights):
    from invdiff.kernels.invariant_loss import invariant_loss

    return invariant_loss(eps, target, weights, LAM, g=g, ratio=RATIO)


def setup(provider: str, mode: str, shape: Shape, dtype: torch.dtype, device: str):
    """(callable doing one step, design bytes, minimum bytes) for one benchmark point: the shared
    factory that the pytest-benchmark suite reuses. Inputs are (B, C, H, W) in `dtype`."""
    inputs = make_inputs(shape, dtype, device)
    fn = op_for(provider, reference_loss, triton_loss)
    run = mode_runner(mode, lambda: fn(inputs["eps"], inputs["g"], inputs["target"], inputs["weights"]), [inputs["g"]])
    pass_bytes = shape.numel * inputs["eps"].element_size()
    return run, DESIGN_PASSES[mode] * pass_bytes, MIN_PASSES[mode] * pass_bytes


def with_fused_group(setup_fn):
    """setup_fn's step with the group reduction folded into pass 1 (TUNING["fuse_group"], off by
    default until a GPU run has checked it): timed beside the two-launch default."""
    from invdiff.kernels.utils import TUNING

    def wrapped():
        run, design, minimum = setup_fn()

        def step():
            old = TUNING["fuse_group"]
            TUNING["fuse_group"] = True
            try:
                run()
            finally:
                TUNING["fuse_group"] = old

        return step, design, minimum

    return wrapped


def run_grid(shapes: List[Shape], dtypes: List[str], modes: List[str], providers: Optional[List[str]], device: str) -> Iterator[Dict]:
    # Shapes outermost, in the order given: gpu_check.sh passes B = 1024 first, the graded batch,
    # so that a run cut short loses the small batches, not the goal's rows.
    for shape in shapes:
        for dtype_name in dtypes:
            for mode in modes:
                for provider in providers or PROVIDERS:
                    row = {"op": "invariant_loss", "shape": str(shape), "batch": shape.batch, "dtype": dtype_name, "mode": mode,
                           "provider": provider}
                    # The backward alone replays a graph recorded outside the capture stream, so
                    # it is not captured (its ops would run on the forward's stream).
                    yield measured_row(row, provider, device, lambda: setup(provider, mode, shape, DTYPES[dtype_name], device),
                                       graph=mode != "backward")
                    if provider == "triton" and mode != "backward":
                        row = {**row, "provider": "triton-fused-group"}
                        for key in [k for k in row if k not in ("op", "shape", "batch", "dtype", "mode", "provider")]:
                            del row[key]
                        yield measured_row(row, "triton", device,
                                           with_fused_group(lambda: setup("triton", mode, shape, DTYPES[dtype_name], device)))


if __name__ == "__main__":
    bench_main(__doc__.splitlines()[0], run_grid)
