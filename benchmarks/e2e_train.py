"""End-to-end min-step training: invdiff against the official approach, side by side in one run.

    python benchmarks/e2e_train.py                               # small config, CPU, batches 32 128
    python benchmarks/e2e_train.py --config sd15 --batches 8 32 --steps 5   # a GPU
    python benchmarks/e2e_train.py --dry                          # seconds: every code path, tiny sizes

Providers (same UNet, same batch size, same random batches, the same 10% prompt dropout as
`invdiff debias` (MinStepConfig.cfg_dropout); on the CPU each in a fresh process so that its peak
resident set is its own, on a GPU one after another in this process, see main):
  official       the official approach, like for like with invdiff: a trainable full-size copy of
                 the UNet as G (output conv zeroed), both UNets run every step in one autograd
                 graph, eager per-group means and variance, G in fp32; the frozen UNet in
                 invdiff's dtype (bf16 on a GPU, fp32 on the CPU), TF32 on (GPU), and invdiff's
                 fused AdamW (invdiff.training.adamw). The denominator of "x official".
  official-fp32  the official approach as published: everything fp32, PyTorch's default AdamW and
                 matmul precision (no TF32). An extra row, not the denominator.
  invdiff        the default lightweight G_psi (DebiasConfig's preset), the frozen UNet under
                 no_grad, the fused invariant loss (invdiff.ops), as invdiff.training does.
  invdiff+bank   as invdiff, with the frozen prediction read from the max step's bank
                 (environments.FrozenBank), as `invdiff debias` does by default: the step gathers
                 the batch's rows from the bank on the host, and the prompt-dropped rows (whose
                 unconditional prediction the bank does not hold) still run the frozen UNet.
  bank build     what the bank costs: environments.collect_losses(return_bank=True) with debias's
                 t grid and draws (DebiasConfig.loss_timesteps x loss_draws per sample), timed on
                 a subset and scaled linearly to --bank-n samples (small: the colored-digits train
                 split the shipped base was trained on). Reported as its own line and amortised
                 over DebiasConfig.steps min steps in the "invdiff+bank, build amortised" row.
                 (The max step runs the same forward passes for its losses whether or not it keeps
                 the bank, so charging all of them to the bank is an upper bound.)
Reports steps/s, peak memory above the process's footprint before the models were built (CPU:
resident set; GPU: torch.cuda.max_memory_allocated) and the ratios to the official approach.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import memory_mark, memory_peak_mb, write_json  # noqa: E402

PROVIDERS = ("official", "official-fp32", "invdiff", "invdiff+bank")
BASELINE = "official"  # like for like: the denominator of "x official"
LAM, GROUPS = 1.0, 2
BANK_SAMPLES = 256  # rows of the in-RAM bank the bank row gathers from (its size does not change a gather's cost)


def _debias_defaults():
    from invdiff.config import DebiasConfig
    from invdiff.training import MinStepConfig

    return DebiasConfig(), MinStepConfig()


def _precision(provider: str, device: str) -> torch.dtype:
    """The frozen UNet's dtype, and the matmul precision, of `provider` on `device`."""
    like_for_like = provider != "official-fp32"
    if device == "cuda":
        # invdiff's GPU setting (and the like-for-like official's): TF32 for fp32 matmuls and
        # convolutions (G's). The published official run keeps PyTorch's defaults.
        torch.backends.cuda.matmul.allow_tf32 = like_for_like
        torch.backends.cudnn.allow_tf32 = True  # PyTorch's default for convolutions either way
    return torch.bfloat16 if (device == "cuda" and like_for_like) else torch.float32


