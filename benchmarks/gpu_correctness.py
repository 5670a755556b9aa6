"""Correctness of the fused kernels and of invdiff._C's CUDA guided step on a GPU at SD-sized
shapes (run by gpu_check.sh).

Applies the tests' own oracle (tests/utils.py: compare_to_reference, DESIGN.md's tolerance rule)
to the loss, grad_g and grad_eps at B up to 256 x 4x64x64 in fp32, bf16 and fp16, and to the
combine and CFG combine. Prints one line per case and exits non-zero if any fails. Smoke-test it on the CPU with
    TRITON_INTERPRET=1 python benchmarks/gpu_correctness.py --device cpu --size 6 --max-batch 4
"""
from __future__ import annotations

import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ["INVDIFF_BACKEND"] = "triton"

from invdiff import ops  # noqa: E402
from invdiff.ops import reference  # noqa: E402
from tests.utils import compare_to_reference  # noqa: E402


def cases(max_batch: int):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for batch, groups in ((1, 2), (64, 8), (256, 2), (256, 256)):
            batch, groups = min(batch, max_batch), min(groups, max_batch)
            for ratio in (2.0, 0.5, None):
                yield "invariant_loss", dtype, batch, groups, ratio
        for batch in (1, max_batch):
            yield "combine", dtype, batch, None, 2.0
            yield "cfg", dtype, batch, None, None
            yield "guided_step", dtype, batch, None, None


def run_case(op, dtype, batch, groups, ratio, device, size):
    gen = torch.Generator().manual_seed(batch)
    shape = (batch, 4, size, size)
    x = torch.randn(shape, generator=gen).to(device, dtype).requires_grad_()
    y = (0.3 * torch.randn(shape, generator=gen)).to(device, dtype).requires_grad_()
    t = torch.randn(shape, generator=gen).to(device, dtype)
    if op == "invariant_loss":
        w = torch.rand(batch, groups, generator=gen).to(device)
        if groups > 2:
            w[:, 1] = 0.0  # an empty group
        if ratio is None:
            y = y.detach()
            fast = lambda p, tt, gg, ww: ops.invariant_loss(p, tt, ww, 1.0)  # noqa: E731
            ref = lambda p, tt, gg, ww: reference.invariant_loss(p, tt, ww, 1.0)  # noqa: E731
        else:
            fast = lambda p, tt, gg, ww: ops.invariant_loss(p, tt, ww, 1.0, g=gg, ratio=ratio)  # noqa: E731
            ref = lambda p, tt, gg, ww: reference.invariant_loss(p, tt, ww, 1.0, g=gg, ratio=ratio)  # noqa: E731
        compare_to_reference(fast, ref, [x, t, y, w], grad_output=torch.tensor(1.3, device=device, dtype=torch.float64))
    elif op == "guided_step":  # invdiff._C's CUDA path, every input present, random coefficients
        from invdiff.sampling.step_coeffs import NUM_COEFFS
        from tests.utils import assert_close_to_ref, rounding_atol

        os.environ["INVDIFF_BACKEND"] = "cpp"
        try:
            coeffs = torch.randn(batch, NUM_COEFFS, generator=gen).to(device)
            coeffs[:, 5] = 1.5  # clip on
            z = torch.randn(shape, generator=gen).to(device, dtype)
            args = (x.detach(), y.detach(), t, y.detach() * 0.5, x.detach() * 0.25, coeffs, z)
            out = ops.guided_step(*args)
            same = reference.guided_step(*args)
            ref = reference.guided_step(*[a.double() if a is not coeffs else a for a in args])
            assert_close_to_ref(out, ref, same, atol=rounding_atol(dtype, float(ref.abs().max())), name="guided_step")
        finally:
            os.environ["INVDIFF_BACKEND"] = "triton"
    elif op == "combine":
        compare_to_reference(lambda a, b: ops.guidance_combine(a, b, ratio), lambda a, b: reference.guidance_combine(a, b, ratio), [x, y])
    else:
        scale = torch.linspace(1.0, 9.0, batch, device=device)
        compare_to_reference(lambda a, b: ops.cfg_combine(a, b, scale), lambda a, b: reference.cfg_combine(a, b, scale), [x, y])


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="kernel correctness at SD-sized shapes")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=64, help="latent side (4 x size x size)")
    parser.add_argument("--max-batch", type=int, default=256)
    args = parser.parse_args(argv)
    failures = 0
    for op, dtype, batch, groups, ratio in cases(args.max_batch):
        label = f"{op:15s} {str(dtype).replace('torch.', ''):9s} B={batch:<4d} K={groups} r={ratio}"
        try:
            run_case(op, dtype, batch, groups, ratio, args.device, args.size)
            print(f"PASS {label}", flush=True)
        except Exception:  # report every case, then fail at the end
            failures += 1
            print(f"FAIL {label}\n{traceback.format_exc(limit=2)}", flush=True)
    print(f"correctness: {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
