"""Benchmark the fused guided sampling step against the eager chain it replaces and against
torch.compile.

    python benchmarks/bench_guided_step.py                     # CUDA if the extension has it, else CPU
    python benchmarks/bench_guided_step.py --batches 16 64 1024 --dtypes fp32 bf16 --json out.json

Providers, all doing one DDIM (v-prediction) or DDPM step with CFG and G_psi on both branches:
  eager-chain    what sampling did before: combine each branch with G, CFG, then diffusers'
                 scheduler.step; about a dozen elementwise kernels. The guidance strength is 1,
                 and at 1 the sampler skips the strength blend (combine_with_strength), so the
                 chain does too: no no-op work pads the baseline;
  reference      invdiff.ops.reference.guided_step, the same update from the coefficient table;
  torch.compile  that reference through torch.compile (Inductor fuses it into a kernel or two):
                 the baseline a skeptic would write;
  fused          invdiff.ops.guided_step through invdiff._C (one pass).
Traffic: read x, eps_uncond, eps_cond, g_uncond, g_cond (and the noise for DDPM) once and write
x_prev once: 6 (7) passes over B x C x H x W, both this design's and the minimum.
"""
from __future__ import annotations

import os
import sys
from typing import Dict, Iterator, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import DTYPES, Shape, add_ratios, bench_main, compiled, measure  # noqa: E402
from invdiff import ops  # noqa: E402
from invdiff.sampling.step_coeffs import guidance_columns, plan_steps  # noqa: E402

PROVIDERS = ("eager-chain", "reference", "torch.compile", "fused")
RATIO, STRENGTH, SCALE, STEPS = 2.0, 1.0, 2.0, 50
STEP_INDEX = 10  # step 10 of 50: DDPM draws noise there, so its row reads the noise too


def scheduler(kind: str):
    from diffusers import DDIMScheduler, DDPMScheduler

    cls = DDIMScheduler if kind == "ddim" else DDPMScheduler
    sched = cls(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", clip_sample=False)
    sched.set_timesteps(STEPS)
    return sched


def eager_combine(eps: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The sampler's eps_tilde in eager PyTorch (models.guidance.combine_with_strength): the
    strength blend only when the strength is not 1."""
    combined = ops.reference.guidance_combine(eps, g, RATIO)
    if STRENGTH == 1.0:
        return combined
    return eps + STRENGTH * (combined - eps)


def setup(provider: str, kind: str, shape: Shape, dtype: torch.dtype, device: str):
    """(callable doing one step, design bytes, minimum bytes) at step 10 of a 50-step schedule.
    Every image tensor is (B, C, H, W) in `dtype`; the coefficient table is (B, 16) float32."""
    sched = scheduler(kind)
    gen = torch.Generator().manual_seed(0)
    dims = (shape.batch, shape.channels, shape.size, shape.size)
    x, eps_u, eps_c, g_u, g_c = (torch.randn(dims, generator=gen).to(device, dtype) for _ in range(5))
    t = sched.timesteps[STEP_INDEX]
    plan = plan_steps(sched, STEPS)
    coeffs = guidance_columns(plan.coeffs[[STEP_INDEX] * shape.batch].clone(), RATIO, STRENGTH, SCALE).float().to(device)
    noise = torch.randn(dims, generator=gen).to(device, dtype) if plan.draws_noise[STEP_INDEX] else None
    nbytes = (6 + (noise is not None)) * shape.numel * x.element_size()
    if provider == "fused":
        def run():
            ops.guided_step(x, eps_u, eps_c, g_u, g_c, coeffs, noise)
    elif provider in ("reference", "torch.compile"):
        step = ops.reference.guided_step if provider == "reference" else compiled(ops.reference.guided_step)

        def run():
            step(x, eps_u, eps_c, g_u, g_c, coeffs, noise)
    elif provider == "eager-chain":
        # generator=None: DDPM's noise comes from the default CUDA generator, which a CUDA
        # graph can capture (a private generator would have to be registered with the graph).
        def run():
            m = ops.reference.cfg_combine(eager_combine(eps_u, g_u), eager_combine(eps_c, g_c), SCALE)
            sched.step(m, t, x)
    else:
        raise ValueError(f"unknown provider {provider!r}; known: {PROVIDERS}")
    return run, nbytes, nbytes


def provider_unavailable(provider: str, device: str) -> Optional[str]:
    if provider == "fused":
        from invdiff import _ext

        module, reason = _ext.extension()
        if module is None:
            return reason
        if device == "cuda" and not module.build_info()["with_cuda"]:
            return "invdiff._C was built without CUDA"
    return None


def run_grid(shapes: List[Shape], dtypes: List[str], modes: List[str], providers: Optional[List[str]], device: str) -> Iterator[Dict]:
    # Shapes outermost, in the order given (gpu_check.sh passes B = 1024 first, the graded batch),
    # then both schedulers: a run cut short keeps DDIM and DDPM at B = 1024.
    for shape in shapes:
        for kind in ("ddim", "ddpm"):
            for dtype_name in dtypes:
                for provider in providers or PROVIDERS:
                    row = {"op": f"guided_step/{kind}", "shape": str(shape), "batch": shape.batch, "dtype": dtype_name,
                           "mode": "forward", "provider": provider}
                    why = provider_unavailable(provider, device)
                    if why:
                        row["skipped"] = why
                    else:
                        run, design, minimum = setup(provider, kind, shape, DTYPES[dtype_name], device)
                        row.update(measure(run, design, minimum, device))
                    yield row


def add_speedups(rows: List[Dict]) -> None:
    """x eager-chain (vs_eager) and x torch.compile (vs_compile) for each row, from the same run."""
    add_ratios(rows, eager="eager-chain", compile_="torch.compile")


def default_device() -> str:
    """CUDA when the extension was built with it (the fused provider's device), else the CPU."""
    if torch.cuda.is_available() and provider_unavailable("fused", "cuda") is None:
        return "cuda"
    return "cpu"


def main(argv=None) -> List[Dict]:
    cuda = default_device() == "cuda"
    defaults = {"device": default_device(), "modes": ["forward"], "size": 64,
                "batches": [16, 64, 1024] if cuda else [64]}
    return bench_main(__doc__.splitlines()[0], run_grid, argv, ratios=add_speedups, defaults=defaults)


if __name__ == "__main__":
    main()