def worker(config: str, provider: str, batch: int, steps: int, device: str, template=None) -> dict:
    """One provider's min step at `batch`: steps/s over `steps` timed steps after 2 warm-ups.
    template: a built fp32 CPU base to copy instead of building one (in-process runs)."""
    from benchmarks.e2e_models import build, invdiff_g, latent_shape, official_g
    from invdiff import ops
    from invdiff.training import _drop_prompts, adamw

    debias, min_step = _debias_defaults()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    gen = torch.Generator().manual_seed(0)
    draws = debias.loss_timesteps * debias.loss_draws
    bank = None
    if provider == "invdiff+bank":
        # A stand-in for the bank's predictions, as FrozenBank keeps them: fp32 in RAM (an
        # embedded base) or the on-disk BANK_DTYPE (fp16) of a latent base at Stable Diffusion
        # size; on the host. Made before `before`: the whole bank's memory at N is reported on
        # its own line (bank_build) and added in the amortised row, not this partial one.
        from invdiff.environments import BANK_DTYPE

        bank_dtype = torch.float32 if config == "small" else BANK_DTYPE
        bank = torch.randn((BANK_SAMPLES, draws, *latent_shape(config)), generator=gen).to(bank_dtype)
    mark = memory_mark(device)
    frozen_dtype = _precision(provider, device)
    if template is None:
        base, prompts = build(config, device, frozen_dtype)
    else:
        base, prompts = copy.deepcopy(template[0]), template[1]
        base.unet.to(device=device, dtype=frozen_dtype)
        base.conditioner.to(device)
        base = base.freeze()
    official = provider.startswith("official")
    g = official_g(base, device) if official else invdiff_g(base, device, preset=debias.preset)
    trainable = [p for p in g.parameters() if p.requires_grad]
    if provider == "official-fp32":
        opt = torch.optim.AdamW(trainable, lr=1e-4)  # PyTorch's default implementation, as published
    else:
        opt = adamw(trainable, 1e-4)  # what invdiff.training uses (fused where it exists)
    cfg = base.unet.config
    null_id = base.conditioner.null_id
    shape = (batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)

    def data():
        x_t = torch.randn(shape, generator=gen).to(device)
        target = torch.randn(shape, generator=gen).to(device)
        t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
        ids = torch.randint(0, prompts, (batch,), generator=gen)
        # The prompt dropout debias applies (training._drop_prompts): ~10% of rows unconditional.
        ids = _drop_prompts(ids, null_id, min_step.cfg_dropout, gen).to(device)
        w = torch.rand(batch, GROUPS, generator=gen).to(device)
        rows = torch.randint(0, BANK_SAMPLES, (batch,), generator=gen)  # which samples and draws the bank serves
        pick = torch.randint(0, draws, (batch,), generator=gen)
        return x_t, target, t, ids, w, (rows, pick)

    def official_step(x_t, target, t, ids, w, where):
        embeds = base.prompt_embeds(ids)
        eps = base.eps(x_t, t, embeds)  # no no_grad: the official loop runs both UNets in one graph
        eps_tilde = eps + g.ratio * g(x_t, t, embeds.to(torch.float32))
        per = (eps_tilde - target).pow(2).flatten(1).mean(1)
        risks = torch.stack([(w[:, k] * per).sum() / w[:, k].sum() for k in range(GROUPS)])
        loss = risks.mean() + LAM * risks.var()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def invdiff_step(x_t, target, t, ids, w, where):
        with torch.no_grad():
            embeds = base.prompt_embeds(ids)
            if bank is None:
                eps = base.eps(x_t, t, embeds)
            else:
                # As training.train_guidance: gather on the host, upcast, move; then the frozen UNet
                # on the prompt-dropped rows only (the bank holds conditional predictions).
                rows, pick = where
                eps = bank[rows, pick].float().to(device)
                dropped = ids == null_id
                if dropped.any():
                    eps[dropped] = base.eps(x_t[dropped], t[dropped], embeds[dropped]).to(eps.dtype)
        gout = g(x_t, t, embeds.float(), eps)
        loss = ops.invariant_loss(eps, target, w, LAM, g=gout, ratio=g.ratio)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step = official_step if official else invdiff_step
    batches = [data() for _ in range(steps + 2)]
    dropped_rows = sum(int((b[3] == null_id).sum()) for b in batches[2:])
    for b in batches[:2]:  # warm-up
        step(*b)
    if device == "cuda":
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    for b in batches[2:]:
        step(*b)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = memory_peak_mb(device, mark)
    trainable = sum(p.numel() for p in g.parameters() if p.requires_grad)
    return {"provider": provider, "batch": batch, "steps_per_s": steps / seconds, "cpu_steps_per_s": steps / cpu, "peak_mb": peak,
            "trainable_params": trainable, "frozen_dtype": {torch.float32: "fp32", torch.bfloat16: "bf16"}[frozen_dtype],
            "dropped_row_share": dropped_rows / (batch * steps)}


