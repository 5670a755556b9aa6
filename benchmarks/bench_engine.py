"""Continuous batching under Poisson arrivals vs static full batches (the shipped p=0.9 base).

    python benchmarks/bench_engine.py [--requests 256 --max-batch 16 --repeats 2 --json out.json]

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
The goal (issue 4): engine >= 90% of static.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from invdiff.demo import shipped_base  # noqa: E402
from invdiff.sampling.engine import Request, SamplingEngine  # noqa: E402
from invdiff.runs import load_model  # noqa: E402
from invdiff.sampling import GuidedDenoiser, sample_unfused  # noqa: E402


def workload(n: int, steps, seed: int = 0):
    rng = random.Random(seed)
    return [Request(prompt_id=rng.randrange(10), seed=rng.randrange(2**31), steps=rng.choice(steps),
                    guidance_scale=round(rng.uniform(1.5, 3.0), 2), request_id=i) for i in range(n)]


def run_static(denoiser, requests, max_batch):
    engine = SamplingEngine(denoiser, "ddim", max_batch=max_batch)
    start = time.perf_counter()
    engine.run(sorted(requests, key=lambda r: r.steps))
    return time.perf_counter() - start, engine


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


def run_poisson(denoiser, requests, max_batch, rate, seed=0):
    """Requests arrive at exponential gaps of mean 1/rate seconds (wall clock)."""
    rng = random.Random(seed)
    order = requests[:]
    rng.shuffle(order)
    arrivals, clock = [], 0.0
    for r in order:
        clock += rng.expovariate(rate)
        arrivals.append((clock, r))
    engine = SamplingEngine(denoiser, "ddim", max_batch=max_batch)
    start = time.perf_counter()
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
    return time.perf_counter() - start, engine, idle


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 12, 16])
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base, _ = load_model(shipped_base(0.9))
    denoiser = GuidedDenoiser(base.freeze(), None)
    requests = workload(args.requests, args.steps)
    image_steps = sum(r.steps for r in requests)
    run_static(denoiser, requests[: args.max_batch], args.max_batch)  # warm-up
    results = {"static": [], "engine": [], "unfused": [], "engine_idle_s": [], "engine_mean_occupancy": []}
    for rep in range(args.repeats):
        seconds, static_engine = run_static(denoiser, requests, args.max_batch)
        results["static"].append(image_steps / seconds)
        rate = 2.0 * (len(requests) / seconds)  # arrivals at twice static capacity
        seconds, engine, idle = run_poisson(denoiser, requests, args.max_batch, rate, seed=rep)
        results["engine"].append(image_steps / seconds)
        results["engine_idle_s"].append(idle)
        results["engine_mean_occupancy"].append(engine.slot_steps / engine.model_evaluations / args.max_batch)
        results["unfused"].append(image_steps / run_unfused(denoiser, requests, args.max_batch))
        print(f"repeat {rep}: static {results['static'][-1]:.1f}, engine {results['engine'][-1]:.1f}, "
              f"unfused {results['unfused'][-1]:.1f} image-steps/s", file=sys.stderr, flush=True)
    mean = {k: sum(v) / len(v) for k, v in results.items()}
    print(f"workload: {len(requests)} requests, steps {args.steps}, max_batch {args.max_batch}, "
          f"{image_steps} image-steps, {args.threads} threads, {args.repeats} repeats (mean)")
    print(f"static full batches     {mean['static']:8.1f} image-steps/s")
    print(f"engine, Poisson arrival {mean['engine']:8.1f} image-steps/s  = {mean['engine'] / mean['static']:.2f} x static "
          f"(mean slot occupancy {mean['engine_mean_occupancy']:.2f}, waiting for arrivals {mean['engine_idle_s']:.2f} s)")
    print(f"unfused static batches  {mean['unfused']:8.1f} image-steps/s  = {mean['unfused'] / mean['static']:.2f} x static")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": results, "mean": mean}, f, indent=1)
    return mean


if __name__ == "__main__":
    main()
