"""Correctness of the fused Triton kernels and of invdiff._C's CUDA guided step on a GPU at
SD-sized shapes (run by gpu_check.sh).

Applies the tests' own oracle (tests/utils.py: compare_to_reference, DESIGN.md's tolerance rule:
the fast op's error against an fp64 reference is at most twice the reference's own error in the
fast op's dtype) to every case below, and prints one PASS/FAIL line per case.

  triton       (INVDIFF_BACKEND=triton, so a declined input is an error, not a silent fallback)
               invariant loss: loss, grad_g and grad_eps at B up to 256 x 4x64x64, K up to 256
               (an empty group included), r > 1, r < 1 and no G, in fp32, bf16 and fp16;
               combine and CFG combine (per-sample scale); every op again on a strided batch
               (x[::2]), channels-last, a misaligned start (storage offset of one element) and an
               odd row size (3x7x9); the learned CFG scale (a per-row weight that requires grad,
               alone and with the inputs); the group reduction folded into pass 1
               (TUNING["fuse_group"]) against the reference, and bitwise against its own launch;
  guided_step  (INVDIFF_BACKEND=cpp: the extension's CUDA kernel) every flag combination (with or
               without the CFG uncond branch, with or without G, with or without noise) on an
               aligned and an odd row size, in each dtype and with 16-bit model outputs next to an
               fp32 state; out=x; a misaligned start, which takes the kernel's scalar path; B = 1.

    python benchmarks/gpu_correctness.py --json out.json                  # on the GPU
    TRITON_INTERPRET=1 python benchmarks/gpu_correctness.py --dry         # tiny, on the CPU
The JSON is rewritten after every case ("complete": false until the last). Exits non-zero if
any case fails.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import traceback
from typing import Callable, Iterator, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ["INVDIFF_BACKEND"] = "triton"

from benchmarks.common import write_json  # noqa: E402
from invdiff import ops  # noqa: E402
from invdiff.ops import reference  # noqa: E402
from tests.utils import assert_close_to_ref, compare_to_reference, rounding_atol  # noqa: E402

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
LAYOUTS = ("strided", "channels_last", "misaligned", "odd_d")
ODD_SAMPLE = (3, 7, 9)  # 189 elements a row: no vector width or block divides it


def make_tensor(shape: Tuple[int, ...], dtype: torch.dtype, device: str, gen: torch.Generator,
                layout: str = "contiguous", scale: float = 1.0) -> torch.Tensor:
    """A (B, C, H, W) tensor of N(0, scale^2) values with the requested memory layout:
    contiguous; strided (every other sample of a 2B batch, as x[::2]); channels_last;
    misaligned (contiguous, but starting one element into its storage, so no pointer is 16-byte
    aligned); odd_d is contiguous (the odd row size comes from the shape)."""
    values = (scale * torch.randn(shape, generator=gen)).to(dtype)
    if layout == "strided":
        full = torch.zeros((2 * shape[0],) + tuple(shape[1:]), dtype=dtype, device=device)
        full[::2] = values.to(device)
        return full[::2]
    if layout == "channels_last":
        return values.to(device).contiguous(memory_format=torch.channels_last)
    if layout == "misaligned":
        storage = torch.zeros(values.numel() + 1, dtype=dtype, device=device)
        view = storage[1:].view(shape)
        view.copy_(values.to(device))
        return view
    return values.to(device)


class Case:
    """One named check: `run()` raises (an AssertionError with the measured error) on failure."""

    def __init__(self, group: str, label: str, run: Callable[[], None]):
        self.group, self.label, self.run = group, label, run


def loss_case(dtype, batch, groups, ratio, device, sample, layout="contiguous") -> Callable[[], None]:
    """invariant_loss (with G and `ratio`, or without G when ratio is None): loss and the
    gradients of every input that requires one, against the reference."""

    def run():
        gen = torch.Generator().manual_seed(batch * 31 + groups)
        shape = (batch,) + sample
        eps = make_tensor(shape, dtype, device, gen, layout).requires_grad_()
        g = make_tensor(shape, dtype, device, gen, layout, 0.3).requires_grad_(ratio is not None)
        target = make_tensor(shape, dtype, device, gen, layout)
        w = torch.rand(batch, groups, generator=gen).to(device)
        if groups > 2:
            w[:, 1] = 0.0  # an empty group
        if ratio is None:
            fast = lambda p, t, gg, ww: ops.invariant_loss(p, t, ww, 1.0)  # noqa: E731
            ref = lambda p, t, gg, ww: reference.invariant_loss(p, t, ww, 1.0)  # noqa: E731
        else:
            fast = lambda p, t, gg, ww: ops.invariant_loss(p, t, ww, 1.0, g=gg, ratio=ratio)  # noqa: E731
            ref = lambda p, t, gg, ww: reference.invariant_loss(p, t, ww, 1.0, g=gg, ratio=ratio)  # noqa: E731
        compare_to_reference(fast, ref, [eps, target, g, w], grad_output=torch.tensor(1.3, device=device, dtype=torch.float64), name="invariant_loss")

    return run


def combine_case(op, dtype, batch, device, sample, layout="contiguous", learned_scale: Optional[str] = None) -> Callable[[], None]:
    """guidance_combine (r = 2) or cfg_combine (per-sample scale in [1, 9]) against the
    reference, forward and backward. learned_scale: "alone" (only the (B,) scale requires grad:
    the case that once returned one tensor twice) or "with_inputs"."""

    def run():
        gen = torch.Generator().manual_seed(batch * 7 + len(layout))
        shape = (batch,) + sample
        needs_input_grad = learned_scale != "alone"
        x = make_tensor(shape, dtype, device, gen, layout).requires_grad_(needs_input_grad)
        y = make_tensor(shape, dtype, device, gen, layout, 0.3).requires_grad_(needs_input_grad)
        if op == "combine":
            compare_to_reference(lambda a, b: ops.guidance_combine(a, b, 2.0), lambda a, b: reference.guidance_combine(a, b, 2.0),
                                 [x, y], name="guidance_combine")
            return
        scale = torch.linspace(1.0, 9.0, batch, device=device).requires_grad_(learned_scale is not None)
        compare_to_reference(ops.cfg_combine, reference.cfg_combine, [x, y, scale], name="cfg_combine")

    return run


def guided_step_case(state_dtype, model_dtype, batch, sample, uncond, g, noise, device,
                     in_place=False, layout="contiguous") -> Callable[[], None]:
    """invdiff._C's guided step (forced: INVDIFF_BACKEND=cpp) against the fp64 reference, with
    random coefficients and clipping on about half of the rows. x and noise are `state_dtype`,
    the model outputs (eps_*, g_*) `model_dtype`; in_place passes out=x."""
    from invdiff.sampling.step_coeffs import NUM_COEFFS, Col

    def run():
        gen = torch.Generator().manual_seed(batch + 3 * uncond + 5 * g + 7 * noise)
        shape = (batch,) + sample

        def state():
            return make_tensor(shape, state_dtype, device, gen, layout)

        def model(scale=1.0):
            return make_tensor(shape, model_dtype, device, gen, layout, scale)

        coeffs = torch.randn(batch, NUM_COEFFS, generator=gen)
        coeffs[:, Col.CLIP] = torch.where(torch.rand(batch, generator=gen) < 0.5, 0.0, 1.5)
        args = dict(x=state(), eps_uncond=model() if uncond else None, eps_cond=model(),
                    g_uncond=model(0.3) if (uncond and g) else None, g_cond=model(0.3) if g else None,
                    coeffs=coeffs.to(device), noise=state() if noise else None)
        same = reference.guided_step(**args)
        ref = reference.guided_step(**{k: (v.double() if (v is not None and k != "coeffs") else v) for k, v in args.items()})
        saved = os.environ.get("INVDIFF_BACKEND")
        os.environ["INVDIFF_BACKEND"] = "cpp"
        try:
            if in_place:
                x = args["x"]
                out = ops.guided_step(**args, out=x)
                assert out.data_ptr() == x.data_ptr(), "guided_step(out=x) did not return x"
            else:
                out = ops.guided_step(**args)
        finally:
            os.environ["INVDIFF_BACKEND"] = saved or "triton"
        assert out.dtype == state_dtype, f"guided_step returned {out.dtype}, not the state's {state_dtype}"
        atol = rounding_atol(state_dtype, float(ref.abs().max()))
        assert_close_to_ref(out, ref, same, atol=atol, name="guided_step")

    return run


def with_fused_group(run: Callable[[], None]) -> Callable[[], None]:
    """`run` with TUNING["fuse_group"] on: the last program of pass 1 does the group algebra
    (an atomic ticket). Its memory ordering is only checkable on a GPU; it runs a few times, since
    a race would show only now and then."""
    from invdiff.kernels.utils import TUNING

    def go():
        old = TUNING["fuse_group"]
        TUNING["fuse_group"] = True
        try:
            for _ in range(3):
                run()
        finally:
            TUNING["fuse_group"] = old

    return go


def fused_group_bitwise_case(dtype, batch, groups, device, sample) -> Callable[[], None]:
    """The folded group reduction (TUNING["fuse_group"]) against the group kernel's own launch:
    kernels/invariant_loss.py promises bitwise the same loss, statistics and gradients (the same
    _group_body in a program of the same num_warps). The interpreter's tiny tiles cannot show a
    difference in reduction order; the compiled kernels can."""
    from invdiff.kernels.utils import TUNING

    def run():
        gen = torch.Generator().manual_seed(batch * 13 + groups)
        shape = (batch,) + sample
        eps = make_tensor(shape, dtype, device, gen)
        target = make_tensor(shape, dtype, device, gen)
        g = make_tensor(shape, dtype, device, gen, scale=0.3).requires_grad_()
        w = torch.rand(batch, groups, generator=gen).to(device)
        results = []
        old = TUNING["fuse_group"]
        try:
            for fuse in (False, True):
                TUNING["fuse_group"] = fuse
                g.grad = None
                stats = ops.invariant_loss_with_stats(eps, target, w, 1.0, g=g, ratio=2.0)
                stats.loss.backward()
                results.append([t.detach().clone() for t in stats] + [g.grad.clone()])
        finally:
            TUNING["fuse_group"] = old
        names = ("loss", "per_sample", "risks", "weight_sums", "grad_g")
        differ = [n for n, a, b in zip(names, *results) if not torch.equal(a, b)]
        assert not differ, f"the folded group reduction is not bitwise the group kernel's: {differ} differ"

    return run


def cases(device: str, size: int, max_batch: int, dry: bool) -> Iterator[Case]:
    """Every case, in the order they run. `dry` keeps one of each kind (tiny CPU run)."""
    dtypes = [torch.float32, torch.bfloat16] if dry else [torch.float32, torch.bfloat16, torch.float16]
    sd = (4, size, size)
    big = max_batch
    loss_groups = ((1, 2), (big, 3)) if dry else ((1, 2), (min(64, big), 8), (big, 2), (big, min(256, big)))
    ratios = (2.0, None) if dry else (2.0, 0.5, None)

    for dtype in dtypes:
        name = DTYPE_NAMES[dtype]
        for batch, groups in loss_groups:
            for ratio in ratios:
                yield Case("triton", f"invariant_loss {name} B={batch} K={groups} r={ratio}",
                           loss_case(dtype, batch, groups, ratio, device, sd))
        for op in ("combine", "cfg"):
            for batch in (1, big):
                yield Case("triton", f"{op} {name} B={batch}", combine_case(op, dtype, batch, device, sd))
        for layout in LAYOUTS:
            sample = ODD_SAMPLE if layout == "odd_d" else sd
            yield Case("triton", f"invariant_loss {name} {layout} B={big} r=2",
                       loss_case(dtype, big, 2, 2.0, device, sample, layout))
            for op in ("combine", "cfg"):
                yield Case("triton", f"{op} {name} {layout} B={big}", combine_case(op, dtype, big, device, sample, layout))
        for batch, groups in loss_groups:  # the group reduction folded into pass 1 (off by default)
            yield Case("triton", f"invariant_loss fused-group {name} B={batch} K={groups} r=2",
                       with_fused_group(loss_case(dtype, batch, groups, 2.0, device, sd)))
            yield Case("triton", f"invariant_loss fused-group bitwise {name} B={batch} K={groups}",
                       fused_group_bitwise_case(dtype, batch, groups, device, sd))
        for learned in ("alone", "with_inputs"):
            yield Case("triton", f"cfg {name} learned scale ({learned}) B={big}",
                       combine_case("cfg", dtype, big, device, sd, learned_scale=learned))

    flags = list(itertools.product([True, False], repeat=3))
    dtype_pairs = [(d, d) for d in dtypes] + [(torch.float32, torch.bfloat16)] + ([] if dry else [(torch.float32, torch.float16)])
    for state_dtype, model_dtype in dtype_pairs:
        pair = DTYPE_NAMES[state_dtype] + ("" if model_dtype == state_dtype else f"+{DTYPE_NAMES[model_dtype]} model")
        for sample in (sd, ODD_SAMPLE):
            for uncond, g, noise in flags:
                label = f"guided_step {pair} B={big} {'x'.join(map(str, sample))} uncond={int(uncond)} g={int(g)} noise={int(noise)}"
                yield Case("guided_step", label, guided_step_case(state_dtype, model_dtype, big, sample, uncond, g, noise, device))
        for sample in (sd, ODD_SAMPLE):
            yield Case("guided_step", f"guided_step {pair} out=x B={big} {'x'.join(map(str, sample))}",
                       guided_step_case(state_dtype, model_dtype, big, sample, True, True, True, device, in_place=True))
        yield Case("guided_step", f"guided_step {pair} misaligned (scalar path) B={big}",
                   guided_step_case(state_dtype, model_dtype, big, sd, True, True, True, device, layout="misaligned"))
        yield Case("guided_step", f"guided_step {pair} B=1",
                   guided_step_case(state_dtype, model_dtype, 1, sd, True, True, True, device))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="kernel correctness at SD-sized shapes")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=64, help="latent side (4 x size x size)")
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--only", choices=["triton", "guided_step"], help="run one group of cases")
    parser.add_argument("--dry", action="store_true", help="tiny CPU sizes, one case of each kind (needs TRITON_INTERPRET=1)")
    parser.add_argument("--json", help="write every case's result here")
    args = parser.parse_args(argv)
    if args.dry:
        args.device, args.size, args.max_batch = "cpu", 4, 3
    results: List[dict] = []
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"

    def write(complete: bool) -> None:
        # After every case, atomically: a step killed at its timeout keeps the cases it checked,
        # and "complete": false says the rest were not.
        failed = sum(not r["ok"] for r in results)
        write_json(args.json, {"device": device, "dry": args.dry, "complete": complete, "passed": len(results) - failed,
                               "failed": failed, "cases": results})

    for case in cases(args.device, args.size, args.max_batch, args.dry):
        if args.only and case.group != args.only:
            continue
        try:
            case.run()
            results.append({"group": case.group, "case": case.label, "ok": True})
            print(f"PASS {case.label}", flush=True)
        except Exception as err:  # report every case, then fail at the end
            results.append({"group": case.group, "case": case.label, "ok": False, "error": f"{type(err).__name__}: {err}"[:2000]})
            print(f"FAIL {case.label}\n{traceback.format_exc(limit=3)}", flush=True)
        write(complete=False)
    write(complete=True)
    failed = sum(not r["ok"] for r in results)
    print(f"correctness{' (' + args.only + ')' if args.only else ''}: {len(results) - failed} passed, {failed} failed")
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
