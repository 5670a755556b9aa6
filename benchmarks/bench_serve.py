"""Load benchmark of `invdiff serve`: Poisson arrivals of mixed requests at rising rates, up to
overload, against the offline engine on the same requests.

    python benchmarks/bench_serve.py                                  # the shipped p=0.9 base, CPU
    python benchmarks/bench_serve.py --model DIR --rates 0.5 1 2 4 --json out.json

Traffic goes to 127.0.0.1 only and is bounded: each rate sends Poisson arrivals for --seconds
(at most --max-requests). Requests mix steps (--steps-mix typical: 10/25/50; short: 8/12/16, a
stress case where the per-request HTTP work weighs three times more against the sampling),
guidance scale (1 or 2) and num (1, 2 or 4 images), as a production queue sees them. A run long enough to hold several hundred images
keeps the start-up ramp and the final drain, which a finite run has and a live service does not,
to a few percent of the time.

  offline   the same requests, all present at t = 0, through one SamplingEngine with the
            server's --max-batch (what `invdiff sample` does): the throughput ceiling.
  service   `invdiff serve` in its own process; an asyncio client sends each rate's requests
            at Poisson arrival times (rate = a multiple of the offline capacity, in images/s).
Reported per rate: images/s delivered, p50/p99 latency of the answered requests, and how each
request ended (it must be 200 with its images or 429). The goal (issue 15): at the overloaded
rates (>= 2x the offline capacity; at 1.2x-1.5x Poisson gaps still empty the queue at times, which
is shown but not graded) the service delivers >= 0.9 of the offline engine's images/s on the
requests it served. "img/CPU-s" divides by the CPU seconds of the server's processes (HTTP and
engine) or of the offline process: the HTTP work's cost, which wall-clock time hides while a core
is free.
"""
import argparse
import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GOAL = 0.9
OVERLOAD = 2.0  # the goal is graded at arrival rates of at least this multiple of the offline capacity


STEP_MIXES = {"typical": (10, 25, 50), "short": (8, 12, 16)}  # 25: invdiff sample's default
STEPS = list(STEP_MIXES["typical"])


def workload(n: int, seed: int) -> List[Dict]:
    rng = random.Random(seed)
    return [{"prompt": f"digit {rng.randrange(10)}", "num": rng.choice([1, 2, 4]), "seed": rng.randrange(2**31),
             "steps": rng.choice(STEPS), "guidance_scale": rng.choice([1.0, 2.0])} for _ in range(n)]