def bank_build(config: str, device: str, bank_n: int, measure_samples: int, template=None) -> dict:
    """Seconds to build the bank for `bank_n` samples: collect_losses(return_bank=True) with
    debias's t grid and draws, timed on `measure_samples` samples and scaled linearly (it is a
    loop over full batches of (sample, t, draw) jobs, so its time is linear in the sample count)."""
    from benchmarks.e2e_models import build, dataset
    from invdiff.environments import collect_losses

    debias, _ = _debias_defaults()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    dtype = _precision("invdiff", device)
    if template is None:
        base, _ = build(config, device, dtype)
    else:  # in-process runs: a copy of the base built once (see main)
        base = copy.deepcopy(template[0])
        base.unet.to(device=device, dtype=dtype)
        base.conditioner.to(device)
        base = base.freeze()
    data = dataset(config, measure_samples)
    kwargs = dict(num_timesteps=debias.loss_timesteps, draws=debias.loss_draws, progress=False, return_bank=True)
    collect_losses(base, data.subset(torch.arange(min(2, len(data)))), **kwargs)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    _, _, bank = collect_losses(base, data, **kwargs)
    if device == "cuda":
        torch.cuda.synchronize()
    measured, cpu = time.perf_counter() - start, time.process_time() - cpu
    # What the bank holds for N samples (noise and predictions, fp32 in RAM as collect_losses
    # keeps them without bank_dir): part of the min step's memory on the host.
    per_sample = (bank.noise[0].numel() + bank.pred[0].numel()) * bank.pred.element_size()
    return {"bank_n": bank_n, "bank_mb": per_sample * bank_n / 2**20, "measured_samples": len(data), "measured_s": measured,
            "draws_per_sample": debias.loss_timesteps * debias.loss_draws,
            "seconds": measured * bank_n / len(data), "cpu_seconds": cpu * bank_n / len(data),
            "amortised_over_steps": debias.steps}


