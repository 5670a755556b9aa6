"""Whole debias runs, max step plus min step: invdiff against the official pipeline, side by side.

    python benchmarks/e2e_debias.py                        # small config, CPU, debias's 1000 min steps
    python benchmarks/e2e_debias.py --config sd15 --n 64 --steps 10 --batch 8 --no-calibrate   # a GPU (gpu_check.sh, call 2)
    python benchmarks/e2e_debias.py --dry                  # seconds: every code path, tiny sizes

The min-step-only comparison (e2e_train.py) charged the frozen-prediction bank to invdiff alone,
although the official pipeline also runs a max step over per-sample losses, and invdiff's max step
already runs the forward passes that fill the bank. This compares what a user runs, end to end,
on the same data, with the same number of min steps at the same batch size, the same frozen
dtype, the same optimizer (invdiff.training.adamw) and learning rate:

  official  the official pipeline recreated: the frozen model's per-sample losses on debias's t
            grid and draws (environments.collect_losses, no bank), the official max step
            (projected Adam on W, recipe "official"), then the min step with a trainable
            full-size copy of the UNet as G (output conv zeroed), both UNets in one autograd
            graph every step, eager group means and variance, debias's 10% prompt dropout.
  invdiff   `invdiff debias` at its defaults (small: invdiff.debiasing.debias itself, which also
            writes the run folder and runs the label-free calibration; sd15: the same stages on an
            in-memory SD-shaped base, see _invdiff_stages), with the bank the max step fills.

Reported per provider, each on its own line: wall time (and its split into max step, min step and
the rest), device memory, and the bank's host and disk bytes. Device memory: on a GPU
torch.cuda.max_memory_allocated above what was allocated before the provider's models; on the
CPU the device is the host, so it is the peak resident set above the process's footprint at the
start (each provider in a fresh process), with the bank inside it, and is also given without the
bank (what a GPU would hold: there the bank is host RAM or disk).
Goal (issue 24): the whole run >= 3x faster at <= 50% of the official pipeline's device memory.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import memory_mark, memory_peak_mb, write_json  # noqa: E402

PROVIDERS = ("official", "invdiff")
SPEED_GOAL, MEMORY_GOAL = 3.0, 0.5


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _bank_bytes(bank) -> dict:
    """The bank's host RAM and disk bytes (an on-disk bank: the blocks its files occupy)."""
    if bank is None:
        return {"host": 0, "disk": 0}
    if bank.directory is None:
        return {"host": bank.noise.nbytes + bank.pred.nbytes, "disk": 0}
    disk = sum(os.stat(os.path.join(bank.directory, f)).st_blocks * 512 for f in os.listdir(bank.directory))
    return {"host": 0, "disk": disk}


def _data(config: str, n: int):
    from benchmarks.e2e_models import dataset

    return dataset(config, n).training_view()