def offline_rates(model: str, requests: List[Dict], max_batch: int, threads: int, repeats: int = 1) -> Dict[str, float]:
    """Every image of `requests` through one engine per scheduler (a request's "scheduler", default
    ddim; its "strength", default the server's 1, per image), each scheduler's images all queued
    at t = 0 (after a warm-up) and the schedulers one after another, as `invdiff sample` runs
    them: the median over `repeats` of images per wall second and per CPU second of this process."""
    import statistics

    import torch

    from invdiff.model_folders.load import load_model
    from invdiff.sampling import GuidedDenoiser, Request, sampling_engine

    torch.set_num_threads(threads)
    base, guidance = load_model(model)
    denoiser = GuidedDenoiser(base, guidance, 1.0)
    groups: Dict[str, List] = {}
    for r in requests:
        prompt_id = int(base.conditioner.prompt_ids([r["prompt"]])[0])
        groups.setdefault(r.get("scheduler", "ddim"), []).extend(
            Request(prompt_id, r["seed"] + i, r["steps"], r["guidance_scale"], strength=r.get("strength"))
            for i in range(r["num"]))
    total = sum(len(images) for images in groups.values())
    wall, cpu = [], []
    for _ in range(repeats):
        engines = {name: sampling_engine(denoiser, name, max_batch) for name in groups}
        for engine in engines.values():
            engine.run([Request(0, 0, steps=2, guidance_scale=2.0)])  # warm-up
        start, start_cpu = time.perf_counter(), time.process_time()
        for name, images in groups.items():
            engines[name].run(images)
        wall.append(total / (time.perf_counter() - start))
        cpu.append(total / (time.process_time() - start_cpu))
    return {"images_per_s": statistics.median(wall), "images_per_cpu_s": statistics.median(cpu)}


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` and its descendants (the engine process), all
    threads, from Linux /proc."""
    parents, stats = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:  # a process that just ended
                continue
            parents[int(entry)] = int(fields[1])
            stats[int(entry)] = int(fields[11]) + int(fields[12])
    family, frontier = {pid}, [pid]
    while frontier:
        frontier = [p for p, parent in parents.items() if parent in frontier and p not in family]
        family.update(frontier)
    return sum(stats.get(p, 0) for p in family) / os.sysconf("SC_CLK_TCK")


MEAN_NUM = (1 + 2 + 4) / 3


def arrivals(rate_images: float, seconds: float, max_requests: int, seed: int):
    """(requests, arrival times in s): Poisson arrivals of `rate_images` images/s for `seconds`."""
    rng = random.Random(seed)
    rate_requests = rate_images / MEAN_NUM
    times, t = [], rng.expovariate(rate_requests)
    while t < seconds and len(times) < max_requests:
        times.append(t)
        t += rng.expovariate(rate_requests)
    return workload(len(times), seed), times


async def drive(url: str, requests: List[Dict], times: List[float], timeout: float = 600) -> Dict:
    """Send `requests` at `times` (s from now), each once (no retries), with `timeout` s for its
    answer; how each one ended (its status, or the client-side exception's name when no answer
    came), images/s and latency. "t0" is the time.perf_counter() that "sent" and "done" count from."""
    import httpx

    results = []

    async def one(client, index, body, at):
        await asyncio.sleep(max(0.0, at - (time.perf_counter() - start)))
        sent = time.perf_counter()
        try:
            reply = await client.post(f"{url}/v1/images", json=body)
            status, headers = reply.status_code, reply.headers
        except httpx.HTTPError as exc:
            status, headers = type(exc).__name__, {}
        results.append({"index": index, "status": status, "num": body["num"], "sent": sent - start, "done": time.perf_counter() - start,
                        "steps": body["steps"], "retry_after": headers.get("retry-after"), "served_by": headers.get("x-served-by")})

    limits = httpx.Limits(max_connections=len(requests), max_keepalive_connections=len(requests))
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one(client, i, body, at) for i, (body, at) in enumerate(zip(requests, times))))
    served = [r for r in results if r["status"] == 200]
    latencies = sorted(r["done"] - r["sent"] for r in served)
    span = max(r["done"] for r in served) - min(r["sent"] for r in served) if served else float("nan")

    def pct(q):
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")

    ended = {}
    for r in results:
        ended[str(r["status"])] = ended.get(str(r["status"]), 0) + 1
    return {"requests": len(requests), "ended": ended, "t0": start,
            "served_images": sum(r["num"] for r in served), "images_per_s": sum(r["num"] for r in served) / span if served else 0.0,
            "p50_s": pct(0.50), "p99_s": pct(0.99), "served_ids": sorted(r["index"] for r in results if r["status"] == 200),
            "results": results}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, max_batch: int, max_queue: int, threads: int, extra_args=(), ready_timeout: float = 120,
                 log_path=None, port=None):
    """`invdiff serve` on 127.0.0.1 (`extra_args` added to its command line); (process, url) once
    /readyz is 200. Its stderr goes to `log_path` (a long run: a pipe nobody reads fills and
    blocks the server's logging) or to a pipe."""
    import httpx

    port = port or free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    log = open(log_path, "w") if log_path else subprocess.PIPE
    proc = subprocess.Popen([sys.executable, "-m", "invdiff.cli", "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port),
                             "--max-batch", str(max_batch), "--max-queue", str(max_queue), "--max-images-per-request", "4",
                             *extra_args], env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    if log_path:
        log.close()

    def tail():
        if log_path:
            with open(log_path) as f:
                return f.read()[-2000:]
        return proc.stderr.read()[-2000:]

    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"invdiff serve exited: {tail()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"invdiff serve was not ready within {ready_timeout:g} s")


def main(argv=None):
    from invdiff.demo import shipped_base

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (None: the shipped p=0.9 base)")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.25, 0.5, 0.8, 1.2, 2.0, 4.0],
                        help="arrival rates as multiples of the offline capacity (images/s)")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds of arrivals per rate")
    parser.add_argument("--steps-mix", choices=sorted(STEP_MIXES), default="typical", help="the requests' step counts")
    parser.add_argument("--max-requests", type=int, default=2000, help="cap on the requests one rate sends")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-queue", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server and of the offline engine")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    parser.add_argument("--plot", help="write images/s and p50/p99 latency against the arrival rate here (PNG)")
    args = parser.parse_args(argv)
    model = args.model or shipped_base()
    STEPS[:] = STEP_MIXES[args.steps_mix]

    calibration = workload(96, args.seed + 999)
    capacity = offline_rates(model, calibration, args.max_batch, args.threads)["images_per_s"]
    print(f"offline engine: {capacity:.2f} images/s (max batch {args.max_batch}, {args.threads} threads)", flush=True)
    proc, url = start_server(model, args.max_batch, args.max_queue, args.threads)
    rows = []
    try:
        for k, factor in enumerate(args.rates):
            requests, times = arrivals(factor * capacity, args.seconds, args.max_requests, args.seed + k)
            cpu_before = process_cpu_seconds(proc.pid)
            row = asyncio.run(drive(url, requests, times))
            row["server_cpu_s"] = process_cpu_seconds(proc.pid) - cpu_before
            row["images_per_cpu_s"] = row["served_images"] / row["server_cpu_s"]
            row.update(factor=factor, rate_images_per_s=factor * capacity, sent=requests)
            rows.append(row)
            print(f"  rate {factor:4.2f}x: {row['images_per_s']:.2f} images/s, p50 {row['p50_s']:.2f} s, "
                  f"p99 {row['p99_s']:.2f} s, ended {row['ended']}", flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    # The same requests offline, at the rates that overload the service (below capacity the
    # arrivals, not the service, set the pace): the median of 3 runs, since this shared machine
    # varies by +-10% between identical runs.
    for row in rows:
        row["only_200_or_429"] = set(row["ended"]) <= {"200", "429"}
        row["overloaded"] = row["factor"] >= 1.0
        row["graded"] = row["factor"] >= OVERLOAD  # near capacity Poisson gaps empty the queue at times
        if row["overloaded"]:
            served = [row["sent"][i] for i in row["served_ids"]]
            offline = offline_rates(model, served, args.max_batch, args.threads, repeats=3)
            row["offline_images_per_s"], row["offline_images_per_cpu_s"] = offline["images_per_s"], offline["images_per_cpu_s"]
            row["vs_offline"] = row["images_per_s"] / row["offline_images_per_s"]
            row["cpu_vs_offline"] = row["images_per_cpu_s"] / row["offline_images_per_cpu_s"]
    print(f"\n== invdiff serve on {model} (CPU), steps {STEPS}, max batch {args.max_batch}, max queue {args.max_queue}; "
          f"goal: >= {GOAL} of the offline engine's images/s at >= {OVERLOAD:g}x the offline capacity ==")
    print(f"{'rate':>6s} {'req/s':>6s} {'images/s':>9s} {'offline':>8s} {'x offline':>12s} {'img/CPU-s':>10s} {'offline':>8s} "
          f"{'x offline':>9s} {'p50 s':>6s} {'p99 s':>6s}  ended")
    for row in rows:
        if row["overloaded"]:
            verdict = ("ok" if row["vs_offline"] >= GOAL else "MISS") if row["graded"] else ""
            wall = f"{row['offline_images_per_s']:8.2f} {row['vs_offline']:7.3f} {verdict:>4s}"
            cpu = f"{row['offline_images_per_cpu_s']:8.2f} {row['cpu_vs_offline']:9.3f}"
        else:
            wall, cpu = f"{'-':>8s} {'-':>12s}", f"{'-':>8s} {'-':>9s}"
        print(f"{row['factor']:5.2f}x {row['rate_images_per_s'] / MEAN_NUM:6.2f} {row['images_per_s']:9.2f} {wall} "
              f"{row['images_per_cpu_s']:10.2f} {cpu} {row['p50_s']:6.2f} {row['p99_s']:6.2f}  {row['ended']}")
    ok = all(r["only_200_or_429"] for r in rows)
    print(f"every request ended as images (200) or 429: {'yes' if ok else 'NO'}")
    if args.json:
        from benchmarks.common import write_json

        write_json(args.json, {"model": model, "device": "cpu", "steps_mix": STEPS, "max_batch": args.max_batch, "max_queue": args.max_queue,
                               "threads": args.threads, "offline_capacity_images_per_s": capacity, "goal": GOAL,
                               "seconds_per_rate": args.seconds,
                               "rows": [{k: v for k, v in r.items() if k not in ("results", "served_ids", "sent")} for r in rows]})
    if args.plot:
        plot(rows, capacity, args.plot)
    return 0 if ok else 1


def plot(rows: List[Dict], capacity: float, path: str) -> None:
    """Throughput and latency against the offered load: where the service saturates and what
    queueing costs before it refuses work."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    offered = [r["rate_images_per_s"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.plot(offered, [r["images_per_s"] for r in rows], "o-", label="service (delivered)")
    left.plot(offered, offered, ":", color="gray", label="offered")
    left.axhline(capacity, color="C1", ls="--", label="offline engine")
    left.axhline(0.9 * capacity, color="C1", ls=":", label="goal 0.9 x offline")
    left.set(xlabel="offered load (images/s)", ylabel="images/s", title="throughput")
    left.legend(fontsize=7)
    right.plot(offered, [r["p50_s"] for r in rows], "o-", label="p50")
    right.plot(offered, [r["p99_s"] for r in rows], "s-", label="p99")
    right.set(xlabel="offered load (images/s)", ylabel="seconds", title="latency of answered requests")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
