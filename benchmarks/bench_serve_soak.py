"""Soak benchmark of `invdiff serve` (issue 23): minutes of Poisson traffic of mixed requests at
a fraction of the offline capacity, with the engine process SIGKILLed at a fixed period.

    python benchmarks/bench_serve_soak.py --mode standalone --seconds 300 --kill-every 60 --json OUT.json --plot OUT.png
    python benchmarks/bench_serve_soak.py --mode ray --replicas 2 --seconds 300 --kill-every 60 --json OUT.json

Traffic goes to 127.0.0.1 only and is bounded by --seconds and --max-requests. The server, the
client, the request mix and the offline capacity are bench_serve.py's; on top of its mix (steps,
guidance scale 1 or 2, num 1/2/4) every request draws a strength (0, 0.5, 1, 1.5) and a scheduler
(ddim, euler, dpm, ddpm). On the shipped base (no G_psi) the strength changes no pixel: it travels
through validation, admission and the engine's per-slot columns all the same; pass a debiased
model folder with --model to exercise G.

Phases:
  capacity  bench_serve.offline_rates on --calibration-requests requests of the same mix: one
            SamplingEngine per scheduler, every image queued at t = 0 (unless --capacity gives it).
  traffic   Poisson arrivals of --load x capacity x --capacity-engines images/s for --seconds.
            Each request is sent once (no client retries: what the server said is what is counted),
            with --request-timeout for its answer.
  kills     every --kill-every s, SIGKILL of the engine child: standalone, the spawned engine
            process of the `invdiff serve` process; Ray, the engine process of one replica actor,
            the replicas taken in turn. Found in /proc: a descendant of the server process whose
            command line is multiprocessing's spawn_main (the replica actors are Ray workers whose
            process title holds "ServeReplica").
  memory    every second, the RSS of the server's process tree from /proc (standalone: the HTTP
            process and its engine child; Ray: the driver and everything Ray started under it,
            and separately the replica actors with their engine children).

Outcomes: every request ends as 200 (its images), 429 (queue full), 503 (engine restarting or the
engine died with the request; with or without Retry-After, which is counted), another HTTP status,
or lost: no HTTP answer at all (connection refused or reset, timeout; the client exception's name).
A 429 or 503 is a refusal the caller can act on, not a loss. Goal: 0 lost.

Time back to ready after each kill:
  standalone  /readyz polled every --poll-s from the kill until 200 (and when it first turned 503,
              and when the new engine process appeared in /proc).
  ray         /readyz through Ray's proxy reaches either replica, so the server runs with
              --expose-details (X-Served-By is host:pid of the replica actor) and the poll keeps
              each answer's replica: "ready" is the first 200 from the killed replica after the
              kill. Also reported: when its new engine process appeared, and the first image
              (a 200 to /v1/images) that replica answered for a request sent after the kill.
              The other replica keeps serving meanwhile (its /readyz answers are counted too).

Kill windows are [kill, ready again + --guard s] (to the end of the run when ready never
returned). Outside them (a traffic period of [0, --seconds], less the windows):
  delivered  images answered 200 with their answer arriving outside the windows, per second;
  offered    images of the requests sent outside the windows, per second;
  graded     delivered / offered (goal >= 0.9). The offered load is below capacity by design
             (--load 0.8), so delivered / offline capacity is at most the load, ~0.8, whatever the
             service does; what tells whether the service keeps up with its traffic between kills
             as the offline engine would (an engine with 20% spare capacity serves every image of
             a Poisson 0.8 load) is delivered / offered. delivered / offline is reported too.
             Requests in flight at a kill that got their 503 are counted as offered outside the
             window when sent before the kill: the ratio includes what each kill cost them.

Memory: start (first sample), peak and end of the tree's RSS, and the slope over the run's second
half (least squares, MB per minute, on the samples outside the kill windows: a restarted engine
loads its model afresh, so the engine's RSS dips at each kill and comes back) of the tree and of
the HTTP process (the Ray replica actors in Ray mode). "flat": that slope times the second half's
length under max(10 MB, 5% of the start).

The last kill's readiness is awaited after the traffic ended (up to --ready-timeout); the memory
samples go on until then.

This file only measures; it leaves nothing running: the server gets SIGTERM (its drain) at the
end, and any of its descendants still alive after it exited get SIGKILL, by pid.
"""
import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_serve import STEP_MIXES, STEPS, arrivals, drive, offline_rates, start_server, workload  # noqa: E402

