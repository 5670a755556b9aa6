"""End-to-end min-step training: invdiff against the official approach, side by side in one run.

    python benchmarks/e2e_train.py                               # small config, CPU, batches 32 128
    python benchmarks/e2e_train.py --config sd15 --batches 8 16 32 64   # a GPU

Providers (same UNet, same batch size, same random batches; each in a fresh process so that its
peak memory is its own):
  official      a trainable full-size copy of the UNet as G (output conv zeroed), both UNets run
                every step with autograd on, eager per-group means and variance (fp32);
  invdiff       the default lightweight G_psi (preset small), the frozen UNet under no_grad (bf16
                on a GPU), the fused invariant loss (invdiff.ops), as invdiff.training does;
  invdiff+bank  as invdiff, with the frozen prediction read from the max step's bank
                (environments.FrozenBank), as `invdiff debias` does by default.
Reports steps/s, peak memory above the process's footprint before the models were built (CPU:
resident set; GPU: torch.cuda.max_memory_allocated) and the ratios to the official approach.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROVIDERS = ("official", "invdiff", "invdiff+bank")
LAM, GROUPS = 1.0, 2


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(config: str, provider: str, batch: int, steps: int, device: str) -> dict:
    from benchmarks.e2e_models import build, invdiff_g, official_g
    from invdiff import ops

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    before = _rss_mb()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    frozen_dtype = torch.bfloat16 if (device == "cuda" and provider != "official") else torch.float32
    base, prompts = build(config, device, frozen_dtype)
    g = official_g(base, device) if provider == "official" else invdiff_g(base, device)
    trainable = [p for p in g.parameters() if p.requires_grad]
    if provider == "official":
        opt = torch.optim.AdamW(trainable, lr=1e-4)  # PyTorch's default implementation
    else:
        from invdiff.training import adamw

        opt = adamw(trainable, 1e-4)  # what invdiff.training uses
    cfg = base.unet.config
    gen = torch.Generator().manual_seed(0)
    shape = (batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)

    def data():
        x_t = torch.randn(shape, generator=gen).to(device)
        target = torch.randn(shape, generator=gen).to(device)
        t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
        ids = torch.randint(0, prompts, (batch,), generator=gen).to(device)
        w = torch.rand(batch, GROUPS, generator=gen).to(device)
        cached = torch.randn(shape, generator=gen).to(device)  # the bank's stored frozen prediction
        return x_t, target, t, ids, w, cached

    def official_step(x_t, target, t, ids, w, cached):
        embeds = base.prompt_embeds(ids)
        eps = base.eps(x_t, t, embeds)  # no no_grad: the official loop runs both UNets in one graph
        eps_tilde = eps + g.ratio * g(x_t, t, embeds)
        per = (eps_tilde - target).pow(2).flatten(1).mean(1)
        risks = torch.stack([(w[:, k] * per).sum() / w[:, k].sum() for k in range(GROUPS)])
        loss = risks.mean() + LAM * risks.var()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def invdiff_step(x_t, target, t, ids, w, cached):
        with torch.no_grad():
            embeds = base.prompt_embeds(ids)
            eps = cached if provider == "invdiff+bank" else base.eps(x_t, t, embeds).float()
        gout = g(x_t, t, embeds.float(), eps)
        loss = ops.invariant_loss(eps, target, w, LAM, g=gout, ratio=g.ratio)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step = official_step if provider == "official" else invdiff_step
    batches = [data() for _ in range(steps + 2)]
    for b in batches[:2]:  # warm-up
        step(*b)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for b in batches[2:]:
        step(*b)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _rss_mb() - before
    trainable = sum(p.numel() for p in g.parameters() if p.requires_grad)
    return {"provider": provider, "batch": batch, "steps_per_s": steps / seconds, "peak_mb": peak,
            "trainable_params": trainable}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="small", choices=["small", "sd15"])
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json")
    parser.add_argument("--worker", nargs=2, metavar=("PROVIDER", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.config, args.worker[0], int(args.worker[1]), args.steps, args.device)))
        return None
    from benchmarks.e2e_models import build, unet_flops

    base, _ = build(args.config, "cpu")
    width = base.prompt_embeds(torch.tensor([0])).shape[-1]
    length = base.prompt_embeds(torch.tensor([0])).shape[1]
    flops = unet_flops(base.unet, width, length, "cpu")
    rows = []
    for batch in args.batches:
        for provider in PROVIDERS:
            cmd = [sys.executable, os.path.abspath(__file__), "--config", args.config, "--steps", str(args.steps),
                   "--device", args.device, "--worker", provider, str(batch)]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                rows.append({"provider": provider, "batch": batch, "error": result.stderr.strip().splitlines()[-1]})
            else:
                rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    official = {r["batch"]: r for r in rows if r["provider"] == "official" and "error" not in r}
    print(f"min step, config {args.config} (UNet forward {flops / 1e9:.2f} GFLOP per image), device {args.device}, "
          f"{args.steps} timed steps after 2 warm-ups")
    print(f"{'provider':14s} {'batch':>5s} {'steps/s':>8s} {'x official':>10s} {'peak MB':>8s} {'% of official':>13s} {'trainable':>10s}")
    for r in rows:
        if "error" in r:
            print(f"{r['provider']:14s} {r['batch']:5d} failed: {r['error']}")
            continue
        o = official.get(r["batch"])
        speed = r["steps_per_s"] / o["steps_per_s"] if o else float("nan")
        mem = 100 * r["peak_mb"] / o["peak_mb"] if o and o["peak_mb"] > 0 else float("nan")
        print(f"{r['provider']:14s} {r['batch']:5d} {r['steps_per_s']:8.2f} {speed:10.2f} {r['peak_mb']:8.0f} {mem:12.0f}% {r['trainable_params']:10d}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "device": args.device, "unet_gflops_per_image": flops / 1e9, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