def _run_child(args, extra) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--config", args.config, "--steps", str(args.steps),
           "--device", args.device] + extra
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
        return {"error": lines[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def amortised(steps_per_s: float, build_s: float, steps: int) -> float:
    """Steps/s with the bank's build spread over `steps` min steps."""
    return 1.0 / (1.0 / steps_per_s + build_s / steps)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="small", choices=["small", "sd15"])
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bank-n", type=int, default=None,
                        help="samples the bank is built for (default: small, the 1438-image train split; sd15, 1000)")
    parser.add_argument("--bank-measure", type=int, default=None,
                        help="samples the build is timed on (default 64: 1280 frozen forwards)")
    parser.add_argument("--dry", action="store_true",
                        help="every code path in seconds (small config, batch 4, 1 step, in one process); timings mean nothing")
    parser.add_argument("--json")
    parser.add_argument("--worker", nargs=2, metavar=("PROVIDER", "BATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--bank-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dry:
        args.config, args.batches, args.steps = "small", [4], 1
        args.bank_n, args.bank_measure = args.bank_n or 4, args.bank_measure or 2
    from benchmarks.e2e_models import build, dataset_size, unet_flops

    if args.worker:
        print(json.dumps(worker(args.config, args.worker[0], int(args.worker[1]), args.steps, args.device)))
        return None
    bank_n = args.bank_n or dataset_size(args.config)
    measure = min(bank_n, args.bank_measure or 64)
    if args.bank_worker:
        print(json.dumps(bank_build(args.config, args.device, bank_n, measure)))
        return None

    template = build(args.config, "cpu")
    base = template[0]
    width = base.prompt_embeds(torch.tensor([0])).shape[-1]
    length = base.prompt_embeds(torch.tensor([0])).shape[1]
    flops = unet_flops(base.unet, width, length, "cpu")
    # One process per provider and batch on the CPU, so that each peak resident set is its own.
    # On a GPU, and in a dry run, all run here one after another: the peak is then
    # torch.cuda.max_memory_allocated above what was allocated before the provider's models, and
    # the SD-sized UNet is built once and copied (8 child processes each building one took more
    # than the GPU check's budget for this script).
    in_process = args.dry or args.device == "cuda"
    threads = int(os.environ.get("OMP_NUM_THREADS", "2")) if args.device == "cpu" else None
    result = {"config": args.config, "device": args.device, "dry": args.dry, "steps": args.steps, "threads": threads,
              "unet_gflops_per_image": flops / 1e9, "baseline": BASELINE, "complete": False}
    rows = []
    for batch in args.batches:
        for provider in PROVIDERS:
            if in_process:
                row = worker(args.config, provider, batch, args.steps, args.device, template=template)
            else:
                row = {"provider": provider, "batch": batch, **_run_child(args, ["--worker", provider, str(batch)])}
            rows.append(row)
            print(f"  {row}", file=sys.stderr, flush=True)
            # Each provider's row as soon as it is measured: gpu_check.sh cuts this step at its
            # budget, and the rows measured by then are kept ("complete": false; the ratios and
            # the bank's rows come with the last write).
            write_json(args.json, {**result, "rows": rows})
    bank = bank_build(args.config, args.device, bank_n, measure, template) if in_process else _run_child(
        args, ["--bank-worker", "--bank-n", str(bank_n), "--bank-measure", str(measure)])
    print(f"  bank build: {bank}", file=sys.stderr, flush=True)
    if "error" not in bank:
        for r in [r for r in rows if r["provider"] == "invdiff+bank" and "error" not in r]:
            rows.append({**r, "provider": "invdiff+bank, build amortised",
                         "steps_per_s": amortised(r["steps_per_s"], bank["seconds"], bank["amortised_over_steps"]),
                         "cpu_steps_per_s": amortised(r["cpu_steps_per_s"], bank["cpu_seconds"], bank["amortised_over_steps"]),
                         # On the CPU the bank shares the step's memory (RAM); on a GPU it stays on the host.
                         "peak_mb": r["peak_mb"] + (bank["bank_mb"] if args.device == "cpu" else 0.0)})
    order = {p: i for i, p in enumerate(PROVIDERS + ("invdiff+bank, build amortised",))}
    rows.sort(key=lambda r: (r["batch"], order[r["provider"]]))
    baseline = {r["batch"]: r for r in rows if r["provider"] == BASELINE and "error" not in r}
    for r in rows:
        o = baseline.get(r["batch"])
        if "error" not in r and o:
            r["x_official"] = r["steps_per_s"] / o["steps_per_s"]
            r["x_official_cpu_time"] = r["cpu_steps_per_s"] / o["cpu_steps_per_s"]
            r["pct_official_memory"] = 100 * r["peak_mb"] / o["peak_mb"] if o["peak_mb"] > 0 else float("nan")

    where = "CPU" if args.device == "cpu" else args.device.upper()
    tf32 = "TF32 on (official-fp32: PyTorch defaults)" if args.device == "cuda" else "no TF32 on the CPU"
    threads = f", {os.environ.get('OMP_NUM_THREADS', '2')} threads" if args.device == "cpu" else ""
    print(f"min step, config {args.config} (UNet forward {flops / 1e9:.2f} GFLOP per image), {where} timings{threads}, "
          f"{args.steps} timed steps after 2 warm-ups, {tf32}{'; DRY RUN: timings mean nothing' if args.dry else ''}")
    cpu_note = " (the CPU-time columns: this process's CPU seconds, which other jobs on a shared machine disturb less)" if args.device == "cpu" else ""
    print(f"x official: against '{BASELINE}' (same frozen dtype and optimizer as invdiff), not the fp32 run as published{cpu_note}")
    print(f"{'provider':31s} {'batch':>5s} {'frozen':>6s} {'steps/s':>8s} {'x official':>10s} {'CPU steps/s':>11s} {'x (CPU)':>8s} "
          f"{'peak MB':>8s} {'% of official':>13s} {'trainable':>10s}")
    nan = float("nan")
    for r in rows:
        if "error" in r:
            print(f"{r['provider']:31s} {r['batch']:5d} failed: {r['error']}")
            continue
        print(f"{r['provider']:31s} {r['batch']:5d} {r['frozen_dtype']:>6s} {r['steps_per_s']:8.2f} "
              f"{r.get('x_official', nan):10.2f} {r['cpu_steps_per_s']:11.2f} {r.get('x_official_cpu_time', nan):8.2f} "
              f"{r['peak_mb']:8.0f} {r.get('pct_official_memory', nan):12.0f}% {r['trainable_params']:10d}")
    if "error" in bank:
        print(f"bank build: failed: {bank['error']}")
    else:
        print(f"bank build: {bank['seconds']:.1f} s for N = {bank['bank_n']} samples x {bank['draws_per_sample']} draws "
              f"(collect_losses, timed on {bank['measured_samples']} samples: {bank['measured_s']:.2f} s, scaled); "
              f"amortised over debias's {bank['amortised_over_steps']} min steps: {bank['seconds'] / bank['amortised_over_steps'] * 1e3:.1f} ms a step; "
              f"it holds {bank['bank_mb']:.0f} MB (noise + predictions, fp32, host RAM"
              f"{', added to the amortised row' if args.device == 'cpu' else ''})")
    write_json(args.json, {**result, "complete": True, "rows": rows, "bank_build": bank})
    return rows


if __name__ == "__main__":
    main()