GOAL = 0.9
STRENGTHS = (0.0, 0.5, 1.0, 1.5)
SCHEDULERS = ("ddim", "euler", "dpm", "ddpm")
PAGE = os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------ the request mix
def mixed(requests: List[Dict], seed: int) -> List[Dict]:
    """bench_serve's requests, each with a strength and a scheduler drawn as well."""
    rng = random.Random(seed + 7919)
    return [{**r, "strength": rng.choice(STRENGTHS), "scheduler": rng.choice(SCHEDULERS)} for r in requests]


# ------------------------------------------------------------------ processes, from /proc
def processes() -> Dict[int, Dict]:
    """pid -> {"ppid", "rss" (bytes), "cmd"} of every process now (Linux /proc)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/statm") as f:
                rss = int(f.read().split()[1]) * PAGE
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except (OSError, IndexError, ValueError):  # a process that just ended
            continue
        if fields[0] == "Z":  # a zombie (a killed engine its parent has not reaped yet)
            continue
        table[int(entry)] = {"ppid": int(fields[1]), "rss": rss, "cmd": cmd}
    return table


def descendants(table: Dict[int, Dict], pid: int) -> List[int]:
    """`pid` and every process under it."""
    children: Dict[int, List[int]] = {}
    for p, info in table.items():
        children.setdefault(info["ppid"], []).append(p)
    family, frontier = [pid], [pid]
    while frontier:
        frontier = [c for p in frontier for c in children.get(p, [])]
        family += frontier
    return [p for p in family if p in table]


def is_engine(info: Dict) -> bool:
    return "spawn_main" in info["cmd"]


def engine_children(table: Dict[int, Dict], parent: int) -> List[int]:
    return sorted(p for p, info in table.items() if info["ppid"] == parent and is_engine(info))


def replica_actors(table: Dict[int, Dict], server: int) -> List[int]:
    """Ray mode: the replica actors' pids under the server process (their title names ServeReplica)."""
    return sorted(p for p in descendants(table, server) if "ServeReplica" in table[p]["cmd"])


# ------------------------------------------------------------------ the soak's own threads
class Monitor:
    """Memory samples every second and the kills with their readiness, on two threads, while the
    main thread drives the traffic (bench_serve.drive). Times are time.perf_counter()."""

    def __init__(self, args, proc, url: str, t_begin: float):
        self.args, self.proc, self.url, self.t_begin = args, proc, url, t_begin
        self.stop = threading.Event()  # the memory samples end
        self.traffic_over = threading.Event()  # no kill after the traffic; a readiness wait under way goes on
        self.memory: List[Dict] = []
        self.kills: List[Dict] = []
        self.readyz: List[Dict] = []  # every /readyz answer the kill thread saw (t, status, served_by)
        self.errors: List[str] = []
        self.replica_pids: List[int] = []

    def http_pids(self, table) -> List[int]:
        """The processes that run the app: the server (standalone) or the replica actors (Ray)."""
        if self.args.mode == "standalone":
            return [self.proc.pid]
        return replica_actors(table, self.proc.pid)

    def sample_memory(self) -> None:
        while not self.stop.is_set():
            now = time.perf_counter()
            table = processes()
            tree = descendants(table, self.proc.pid)
            apps = self.http_pids(table)
            engines = [e for a in apps for e in engine_children(table, a)]
            self.memory.append({"t": now, "tree_mb": sum(table[p]["rss"] for p in tree) / 2**20,
                                "http_mb": sum(table[p]["rss"] for p in apps) / 2**20,
                                "engine_mb": sum(table[p]["rss"] for p in engines) / 2**20,
                                "processes": len(tree), "engines": len(engines)})
            self.stop.wait(max(0.0, 1.0 - (time.perf_counter() - now)))

    def run_kills(self) -> None:
        import httpx

        k = 0
        with httpx.Client(timeout=2.0) as client:
            while True:
                at = self.t_begin + (k + 1) * self.args.kill_every
                if at > self.t_begin + self.args.seconds - 1 or self.traffic_over.wait(max(0.0, at - time.perf_counter())):
                    return
                try:
                    self.kills.append(self.kill_one(client, k))
                except Exception as exc:  # noqa: BLE001 (reported, the soak goes on)
                    self.errors.append(f"kill {k}: {type(exc).__name__}: {exc}")
                k += 1

    def kill_one(self, client, k: int) -> Dict:
        import httpx

        table = processes()
        if self.args.mode == "standalone":
            owner = self.proc.pid
        else:
            replicas = replica_actors(table, self.proc.pid)
            if not replicas:
                raise RuntimeError("no Ray Serve replica process under the server process")
            self.replica_pids = sorted(set(self.replica_pids) | set(replicas))
            owner = replicas[k % len(replicas)]
        engines = engine_children(table, owner)
        if not engines:
            raise RuntimeError(f"no engine process under pid {owner} (still restarting from the previous kill?)")
        victim = engines[0]
        killed_at = time.perf_counter()
        os.kill(victim, signal.SIGKILL)
        record = {"index": k, "t_kill": killed_at, "owner_pid": owner, "engine_pid": victim,
                  "t_unready": None, "t_new_engine": None, "new_engine_pid": None, "t_ready": None}
        deadline = killed_at + self.args.ready_timeout
        while time.perf_counter() < deadline:
            now = time.perf_counter()
            if record["t_new_engine"] is None:
                fresh = [e for e in engine_children(processes(), owner) if e != victim]
                if fresh:
                    record["t_new_engine"], record["new_engine_pid"] = now, fresh[0]
            try:
                reply = client.get(f"{self.url}/readyz")
                status, by = reply.status_code, reply.headers.get("x-served-by")
            except httpx.HTTPError as exc:
                status, by = type(exc).__name__, None
            self.readyz.append({"t": now, "status": status, "served_by": by, "kill": k})
            mine = self.args.mode == "standalone" or (by or "").endswith(f":{owner}")
            if mine and status != 200 and record["t_unready"] is None:
                record["t_unready"] = now
            if mine and status == 200 and (record["t_unready"] is not None or record["t_new_engine"] is not None):
                record["t_ready"] = now
                break
            time.sleep(self.args.poll_s)
        return record