def official_pipeline(base, data, config, steps: int, device: str) -> dict:
    """The official pipeline on `data` with `config`'s grid, batch size and learning rate.
    Returns {"max_step_s", "min_step_s"}."""
    from benchmarks.e2e_models import official_g
    from invdiff.config import recipe_config
    from invdiff.environments import collect_losses, weights_from_losses
    from invdiff.models.base import training_target
    from invdiff.training import _drop_prompts, adamw

    start = time.perf_counter()
    losses, _ = collect_losses(base, data, config.loss_timesteps, config.loss_draws, config.seed, progress=False)
    official = recipe_config("official", steps=steps, batch_size=config.batch_size, loss_timesteps=config.loss_timesteps,
                             loss_draws=config.loss_draws, seed=config.seed)
    weights, _ = weights_from_losses(losses, data.prompt_ids, official)
    _sync(device)
    max_step_s = time.perf_counter() - start

    start = time.perf_counter()
    g = official_g(base, device)
    opt = adamw([p for p in g.parameters() if p.requires_grad], config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    null_id, k = base.conditioner.null_id, weights.shape[1]
    lam = official.lam
    for _ in range(steps):
        rows = torch.randint(0, len(data), (config.batch_size,), generator=gen)
        clean = data.images[rows]
        noise = torch.randn(clean.shape, generator=gen)
        t = torch.randint(0, base.scheduler.config.num_train_timesteps, (config.batch_size,), generator=gen)
        x_t = base.scheduler.add_noise(clean, noise, t).to(device)
        target = training_target(base.scheduler, clean, noise, t).to(device)
        ids = _drop_prompts(data.prompt_ids[rows], null_id, 0.1, gen).to(device)
        w = weights[rows].to(device)
        t = t.to(device)
        embeds = base.prompt_embeds(ids)
        eps = base.eps(x_t, t, embeds)  # no no_grad: the official loop runs both UNets in one graph
        eps_tilde = eps.float() + g.ratio * g(x_t, t, embeds.float())
        per = (eps_tilde - target.float()).pow(2).flatten(1).mean(1)
        risks = torch.stack([(w[:, j] * per).sum() / w[:, j].sum().clamp_min(1e-12) for j in range(k)])
        loss = risks.mean() + lam * risks.var()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    return {"max_step_s": max_step_s, "min_step_s": time.perf_counter() - start, "bank": None}


def _invdiff_stages(base, data, config, device: str, bank_dir: str) -> dict:
    """debias()'s stages on an in-memory base (sd15: no folder to load one from): the frozen
    losses with the bank (on disk, as for every latent base), the max step, the min step, and the
    calibration when config.calibrate. Only loading the base and writing the run folder are left
    out."""
    from invdiff.calibration import calibrate
    from invdiff.environments import collect_losses, max_step
    from invdiff.training import min_step_config, new_guidance, train_guidance

    start = time.perf_counter()
    losses, _, bank = collect_losses(base, data, config.loss_timesteps, config.loss_draws, config.seed, progress=False,
                                     return_bank=True, bank_dir=bank_dir)
    found = max_step(losses, data.prompt_ids, config, base.scheduler.config.num_train_timesteps,
                     bank_timesteps=bank.timesteps, prompts=list(data.prompts))
    _sync(device)
    max_step_s = time.perf_counter() - start
    start = time.perf_counter()
    guidance = new_guidance(base, config, t_min=found.t_min, band_start=found.band_start)
    if found.proposal is not None:
        import dataclasses

        bank = dataclasses.replace(bank, proposal=found.proposal)
    train_guidance(base, guidance, data, found.weights, min_step_config(config, None, 0, 2, None), progress=False,
                   bank=bank if config.use_bank else None)
    _sync(device)
    min_step_s = time.perf_counter() - start
    if config.calibrate:
        calibrate(base, guidance, data, losses, config, found.band_start, progress=False)
    return {"max_step_s": max_step_s, "min_step_s": min_step_s, "bank": bank}


def _base(config_name: str, device: str, dtype, template):
    """The frozen base on `device`: built, or (in-process runs) a copy of `template`, built once
    on the CPU (an SD-sized UNet's random init takes seconds of the GPU check's budget)."""
    import copy

    from benchmarks.e2e_models import build

    if template is None:
        return build(config_name, device, dtype)[0]
    base = copy.deepcopy(template)
    base.unet.to(device=device, dtype=dtype)
    base.conditioner.to(device)
    return base.freeze()


def _timed_stage(fn, record: dict, device: str):
    """fn, recording into `record` its seconds and the peak memory (memory_peak_mb from the
    process's start) once it returns."""
    mark = (0.0, 0)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        _sync(device)
        record.update(seconds=time.perf_counter() - start, peak_mb_after=memory_peak_mb(device, mark))
        return out

    return timed


def worker(config_name: str, provider: str, steps: int, n: int, device: str, dry: bool = False, batch: int = None,
           calibrate: bool = True, template=None) -> dict:
    """One provider's whole run. Memory above the footprint before its models and data.
    batch: the min step's batch (None: debias's); calibrate: invdiff's label-free calibration."""
    from dataclasses import replace

    from invdiff.config import DebiasConfig

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    config = DebiasConfig(steps=steps, calibrate=calibrate)
    if batch is not None:
        config = replace(config, batch_size=batch)
    if dry:
        config = replace(config, batch_size=2 if config_name == "sd15" else 4, loss_timesteps=2, calibrate=False)
    mark = memory_mark(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    captured = {}
    with tempfile.TemporaryDirectory(prefix="invdiff-e2e-debias-") as work:
        start, cpu = time.perf_counter(), time.process_time()
        if provider == "official":
            base = _base(config_name, device, dtype, template)
            parts = official_pipeline(base, _data(config_name, n), config, steps, device)
        elif config_name == "small":
            import invdiff.debiasing as debiasing
            import invdiff.environments as environments
            from invdiff.demo import shipped_base

            collect = environments.collect_losses

            def keep_bank(*args, **kwargs):  # the bank debias builds, for its byte count
                out = collect(*args, **kwargs)
                if kwargs.get("return_bank"):
                    captured["bank"] = _bank_bytes(out[2])
                return out

            environments.collect_losses = keep_bank
            # Each stage's seconds and the peak resident set after it (which stage sets the peak).
            stages = captured.setdefault("stages", {})
            for module, name in ((debiasing, "frozen_losses"), (debiasing, "max_step"), (debiasing, "train_guidance"),
                                 (debiasing, "calibrate"), (debiasing, "write_run_folder")):
                stages[name] = {}
                setattr(module, name, _timed_stage(getattr(module, name), stages[name], device))
            result = debiasing.debias(shipped_base(0.9), _data(config_name, n), os.path.join(work, "run"), config, progress=False)
            min_s = result["meta"]["min_step_seconds"]
            parts = {"max_step_s": None, "min_step_s": min_s, "bank": None}
        else:
            base = _base(config_name, device, dtype, template)
            parts = _invdiff_stages(base, _data(config_name, n), config, device, work)
            captured["bank"] = _bank_bytes(parts["bank"])
        _sync(device)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = memory_peak_mb(device, mark)
    bank = captured.get("bank") or _bank_bytes(parts["bank"])
    return {"provider": provider, "stages": captured.get("stages", {}), "seconds": seconds, "cpu_seconds": cpu, "max_step_s": parts["max_step_s"], "min_step_s": parts["min_step_s"],
            "device_mb": peak, "bank_host_mb": bank["host"] / 2**20, "bank_disk_mb": bank["disk"] / 2**20,
            "min_steps": steps, "batch_size": config.batch_size, "n": n, "calibrate": config.calibrate,
            "frozen_dtype": "bf16" if dtype == torch.bfloat16 else "fp32"}


def _run_child(args, provider: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--config", args.config, "--steps", str(args.steps), "--n", str(args.n),
           "--device", args.device, "--worker", provider] + (["--batch", str(args.batch)] if args.batch else []) + (
           ["--no-calibrate"] if args.no_calibrate else [])
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
        return {"provider": provider, "error": lines[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None):
    from invdiff.config import DebiasConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="small", choices=["small", "sd15"])
    parser.add_argument("--steps", type=int, default=DebiasConfig().steps, help="min steps, the same for both")
    parser.add_argument("--n", type=int, default=None, help="training samples (small: the 1438-image train split)")
    parser.add_argument("--batch", type=int, default=None, help="min-step batch, the same for both (default: debias's)")
    parser.add_argument("--no-calibrate", action="store_true", help="invdiff without its label-free calibration")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dry", action="store_true", help="every code path in seconds (tiny sizes, in one process)")
    parser.add_argument("--json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dry:  # the config as given (sd15 too: its code path, at 4 samples)
        args.steps, args.n = 2, 24 if args.config == "small" else 4
    if args.n is None:
        from benchmarks.e2e_models import dataset_size

        args.n = dataset_size(args.config) if args.config == "small" else 256
    if args.worker:
        print(json.dumps(worker(args.config, args.worker, args.steps, args.n, args.device, batch=args.batch,
                                calibrate=not args.no_calibrate)))
        return None
    # One process per provider on the CPU, so that each peak resident set is its own; on a GPU
    # (and in a dry run) one after another here, the peak from torch.cuda's counters.
    in_process = args.dry or args.device == "cuda"
    threads = int(os.environ.get("OMP_NUM_THREADS", "2")) if args.device == "cpu" else None
    result = {"config": args.config, "device": args.device, "dry": args.dry, "threads": threads, "complete": False, "rows": []}
    template = None
    if in_process and args.config == "sd15":
        from benchmarks.e2e_models import build

        template = build(args.config, "cpu")[0]
    for provider in PROVIDERS:
        if in_process:
            row = worker(args.config, provider, args.steps, args.n, args.device, args.dry, args.batch, not args.no_calibrate, template)
        else:
            row = _run_child(args, provider)
        result["rows"].append(row)
        print(f"  {row}", file=sys.stderr, flush=True)
        write_json(args.json, result)  # each row as soon as it is measured (gpu_check.sh cuts at its budget)
    rows = {r["provider"]: r for r in result["rows"]}
    off, inv = rows["official"], rows["invdiff"]
    where = "CPU" if args.device == "cpu" else args.device.upper()
    print(f"whole debias runs, config {args.config}, {where}{f', {threads} threads' if threads else ''}, N = {args.n}, "
          f"{args.steps} min steps at batch {inv.get('batch_size', '?')}, frozen {inv.get('frozen_dtype', '?')}"
          f"{'; DRY RUN: numbers mean nothing' if args.dry else ''}")
    for r in (off, inv):
        if "error" in r:
            print(f"{r['provider']:9s} failed: {r['error']}")
            continue
        split = f"max step {r['max_step_s']:.1f} s, " if r["max_step_s"] is not None else ""
        rest = r["seconds"] - (r["max_step_s"] or 0) - r["min_step_s"]
        print(f"{r['provider']:9s} wall time      {r['seconds']:8.1f} s  ({split}min step {r['min_step_s']:.1f} s, "
              f"{'everything else' if r['max_step_s'] is None else 'the rest'} {rest:.1f} s)")
        print(f"{r['provider']:9s} CPU time       {r['cpu_seconds']:8.1f} s  (this process, all its threads)")
        for name, st in r.get("stages", {}).items():
            if st:
                print(f"{r['provider']:9s}   {name:17s} {st['seconds']:7.1f} s, peak memory after it {st['peak_mb_after']:6.0f} MB "
                      "(from the process's start)")
        device_line = "peak RSS above the start, bank included" if args.device == "cpu" else "max_memory_allocated"
        print(f"{r['provider']:9s} device memory  {r['device_mb']:8.0f} MB ({device_line})")
        if args.device == "cpu":
            print(f"{r['provider']:9s} less the bank  {r['device_mb'] - r['bank_host_mb']:8.0f} MB")
        print(f"{r['provider']:9s} bank, host RAM {r['bank_host_mb']:8.1f} MB")
        print(f"{r['provider']:9s} bank, disk     {r['bank_disk_mb']:8.1f} MB")
    if "error" not in off and "error" not in inv:
        speed = off["seconds"] / inv["seconds"]
        memory = inv["device_mb"] / off["device_mb"]
        result.update(x_official=speed, x_official_cpu_time=off["cpu_seconds"] / inv["cpu_seconds"], memory_vs_official=memory)
        print(f"invdiff: {speed:.2f}x the official pipeline's speed (goal >= {SPEED_GOAL:.0f}x: "
              f"{'met' if speed >= SPEED_GOAL else 'MISS'}, margin {speed - SPEED_GOAL:+.2f}); device memory "
              f"{100 * memory:.0f}% of its (goal <= {100 * MEMORY_GOAL:.0f}%: {'met' if memory <= MEMORY_GOAL else 'MISS'}); "
              f"by CPU time {result['x_official_cpu_time']:.2f}x")
        if args.device == "cpu":
            lean = (inv["device_mb"] - inv["bank_host_mb"]) / off["device_mb"]
            result["memory_less_bank_vs_official"] = lean
            print(f"         without the bank (host RAM on a GPU): {100 * lean:.0f}% of the official pipeline's")
    result["complete"] = True
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
