"""End-to-end sampling throughput: invdiff against the official approach and the ceiling.

    python benchmarks/e2e_sample.py                       # small config, CPU
    python benchmarks/e2e_sample.py --config sd15 --images 128 --batch 32   # a GPU

Every provider makes the same images (prompts, seeds, DDIM steps, CFG scale) in batches of --batch:
  official         both UNets every step (frozen + full-size G copy), both CFG branches through
                   the wrapper, eager combine + CFG, then diffusers' scheduler.step; the frozen
                   UNet in invdiff's dtype (bf16 on a GPU) and TF32 on, like invdiff: the
                   denominator of "x official";
  official-fp32    the same in fp32 as published, no TF32 (GPU only: on the CPU both are fp32,
                   the same run); an extra row, not the denominator;
  invdiff static   invdiff.sampling.sample: the continuous-batching engine with every request
                   present at t = 0, the lightweight G_psi, the fused guided step (bf16 frozen
                   UNet on a GPU);
  invdiff engine   the same requests arriving as a Poisson process at twice the static capacity;
  invdiff static, G every k
                   invdiff static with G's UNet body run at every k-th step of each image and
                   its output reused between, its head every step (--guidance-every k,
                   sampling.GuidedSchedule), for each --every k other than the default's;
  ceiling          the frozen UNet alone (no G) through the same engine, static.
Reports images/s (with --repeats, the median of the timed runs and their range), the ratios, and the fraction of the device's measured matmul peak the sampler
reaches (UNet forward FLOPs x 2 branches x steps x images / time / peak).
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import write_json  # noqa: E402
from benchmarks.e2e_models import build, invdiff_g, measured_peak_flops, official_g, unet_flops  # noqa: E402


def official_sample(base, g, ids, seeds, steps, scale, batch, device):
    from diffusers import DDIMScheduler

    out = []
    for start in range(0, len(ids), batch):
        b_ids = ids[start : start + batch].to(device)
        sched = DDIMScheduler.from_config(base.scheduler.config)
        sched.set_timesteps(steps)
        x = torch.stack([torch.randn(base.unet.config.in_channels, base.unet.config.sample_size, base.unet.config.sample_size,
                                     generator=torch.Generator().manual_seed(int(s))) for s in seeds[start : start + batch]]).to(device)
        embeds = torch.cat([base.prompt_embeds(torch.full_like(b_ids, base.conditioner.null_id)), base.prompt_embeds(b_ids)])
        with torch.no_grad():
            for t in sched.timesteps:
                model_in = torch.cat([x, x])
                tt = t.expand(model_in.shape[0]).to(device)
                eps = base.eps(model_in, tt, embeds) + g.ratio * g(model_in, tt, embeds)  # the wrapper, per branch
                e_u, e_c = eps.chunk(2)
                x = sched.step(e_u + scale * (e_c - e_u), t, x).prev_sample
        out.append(x.cpu())
    return torch.cat(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="small", choices=["small", "sd15"])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--scale", type=float, default=2.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--every", type=int, nargs="*", default=[2, 3],
                        help="extra rows: G's body at every k-th step, reused between (the default k is 'invdiff static')")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per row; the rate is their median")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    from benchmarks.bench_engine import run_poisson
    from invdiff.sampling.engine import Request
    from invdiff.config import DEFAULT_GUIDANCE_EVERY
    from invdiff.sampling import GuidedDenoiser, sample

    device = args.device
    fast_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    base32, prompts = build(args.config, device, torch.float32)
    base_fast, _ = build(args.config, device, fast_dtype)
    g_off = official_g(base32, device)  # G stays fp32 in both official rows, as invdiff's G does
    g_inv = invdiff_g(base_fast, device)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, prompts, (args.images,), generator=gen)
    seeds = list(range(args.images))
    requests = [Request(int(p), s, args.steps, args.scale, request_id=i) for i, (p, s) in enumerate(zip(ids.tolist(), seeds))]

    results, spread = {}, {}

    def timed(name, fn):
        fn(warm=True)
        if device == "cuda":
            torch.cuda.synchronize()
        rates = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn(warm=False)
            if device == "cuda":
                torch.cuda.synchronize()
            rates.append(args.images / (time.perf_counter() - start))
        results[name] = statistics.median(rates)
        spread[name] = rates
        # Each provider's rate as soon as it is measured: gpu_check.sh cuts this step at its
        # budget, and what was measured by then is kept (the ratios come with the last write).
        write_json(args.json, {"config": args.config, "device": device, "args": vars(args), "complete": False,
                               "rows": [{"provider": p, "images_per_s": r} for p, r in results.items()]})
        return results[name]

    def run_official(base, tf32):
        def fn(warm):
            if device == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = tf32
            n = args.batch if warm else args.images
            official_sample(base, g_off, ids[:n], seeds[:n], args.steps, args.scale, args.batch, device)
        return fn

    def run_static(denoiser, every=DEFAULT_GUIDANCE_EVERY):
        def fn(warm):
            n = args.batch if warm else args.images
            sample(denoiser, ids[:n], seeds[:n], args.steps, args.scale, "ddim", batch_size=args.batch, progress=False, device=device,
                   guidance_every=every)
        return fn

    timed("official", run_official(base_fast, tf32=True))
    if fast_dtype != torch.float32:
        timed("official-fp32", run_official(base32, tf32=False))
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # invdiff's setting, and the like-for-like official's
    timed("invdiff static", run_static(GuidedDenoiser(base_fast, g_inv)))
    timed("ceiling", run_static(GuidedDenoiser(base_fast, None)))
    for k in args.every:
        if k != DEFAULT_GUIDANCE_EVERY:
            timed(f"invdiff static, G every {k}", run_static(GuidedDenoiser(base_fast, g_inv), k))
    # Arrivals at twice the static capacity (requests per second = images per second).
    seconds, _, _ = run_poisson(GuidedDenoiser(base_fast, g_inv), requests, args.batch, 2.0 * results["invdiff static"], seed=0)
    results["invdiff engine"] = args.images / seconds
    width = base32.prompt_embeds(torch.tensor([0], device=device)).shape[-1]
    length = base32.prompt_embeds(torch.tensor([0], device=device)).shape[1]
    flops = unet_flops(base32.unet, width, length, device)
    peak = measured_peak_flops(device, fast_dtype)
    print(f"sampling, config {args.config} (UNet forward {flops / 1e9:.2f} GFLOP per image), device {device}, "
          f"{args.images} images, batch {args.batch}, {args.steps} DDIM steps, CFG {args.scale}; "
          f"measured {'bf16' if fast_dtype == torch.bfloat16 else 'fp32'} matmul peak {peak / 1e12:.2f} TFLOP/s")
    rows = []
    for name, rate in results.items():
        used = rate * args.steps * 2 * flops  # frozen UNet FLOPs on both CFG branches (the useful work)
        rows.append({"provider": name, "images_per_s": rate, "repeats_images_per_s": spread.get(name, [rate]),
                     "x_official": rate / results["official"],
                     "vs_ceiling": rate / results["ceiling"], "frac_peak": used / peak})
        print(f"{name:26s} {rate:8.2f} img/s  {rate / results['official']:5.2f} x official  "
              f"{100 * rate / results['ceiling']:5.1f}% of ceiling  {100 * used / peak:5.1f}% of matmul peak"
              + (f"  (runs {min(spread[name]):.2f} to {max(spread[name]):.2f})" if len(spread.get(name, [])) > 1 else ""))
    write_json(args.json, {"config": args.config, "device": device, "args": vars(args), "complete": True,
                           "default_guidance_every": DEFAULT_GUIDANCE_EVERY,
                           "unet_gflops_per_image": flops / 1e9, "peak_flops": peak,
                           "x_official_is": "like-for-like (same frozen dtype, TF32 on a GPU)", "rows": rows})
    return rows


if __name__ == "__main__":
    main()