# ------------------------------------------------------------------ analysis
def merge(intervals):
    out = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def inside(t: float, windows) -> bool:
    return any(a <= t < b for a, b in windows)


def slope_per_min(points) -> Optional[float]:
    """Least-squares slope of (t s, value) in value per minute."""
    if len(points) < 3:
        return None
    ts, vs = [p[0] for p in points], [p[1] for p in points]
    mt, mv = statistics.fmean(ts), statistics.fmean(vs)
    den = sum((t - mt) ** 2 for t in ts)
    return 60 * sum((t - mt) * (v - mv) for t, v in zip(ts, vs)) / den if den else None


def outcome(r: Dict) -> str:
    s = r["status"]
    if isinstance(s, str):
        return "lost"
    if s in (200, 429):
        return str(s)
    if s == 503:
        return "503" if r["retry_after"] is not None else "503 (no Retry-After)"
    return f"other {s}"


def analyse(args, traffic: Dict, monitor: Monitor, capacity: float, offered_rate: float) -> Dict:
    t0 = traffic["t0"]
    results = traffic["results"]
    counts: Dict[str, int] = {}
    lost_kinds: Dict[str, int] = {}
    for r in results:
        kind = outcome(r)
        counts[kind] = counts.get(kind, 0) + 1
        if kind == "lost":
            lost_kinds[r["status"]] = lost_kinds.get(r["status"], 0) + 1
    end = max([r["done"] for r in results] + [args.seconds])
    kills = []
    for k in monitor.kills:
        rel = {name: (k[name] - t0 if isinstance(k.get(name), float) else None) for name in ("t_kill", "t_unready", "t_new_engine", "t_ready")}
        row = {"index": k["index"], "owner_pid": k["owner_pid"], "engine_pid": k["engine_pid"], "new_engine_pid": k["new_engine_pid"],
               **rel}
        row["ready_after_s"] = rel["t_ready"] - rel["t_kill"] if rel["t_ready"] is not None else None
        row["new_engine_after_s"] = rel["t_new_engine"] - rel["t_kill"] if rel["t_new_engine"] is not None else None
        # the requests this kill caught in flight, and what they got
        caught = [r for r in results if r["sent"] < rel["t_kill"] < r["done"]]
        if args.mode == "ray":
            caught = [r for r in caught if (r["served_by"] or "").endswith(f":{k['owner_pid']}")
                      or isinstance(r["status"], str)]
        row["in_flight"] = len(caught)
        row["in_flight_ended"] = {}
        for r in caught:
            row["in_flight_ended"][outcome(r)] = row["in_flight_ended"].get(outcome(r), 0) + 1
        later = [r for r in results if r["status"] == 200 and r["sent"] > rel["t_kill"]
                 and (args.mode == "standalone" or (r["served_by"] or "").endswith(f":{k['owner_pid']}"))]
        row["first_image_after_s"] = min(r["done"] for r in later) - rel["t_kill"] if later else None
        row["window"] = [rel["t_kill"], (rel["t_ready"] + args.guard) if rel["t_ready"] is not None else end]
        # the requests sent from the kill until ready again: how they ended, and (Ray) which replica answered
        row["until_ready"] = {}
        for r in results:
            if rel["t_kill"] <= r["sent"] < (rel["t_ready"] if rel["t_ready"] is not None else end):
                who = "" if args.mode == "standalone" or not r["served_by"] else (
                    "killed replica " if r["served_by"].endswith(f":{k['owner_pid']}") else "other replica ")
                key = who + outcome(r)
                row["until_ready"][key] = row["until_ready"].get(key, 0) + 1
        kills.append(row)
    windows = merge([tuple(k["window"]) for k in kills])
    # outside the windows, within the traffic period [0, seconds] (sends) and to the last answer (deliveries)
    out_traffic = args.seconds - sum(max(0.0, min(b, args.seconds) - a) for a, b in windows if a < args.seconds)
    offered_images = sum(r["num"] for r in results if r["sent"] <= args.seconds and not inside(r["sent"], windows))
    delivered_images = sum(r["num"] for r in results if r["status"] == 200 and not inside(r["done"], windows))
    delivered_in_traffic = sum(r["num"] for r in results if r["status"] == 200 and r["done"] <= args.seconds and not inside(r["done"], windows))
    sent_outside = [r for r in results if not inside(r["sent"], windows)]
    served_fraction = (sum(r["num"] for r in sent_outside if r["status"] == 200) / sum(r["num"] for r in sent_outside)) if sent_outside else None
    throughput = {
        "outside_seconds": out_traffic,
        "offered_images": offered_images, "delivered_images": delivered_images,
        "offered_images_per_s": offered_images / out_traffic if out_traffic > 0 else None,
        "delivered_images_per_s": delivered_in_traffic / out_traffic if out_traffic > 0 else None,
        "delivered_vs_offered": delivered_images / offered_images if offered_images else None,  # graded
        "delivered_vs_offline": (delivered_in_traffic / out_traffic / capacity) if out_traffic > 0 else None,
        "served_fraction_of_requests_sent_outside": served_fraction,
    }
    lat = sorted(r["done"] - r["sent"] for r in results if r["status"] == 200)
    latency = {"p50_s": lat[len(lat) // 2] if lat else None, "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None}
    # memory
    mem = [{**m, "t": m["t"] - t0} for m in monitor.memory]
    memory = {}
    if mem:
        # the second half, outside the kill windows (a restarted engine loads its model afresh: a dip, not a trend)
        half = [m for m in mem if m["t"] >= mem[-1]["t"] / 2 and not inside(m["t"], windows)]
        for key in ("tree_mb", "http_mb", "engine_mb"):
            values = [m[key] for m in mem]
            slope = slope_per_min([(m["t"], m[key]) for m in half])
            memory[key] = {"start": values[0], "peak": max(values), "end": values[-1], "second_half_slope_mb_per_min": slope}
        for key in ("tree_mb", "http_mb"):
            m = memory[key]
            growth = (m["second_half_slope_mb_per_min"] or 0.0) * (half[-1]["t"] - half[0]["t"]) / 60 if half else 0.0
            m["second_half_growth_mb"] = growth
            m["flat"] = None if m["second_half_slope_mb_per_min"] is None else growth < max(10.0, 0.05 * m["start"])
    return {"counts": counts, "lost_kinds": lost_kinds, "sent": len(results), "kills": kills, "windows": windows,
            "throughput": throughput, "latency_200": latency, "memory": memory, "memory_samples": mem, "end_s": end,
            "readyz_polls": [{**p, "t": p["t"] - t0} for p in monitor.readyz]}


# ------------------------------------------------------------------ running it
def wait_replicas(url: str, replicas: int, timeout: float) -> List[str]:
    """Ray mode: until /readyz has been 200 from `replicas` distinct replicas (X-Served-By)."""
    import httpx

    seen = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(seen) < replicas:
        try:
            reply = httpx.get(f"{url}/readyz", timeout=2)
            if reply.status_code == 200:
                seen.add(reply.headers.get("x-served-by"))
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return sorted(s for s in seen if s)


def stop_server(proc, timeout: float, linger: float = 30.0) -> Dict:
    """SIGTERM (the server's drain); then its processes that outlive it get `linger` s to end on
    their own (reported: an engine that was restarting does not see its pipe close while it loads)
    and SIGKILL by pid after that."""
    family = set(descendants(processes(), proc.pid))
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=timeout)
    except Exception:  # noqa: BLE001 (subprocess.TimeoutExpired)
        proc.kill()
        rc = proc.wait()
    exited = time.monotonic()
    table = processes()
    outlived = {p: table[p]["cmd"][:120] for p in family if p != proc.pid and p in table}
    alive = set(outlived)
    while alive and time.monotonic() < exited + linger:
        time.sleep(0.5)
        alive &= set(processes())
    lingered = time.monotonic() - exited if outlived else 0.0
    for p in alive:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass
    return {"rc": rc, "seconds": exited - started, "outlived_server": outlived, "outlived_s": lingered,
            "leftover_killed": sorted(alive)}


def main(argv=None) -> int:
    from invdiff.demo import shipped_base

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("standalone", "ray"), default="standalone")
    parser.add_argument("--replicas", type=int, default=2, help="--mode ray: replicas")
    parser.add_argument("--model", default=None, help="model folder (None: the shipped p=0.9 base)")
    parser.add_argument("--seconds", type=float, default=300.0, help="seconds of arrivals")
    parser.add_argument("--kill-every", type=float, default=60.0, help="SIGKILL an engine process every this many seconds")
    parser.add_argument("--load", type=float, default=0.8, help="arrival rate as a fraction of the capacity (images/s)")
    parser.add_argument("--capacity", type=float, default=None, help="offline images/s to use instead of measuring it")
    parser.add_argument("--capacity-engines", type=float, default=1.0,
                        help="engines the capacity counts (default 1: in Ray mode one replica can carry the load while the other restarts)")
    parser.add_argument("--calibration-requests", type=int, default=96, help="requests of the offline capacity measurement")
    parser.add_argument("--calibration-repeats", type=int, default=3, help="offline runs; their median is the capacity")
    parser.add_argument("--steps-mix", choices=sorted(STEP_MIXES), default="typical")
    parser.add_argument("--max-requests", type=int, default=5000, help="cap on the requests sent")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="seconds a request may wait for its answer (then lost)")
    parser.add_argument("--ready-timeout", type=float, default=120.0, help="seconds after a kill before readiness counts as never returned")
    parser.add_argument("--guard", type=float, default=5.0, help="seconds after ready again that still belong to the kill window")
    parser.add_argument("--poll-s", type=float, default=0.1, help="/readyz poll period after a kill")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-queue", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each engine and of the offline engine")
    parser.add_argument("--start-timeout", type=float, default=300.0, help="seconds the server may take to be ready")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log", default=None, help="the server's stderr (default: a temporary file, kept)")
    parser.add_argument("--json")
    parser.add_argument("--plot", help="images/s, RSS and the kills over time (PNG; needs matplotlib)")
    args = parser.parse_args(argv)
    model = args.model or shipped_base()
    STEPS[:] = STEP_MIXES[args.steps_mix]

    if args.capacity is None:
        calibration = mixed(workload(args.calibration_requests, args.seed + 999), args.seed + 999)
        capacity = offline_rates(model, calibration, args.max_batch, args.threads, args.calibration_repeats)["images_per_s"]
        print(f"offline engine: {capacity:.2f} images/s on {args.calibration_requests} mixed requests, median of {args.calibration_repeats} "
              f"(max batch {args.max_batch}, {args.threads} threads)", flush=True)
    else:
        capacity = args.capacity
        print(f"offline engine: {capacity:.2f} images/s (given)", flush=True)
    rate = args.load * capacity * args.capacity_engines
    requests, times = arrivals(rate, args.seconds, args.max_requests, args.seed)
    requests = mixed(requests, args.seed)
    log_path = args.log or tempfile.mkstemp(prefix=f"soak_{args.mode}_", suffix=".log")[1]
    extra = ["--expose-details"] + (["--ray", "--replicas", str(args.replicas)] if args.mode == "ray" else [])
    started = time.monotonic()
    proc, url = start_server(model, args.max_batch, args.max_queue, args.threads, extra, args.start_timeout, log_path)
    served_by = wait_replicas(url, args.replicas, args.start_timeout) if args.mode == "ray" else []
    print(f"server ({args.mode}) ready in {time.monotonic() - started:.1f} s at {url}"
          + (f", replicas {served_by}" if served_by else "") + f"; log {log_path}", flush=True)
    print(f"traffic: {len(requests)} requests, {rate:.2f} images/s offered ({args.load:g} x capacity), "
          f"{args.seconds:g} s, a kill every {args.kill_every:g} s", flush=True)
    t_begin = time.perf_counter()
    monitor = Monitor(args, proc, url, t_begin)
    threads = [threading.Thread(target=monitor.sample_memory, daemon=True), threading.Thread(target=monitor.run_kills, daemon=True)]
    for t in threads:
        t.start()
    try:
        traffic = asyncio.run(drive(url, requests, times, timeout=args.request_timeout))
    finally:
        monitor.traffic_over.set()
        threads[1].join(timeout=args.ready_timeout + 5)  # the last kill's readiness, when it is still awaited
        monitor.stop.set()
        threads[0].join(timeout=5)
        stopped = stop_server(proc, timeout=120)
    report = analyse(args, traffic, monitor, capacity, rate)
    report.update(mode=args.mode, replicas=args.replicas if args.mode == "ray" else 1, model=model, capacity_images_per_s=capacity,
                  offered_images_per_s=rate, load=args.load, seconds=args.seconds, kill_every=args.kill_every, guard_s=args.guard,
                  steps_mix=list(STEPS), strengths=list(STRENGTHS), schedulers=list(SCHEDULERS), max_batch=args.max_batch,
                  max_queue=args.max_queue, threads=args.threads, server_log=log_path, stop=stopped, monitor_errors=monitor.errors,
                  replica_pids=monitor.replica_pids, served_by=served_by)
    ok = summary(report)
    if args.json:
        report["requests"] = [{k: r[k] for k in ("index", "status", "num", "sent", "done", "steps", "retry_after", "served_by")}
                              | {"strength": requests[r["index"]]["strength"], "scheduler": requests[r["index"]]["scheduler"]}
                              for r in sorted(traffic["results"], key=lambda r: r["index"])]
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    if args.plot:
        try:
            plot(report, traffic["results"], args.plot)
        except ImportError:
            print("matplotlib is not installed: no plot")
    return 0 if ok else 1


