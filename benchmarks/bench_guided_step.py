"""Benchmark the fused guided sampling step against the eager chain it replaces.

    python benchmarks/bench_guided_step.py                     # CUDA if the extension has it, else CPU
    python benchmarks/bench_guided_step.py --batches 64 256 --dtypes fp32 bf16 --json out.json

Providers, all doing one DDIM (v-prediction) or DDPM step with CFG and G_psi on both branches:
  eager-chain  what sampling did before: combine each branch with G (with strength), CFG, then
               diffusers' scheduler.step; about 15 elementwise kernels;
  reference    invdiff.ops.reference.guided_step, the same update from the coefficient table;
  fused        invdiff.ops.guided_step through invdiff._C (one pass).
Ideal bytes: read x, eps_uncond, eps_cond, g_uncond, g_cond (and the noise for DDPM) once and
write x_prev once: 6 (7) passes over B x C x H x W.
"""
from __future__ import annotations

import os
import sys
from typing import Dict, Iterator, List

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import DTYPES, Shape, bench_main, measure  # noqa: E402
from invdiff import ops  # noqa: E402
from invdiff.sampling.step_coeffs import guidance_columns, plan_steps  # noqa: E402

PROVIDERS = ("eager-chain", "reference", "fused")
RATIO, STRENGTH, SCALE, STEPS = 2.0, 1.0, 2.0, 50


def scheduler(kind: str):
    from diffusers import DDIMScheduler, DDPMScheduler

    cls = DDIMScheduler if kind == "ddim" else DDPMScheduler
    sched = cls(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", clip_sample=False)
    sched.set_timesteps(STEPS)
    return sched


def setup(provider: str, kind: str, shape: Shape, dtype: torch.dtype, device: str):
    """(callable doing one step, ideal bytes) at step 10 of a 50-step schedule."""
    sched = scheduler(kind)
    gen = torch.Generator().manual_seed(0)
    dims = (shape.batch, shape.channels, shape.size, shape.size)
    x, eps_u, eps_c, g_u, g_c = (torch.randn(dims, generator=gen).to(device, dtype) for _ in range(5))
    k = 10
    t = sched.timesteps[k]
    plan = plan_steps(sched, STEPS)
    coeffs = guidance_columns(plan.coeffs[[k] * shape.batch].clone(), RATIO, STRENGTH, SCALE).float().to(device)
    noise = torch.randn(dims, generator=gen).to(device, dtype) if plan.draws_noise[k] else None
    passes = 6 + (noise is not None)
    if provider == "fused":
        def run():
            ops.guided_step(x, eps_u, eps_c, g_u, g_c, coeffs, noise)
    elif provider == "reference":
        def run():
            ops.reference.guided_step(x, eps_u, eps_c, g_u, g_c, coeffs, noise)
    elif provider == "eager-chain":
        def combine(eps, g):
            combined = ops.reference.guidance_combine(eps, g, RATIO)
            return eps + STRENGTH * (combined - eps)

        step_gen = torch.Generator(device=device).manual_seed(0)

        def run():
            m = ops.reference.cfg_combine(combine(eps_u, g_u), combine(eps_c, g_c), SCALE)
            sched.step(m, t, x, generator=step_gen)
    else:
        raise ValueError(f"unknown provider {provider!r}; known: {PROVIDERS}")
    return run, passes * shape.numel * x.element_size()


def provider_unavailable(provider: str, device: str):
    if provider == "fused":
        from invdiff import _ext

        module, reason = _ext.extension()
        if module is None:
            return reason
        if device == "cuda" and not module.build_info()["with_cuda"]:
            return "invdiff._C was built without CUDA"
    return None


def run_grid(shapes: List[Shape], dtypes: List[str], modes: List[str], providers: List[str], device: str) -> Iterator[Dict]:
    for kind in ("ddim", "ddpm"):
        for shape in shapes:
            for dtype_name in dtypes:
                for provider in PROVIDERS:
                    row = {"op": f"guided_step/{kind}", "shape": str(shape), "dtype": dtype_name, "mode": "forward", "provider": provider}
                    why = provider_unavailable(provider, device)
                    if why:
                        row["skipped"] = why
                    else:
                        run, ideal = setup(provider, kind, shape, DTYPES[dtype_name], device)
                        row.update(measure(run, ideal, device))
                    yield row


def add_speedups(rows: List[Dict]) -> None:
    """x eager-chain for each row, from the same run."""
    base = {(r["op"], r["shape"], r["dtype"]): r.get("ms") for r in rows if r["provider"] == "eager-chain"}
    for r in rows:
        ref = base.get((r["op"], r["shape"], r["dtype"]))
        if ref and r.get("ms"):
            r["vs_eager"] = ref / r["ms"]


if __name__ == "__main__":
    default_device = "cpu"
    if torch.cuda.is_available() and provider_unavailable("fused", "cuda") is None:
        default_device = "cuda"
    argv = sys.argv[1:]
    if "--device" not in argv:
        argv = ["--device", default_device] + argv
    if "--batches" not in argv:
        argv += ["--batches", "64", "256"]
    if "--size" not in argv:
        argv += ["--size", "64"]
    rows = bench_main(__doc__.splitlines()[0], run_grid, argv, ratios=add_speedups)
