"""Continuous batching under Poisson arrivals vs static full batches (the shipped p=0.9 base, G_psi on).

    python benchmarks/bench_engine.py [--requests 256 --max-batch 16 --repeats 5 --json out.json]

Workload: N requests with mixed step counts (--steps, default 8 12 16) and guidance scales
(1.5 to 3), as a production queue sees them.
  static   every request is present at t = 0, sorted by step count and run as full,
           homogeneous batches of --max-batch: the best case for batching, no waiting.
  engine   the same requests arrive one by one as a Poisson process at twice the measured static
           capacity (so the queue never runs dry for long) in random order; each joins as soon
           as a slot is free and leaves when its own last step is done.
  unfused  the static batches through the pre-engine loop (sampling.sample_unfused), for
           reference: what the fused step buys on top of batching.
Throughput = image-steps (useful UNet work) per second, from the first arrival to the last image.
G_psi is on (--guidance off: the frozen base alone). No debiased run ships with the package, so G
is `GuidanceModule.from_frozen` with debias's default preset and ratio (DebiasConfig): untrained,
its output layer is zero, but it costs the FLOPs of a trained one.
The goal (issue 14): engine >= 0.95 x static with G on. Graded (issue 24) on the median over the
repeats of each repeat's engine/static ratio (static and engine run back to back in a repeat, so
the load they see is alike), with the spread (min to max) beside it; at least 5 repeats. The ratio
is printed with 3 decimals and compared as measured: 0.899 is a miss against 0.90.

On a shared machine the wall-clock ratio swings with other processes' load (0.68 to 1.46 between
repeats of one run on the 2-core CPU machine, where 3 other jobs ran). So each repeat also
records the process's CPU time (one thread: the work done, not the time spent descheduled): the
CPU-time throughput of the engine is image-steps / (CPU seconds + seconds idle waiting for an
arrival). Both ratios are printed, with the per-repeat spread; the verdict is given for each.
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
from invdiff.config import DebiasConfig  # noqa: E402
from invdiff.demo import shipped_base  # noqa: E402
from invdiff.models.guidance import GuidanceModule  # noqa: E402
from invdiff.model_folders.load import load_model  # noqa: E402
from invdiff.sampling import GuidedDenoiser, sample_unfused  # noqa: E402
from invdiff.sampling.engine import Request, SamplingEngine  # noqa: E402

TARGET = 0.95  # engine / static with G on (issue 14)


def workload(n: int, steps, seed: int = 0):
    rng = random.Random(seed)
    return [Request(prompt_id=rng.randrange(10), seed=rng.randrange(2**31), steps=rng.choice(steps),
                    guidance_scale=round(rng.uniform(1.5, 3.0), 2), request_id=i) for i in range(n)]


def run_static(denoiser, requests, max_batch):
    """(wall seconds, engine, CPU seconds of this process)."""
    engine = SamplingEngine(denoiser, "ddim", max_batch=max_batch)
    start, cpu = time.perf_counter(), time.process_time()
    engine.run(sorted(requests, key=lambda r: r.steps))
    return time.perf_counter() - start, engine, time.process_time() - cpu


def run_unfused(denoiser, requests, max_batch):
    """Static batches through sample_unfused (one scale per batch: the batch's first)."""
    start = time.perf_counter()
    ordered = sorted(requests, key=lambda r: r.steps)
    for i in range(0, len(ordered), max_batch):
        batch = ordered[i : i + max_batch]
        for steps in sorted({r.steps for r in batch}):
            group = [r for r in batch if r.steps == steps]
            ids = torch.tensor([r.prompt_id for r in group])
            sample_unfused(denoiser, ids, [r.seed for r in group], steps, group[0].guidance_scale, "ddim",
                           batch_size=max_batch, progress=False)
    return time.perf_counter() - start


def run_poisson(denoiser, requests, max_batch, rate, seed=0, cpu_out=None):
    """Requests arrive at exponential gaps of mean 1/rate seconds (wall clock). Returns (wall
    seconds, engine, seconds spent waiting for an arrival with nothing to do); with `cpu_out` (a
    list) also appends the process's CPU seconds."""
    rng = random.Random(seed)
    order = requests[:]
    rng.shuffle(order)
    arrivals, clock = [], 0.0
    for r in order:
        clock += rng.expovariate(rate)
        arrivals.append((clock, r))
    engine = SamplingEngine(denoiser, "ddim", max_batch=max_batch)
    start, cpu = time.perf_counter(), time.process_time()
    done, nxt, idle = 0, 0, 0.0
    while done < len(requests):
        now = time.perf_counter() - start
        while nxt < len(arrivals) and arrivals[nxt][0] <= now:
            engine.submit(arrivals[nxt][1])
            nxt += 1
        if engine.pending == 0 and engine.active == 0:  # nothing to do until the next arrival
            wait = arrivals[nxt][0] - now
            idle += wait
            time.sleep(max(0.0, wait))
            continue
        done += len(engine.step())
    if cpu_out is not None:
        cpu_out.append(time.process_time() - cpu)
    return time.perf_counter() - start, engine, idle


class _StubModel(GuidedDenoiser):
    """The engine's own work only: the model (and G) return zeros at once."""

    def branches(self, sample, timestep, prompt_embeds):
        zeros = torch.zeros_like(sample)
        return zeros, zeros


def host_overhead(base, engine_class=SamplingEngine, slots=(16, 64), steps: int = 40, repeats: int = 5):
    """{slots: best CPU ms per `step()`} with the model stubbed out (CFG on, G's columns on): the
    engine's host work and the fused step. engine_class: e.g. an older SamplingEngine to compare."""
    stub = _StubModel(base, None)
    out = {}
    for n in slots:
        requests = [Request(i % 10, i, steps + 10, 2.0, request_id=i) for i in range(n)]
        times = []
        for _ in range(repeats):
            engine = engine_class(stub, "ddim", max_batch=n, postprocess=lambda x: x)
            for r in requests:
                engine.submit(r)
            engine.step()  # admission
            start = time.process_time()
            for _ in range(steps):
                engine.step()
            times.append((time.process_time() - start) / steps * 1e3)
        out[n] = min(times)
    return out


def verdict(ratio: float, target: float = TARGET) -> str:
    """'met' or 'miss', with the margin, comparing the measured ratio itself (no rounding first)."""
    margin = ratio - target
    return f"{'met' if margin >= 0 else 'MISS'} (target {target:.2f}, margin {margin:+.3f})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 12, 16])
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-unfused", action="store_true", help="leave out the unfused reference row (a third of the time)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--guidance", choices=["on", "off"], default="on")
    parser.add_argument("--overhead", action="store_true",
                        help="only the engine's host work per step, with the model stubbed out (CPU ms, 16 and 64 slots)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base, _ = load_model(shipped_base(0.9))
    base = base.freeze()
    if args.overhead:
        result = host_overhead(base)
        for n, ms in result.items():
            print(f"{n:3d} slots: {ms:.3f} ms CPU per engine step, model stubbed (best of 5 x 40 steps, {args.threads} threads)")
        write_json(args.json, {"args": vars(args), "ms_per_step": result})
        return result
    guidance = None
    if args.guidance == "on":
        defaults = DebiasConfig()
        torch.manual_seed(0)
        guidance = GuidanceModule.from_frozen(base.unet.config, preset=defaults.preset, ratio=defaults.ratio).eval().requires_grad_(False)
    denoiser = GuidedDenoiser(base, guidance)
    requests = workload(args.requests, args.steps)
    image_steps = sum(r.steps for r in requests)
    run_static(denoiser, requests[: args.max_batch], args.max_batch)  # warm-up
    results = {"static": [], "engine": [], "unfused": [], "engine_idle_s": [], "engine_mean_occupancy": [], "ratio": [],
               "static_cpu": [], "engine_cpu": [], "ratio_cpu": []}
    for rep in range(args.repeats):
        seconds, static_engine, cpu = run_static(denoiser, requests, args.max_batch)
        results["static"].append(image_steps / seconds)
        results["static_cpu"].append(image_steps / cpu)
        # Arrivals at twice the static capacity (CPU-time capacity: it does not swing with the load).
        rate = 2.0 * (len(requests) / cpu)
        cpu_out = []
        seconds, engine, idle = run_poisson(denoiser, requests, args.max_batch, rate, seed=rep, cpu_out=cpu_out)
        results["engine"].append(image_steps / seconds)
        results["engine_cpu"].append(image_steps / (cpu_out[0] + idle))
        results["ratio"].append(results["engine"][-1] / results["static"][-1])
        results["ratio_cpu"].append(results["engine_cpu"][-1] / results["static_cpu"][-1])
        results["engine_idle_s"].append(idle)
        results["engine_mean_occupancy"].append(engine.slot_steps / engine.model_evaluations / args.max_batch)
        if not args.no_unfused:
            results["unfused"].append(image_steps / run_unfused(denoiser, requests, args.max_batch))
        print(f"repeat {rep}: wall: static {results['static'][-1]:.1f}, engine {results['engine'][-1]:.1f} "
              f"({results['ratio'][-1]:.3f} x static), unfused {results['unfused'][-1] if results['unfused'] else float('nan'):.1f} "
              f"image-steps/s; CPU time: static "
              f"{results['static_cpu'][-1]:.1f}, engine {results['engine_cpu'][-1]:.1f} ({results['ratio_cpu'][-1]:.3f} x static)",
              file=sys.stderr, flush=True)
    mean = {k: sum(v) / len(v) for k, v in results.items() if v}
    ratio = statistics.median(results["ratio"])
    ratio_cpu = statistics.median(results["ratio_cpu"])
    g_params = sum(p.numel() for p in guidance.parameters()) if guidance is not None else 0
    print(f"workload: {len(requests)} requests, steps {args.steps}, max_batch {args.max_batch}, "
          f"{image_steps} image-steps, {args.threads} threads, {args.repeats} repeats (rates: mean; ratios: median), device cpu")
    print(f"G_psi: {'on, preset ' + guidance.config['preset'] + f' ({g_params / 1e6:.2f}M params)' if guidance is not None else 'off'}")
    print(f"static full batches     {mean['static']:8.1f} image-steps/s")
    print(f"engine, Poisson arrival {mean['engine']:8.1f} image-steps/s  = {ratio:.3f} x static, median of repeats "
          f"(mean slot occupancy {mean['engine_mean_occupancy']:.3f}, waiting for arrivals {mean['engine_idle_s']:.2f} s)")
    if results["unfused"]:
        print(f"unfused static batches  {mean['unfused']:8.1f} image-steps/s  = {mean['unfused'] / mean['static']:.3f} x static")
    print(f"CPU time: static {mean['static_cpu']:8.1f}, engine {mean['engine_cpu']:8.1f} image-steps/s  = {ratio_cpu:.3f} x static, "
          "median of repeats")
    print(f"per repeat engine/static: wall {', '.join(f'{r:.3f}' for r in results['ratio'])} "
          f"(spread {min(results['ratio']):.3f} to {max(results['ratio']):.3f}); "
          f"CPU time {', '.join(f'{r:.3f}' for r in results['ratio_cpu'])} "
          f"(spread {min(results['ratio_cpu']):.3f} to {max(results['ratio_cpu']):.3f})")
    print(f"engine >= {TARGET:.2f} x static, wall clock: {verdict(ratio)}")
    print(f"engine >= {TARGET:.2f} x static, CPU time:   {verdict(ratio_cpu)}")
    write_json(args.json, {"args": vars(args), "runs": results, "mean": mean, "engine_over_static": ratio,
                           "engine_over_static_cpu_time": ratio_cpu, "ratio_is": "median over repeats of engine/static", "target": TARGET, "met": ratio >= TARGET,
                           "met_cpu_time": ratio_cpu >= TARGET, "guidance_params": g_params})
    return mean


if __name__ == "__main__":
    main()