def summary(rep: Dict) -> bool:
    c, th, mem = rep["counts"], rep["throughput"], rep["memory"]
    lost = c.get("lost", 0)

    def f(x, fmt="{:.2f}"):
        return "-" if x is None else fmt.format(x)

    print(f"\n== soak of invdiff serve ({rep['mode']}, {rep['replicas']} replica(s)) on {os.path.basename(rep['model'])}: "
          f"{rep['seconds']:g} s at {rep['load']:g} x {rep['capacity_images_per_s']:.2f} images/s, a kill every {rep['kill_every']:g} s ==")
    print(f"requests sent {rep['sent']}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
          + (f"  (lost as {rep['lost_kinds']})" if lost else ""))
    print(f"sum of outcomes {sum(c.values())} = sent {rep['sent']}: {'yes' if sum(c.values()) == rep['sent'] else 'NO'};"
          f" lost {lost} (goal 0): {'ok' if lost == 0 else 'MISS'}; 200 latency p50 {f(rep['latency_200']['p50_s'])} s,"
          f" p99 {f(rep['latency_200']['p99_s'])} s")
    print("kill  at s   engine  -> new    new engine s  ready s  first image s  in flight (ended)")
    for k in rep["kills"]:
        print(f"{k['index']:4d} {k['t_kill']:6.1f}  {k['engine_pid']:7d} -> {str(k['new_engine_pid'] or '-'):7s} {f(k['new_engine_after_s']):>11s}"
              f"  {f(k['ready_after_s']):>7s}  {f(k['first_image_after_s']):>13s}  {k['in_flight']} {k['in_flight_ended']}")
    for k in rep["kills"]:
        print(f"  kill {k['index']}: requests sent until ready again ended as {dict(sorted(k['until_ready'].items()))}")
    never = [k["index"] for k in rep["kills"] if k["ready_after_s"] is None]
    if never:
        print(f"readiness never returned after kill(s) {never}")
    if rep["monitor_errors"]:
        print("monitor errors:", "; ".join(rep["monitor_errors"]))
    graded = th["delivered_vs_offered"]
    print(f"outside kill windows ({th['outside_seconds']:.0f} s): offered {f(th['offered_images_per_s'])} images/s, delivered "
          f"{f(th['delivered_images_per_s'])} images/s; delivered/offered {f(graded, '{:.3f}')} (graded, goal >= {GOAL}: "
          f"{'ok' if graded is not None and graded >= GOAL else 'MISS'}); delivered/offline {f(th['delivered_vs_offline'], '{:.3f}')}")
    for key, name in (("tree_mb", "server tree"), ("http_mb", "HTTP process" if rep["mode"] == "standalone" else "replica actors"),
                      ("engine_mb", "engine(s)")):
        m = mem.get(key)
        if m:
            verdict = {None: "too few samples outside the kill windows", True: "flat", False: "GROWING"}[m.get("flat")]
            flat = "" if "flat" not in m else f", 2nd-half growth {m['second_half_growth_mb']:+.1f} MB: {verdict}"
            print(f"RSS {name:14s} start {m['start']:7.0f} MB, peak {m['peak']:7.0f} MB, end {m['end']:7.0f} MB, "
                  f"2nd-half slope {f(m['second_half_slope_mb_per_min'], '{:+.2f}')} MB/min{flat}")
    st = rep["stop"]
    print(f"server stopped (SIGTERM): rc {st['rc']} in {st['seconds']:.1f} s"
          + (f"; {len(st['outlived_server'])} of its processes outlived it by {st['outlived_s']:.1f} s" if st["outlived_server"] else "")
          + (f", SIGKILLed after that: {st['leftover_killed']}" if st["leftover_killed"] else ""))
    return lost == 0 and not never and sum(c.values()) == rep["sent"]


def plot(rep: Dict, results: List[Dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bin_s = 5.0
    end = rep["end_s"]
    bins = int(end // bin_s) + 1
    delivered, offered, refused = [0.0] * bins, [0.0] * bins, [0.0] * bins
    for r in results:
        offered[int(r["sent"] // bin_s)] += r["num"] / bin_s
        if r["status"] == 200:
            delivered[int(r["done"] // bin_s)] += r["num"] / bin_s
        else:
            refused[int(r["done"] // bin_s)] += r["num"] / bin_s
    xs = [(i + 0.5) * bin_s for i in range(bins)]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
    top.step(xs, offered, where="mid", color="gray", label="offered")
    top.step(xs, delivered, where="mid", color="C0", label="delivered (200)")
    top.step(xs, refused, where="mid", color="C3", lw=0.8, label="refused/lost")
    top.axhline(rep["capacity_images_per_s"], color="C1", ls="--", label="offline engine")
    top.set(ylabel=f"images/s ({bin_s:g} s bins)", title=f"soak: {rep['mode']}, a kill every {rep['kill_every']:g} s")
    mem = rep["memory_samples"]
    bottom.plot([m["t"] for m in mem], [m["tree_mb"] for m in mem], label="server tree")
    bottom.plot([m["t"] for m in mem], [m["http_mb"] for m in mem], label="HTTP process" if rep["mode"] == "standalone" else "replica actors")
    bottom.plot([m["t"] for m in mem], [m["engine_mb"] for m in mem], label="engine(s)")
    bottom.set(xlabel="seconds", ylabel="RSS MB")
    for ax in (top, bottom):
        for k in rep["kills"]:
            ax.axvspan(k["window"][0], k["window"][1], color="C3", alpha=0.08)
            ax.axvline(k["t_kill"], color="C3", lw=0.8)
            if k["t_ready"] is not None:
                ax.axvline(k["t_ready"], color="C2", lw=0.8)
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
