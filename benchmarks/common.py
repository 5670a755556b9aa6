"""Shared setup for the kernel benchmarks: input factories, providers, timing and byte accounting.

Used by bench_invariant_loss.py, bench_guidance_combine.py, bench_guided_step.py (the
command-line scripts that print tables and write JSON for gpu_check.sh) and the pytest-benchmark
suites of `make bench`, so all of them time the same inputs through the same providers.

Providers:
  reference-eager  invdiff.ops.reference in eager PyTorch (the oracle, about ten kernels);
  torch.compile    the same reference through torch.compile (Inductor fuses what it can);
  triton           the fused kernels of invdiff.kernels (CUDA only: the CPU interpreter is a
                   test vehicle, not a performance path, and is timed only by --dry).
Modes: forward, backward (the backward alone, from a kept graph) and full (forward + backward).

Columns of a measured row (CUDA; see `measure`):
  us        kernel time: triton.testing.do_bench, CUDA events around each call, L2 flushed
            between calls; launch gaps the GPU waits through are included;
  graph_us  the same calls replayed from one CUDA graph (do_bench_cudagraph): the GPU time
            without Python or launch overhead. L2 is WARM here (do_bench_cudagraph does not
            flush it between replays): at B = 16 and 64 the inputs fit in an H100/H200's 50 MB
            L2 and this column flatters them; at B = 1024 (3 x 32 MB and more) it matters little.
            The JSON says so in "graph_l2";
  wall_us   per-call wall time of back-to-back calls, synchronised at the end: what a Python
            caller pays, custom-op dispatch and autograd bookkeeping included;
  GB/s      this design's traffic (`bytes`) over `us`;
  % copy    a device copy moving the same number of bytes, timed the same way, over `us`:
            100% means the kernel streams its bytes as fast as a plain copy of that size;
  % SOL     the copy time of the *minimum* traffic (`min_bytes`: each input read once, each
            output written once) over `us`: how close the op is to what any design could reach.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

PROVIDERS = ("reference-eager", "torch.compile", "triton")
MODES = ("forward", "backward", "full")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Set by `configure` (bench_main's --dry): tiny CPU runs that exercise every code path of the
# GPU benchmarks (the Triton provider in the interpreter, torch.compile through Dynamo only)
# without timing anything meaningful. gpu_check.sh's dry run uses it.
DRY = {"enabled": False}

# do_bench's budget per point, in ms. Short: gpu_check.sh times about 150 points in its minutes.
WARMUP_MS, REP_MS, GRAPH_REP_MS = 10, 40, 10
# What the graph_ms column's L2 state is (see the module doc), written into every result.
GRAPH_L2 = "warm: do_bench_cudagraph does not flush L2 between replays"
# gpu_check.sh's run_step puts the end of each step's budget here (Unix time, seconds); bench_main
# stops starting rows before it (its --stop-at default), so a step ends by itself with its rows
# written. A time, not a duration, so that the imports before bench_main count too.
STEP_DEADLINE_ENV = "GPU_CHECK_STEP_DEADLINE"


def configure(dry: bool) -> None:
    """Switch the module into (or out of) the dry mode described at DRY."""
    DRY["enabled"] = dry


@dataclass(frozen=True)
class Shape:
    """One benchmark input: B samples of C x H x W, K environments."""

    batch: int
    channels: int = 4
    size: int = 64
    groups: int = 2

    @property
    def numel(self) -> int:
        return self.batch * self.channels * self.size * self.size

    def __str__(self) -> str:
        return f"B={self.batch} {self.channels}x{self.size}x{self.size} K={self.groups}"


def make_inputs(shape: Shape, dtype: torch.dtype, device: str, seed: int = 0) -> Dict[str, torch.Tensor]:
    """The min step's tensors: frozen eps, G's output g (requires grad), target, all
    (B, C, H, W) in `dtype`, and weights (B, K) float32."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dims = (shape.batch, shape.channels, shape.size, shape.size)
    eps = torch.randn(dims, generator=gen).to(device=device, dtype=dtype)
    g = (0.1 * torch.randn(dims, generator=gen)).to(device=device, dtype=dtype).requires_grad_()
    target = torch.randn(dims, generator=gen).to(device=device, dtype=dtype)
    weights = torch.rand(shape.batch, shape.groups, generator=gen).to(device)
    return {"eps": eps, "g": g, "target": target, "weights": weights}


def provider_unavailable(provider: str, device: str) -> Optional[str]:
    """Why `provider` cannot be timed on `device`, or None."""
    if provider == "triton":
        if device != "cuda" and not (DRY["enabled"] and os.environ.get("TRITON_INTERPRET") == "1"):
            return "triton is timed on CUDA only (the CPU interpreter is a test vehicle)"
        from invdiff.kernels import unavailable_reason

        return unavailable_reason()
    return None


def _raise_recompile_limit() -> None:
    # Each (shape, dtype) is its own static graph, and the guided step's reference is compiled
    # for 2 schedulers x 3 batches x 2 dtypes: past Dynamo's default limit of 8 graphs per
    # function it would silently fall back to eager and the "torch.compile" column would lie.
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)


_COMPILE_CACHE: Dict = {}


def compiled(fn: Callable) -> Callable:
    """torch.compile(fn) with static shapes, once per function. In --dry mode the graph goes
    through Dynamo only (backend "eager"): the tracing path is exercised in seconds, not the
    minutes Inductor's C++ codegen takes on a CPU."""
    if fn not in _COMPILE_CACHE:
        _raise_recompile_limit()
        backend = "eager" if DRY["enabled"] else "inductor"
        _COMPILE_CACHE[fn] = torch.compile(fn, dynamic=False, backend=backend)
    return _COMPILE_CACHE[fn]


def op_for(provider: str, reference_fn: Callable, triton_fn: Callable) -> Callable:
    """The callable a provider times."""
    if provider == "reference-eager":
        return reference_fn
    if provider == "torch.compile":
        return compiled(reference_fn)
    if provider == "triton":
        return triton_fn
    raise ValueError(f"unknown provider {provider!r}; known: {PROVIDERS}")


def mode_runner(mode: str, forward: Callable[[], torch.Tensor], grad_inputs: List[torch.Tensor]) -> Callable[[], None]:
    """A no-argument callable doing one `mode` step. `forward` returns a tensor (a scalar loss or a
    full output); the backward of a non-scalar output is taken against a fixed random grad."""

    def clear():
        for t in grad_inputs:
            t.grad = None

    def backward_of(out, keep):
        if out.ndim == 0:
            out.backward(retain_graph=keep)
        else:
            out.backward(grad_out, retain_graph=keep)

    probe = forward()
    grad_out = torch.randn_like(probe) if probe.ndim else None
    if mode == "forward":  # with autograd recording, as in training
        def run():
            forward()
        return run
    if mode == "backward":
        kept = forward()

        def run():
            clear()
            backward_of(kept, True)
        return run
    if mode == "full":
        def run():
            clear()
            backward_of(forward(), False)
        return run
    raise ValueError(f"unknown mode {mode!r}; known: {MODES}")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], None], device: str) -> float:
    """Median milliseconds per call: triton.testing.do_bench (CUDA events, L2 flushed between
    calls) on CUDA, the wall-clock median elsewhere."""
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median"))
    return wall_ms(fn, device)


def graph_ms(fn: Callable[[], None], device: str) -> Optional[float]:
    """Median milliseconds per call replayed from a CUDA graph (triton's do_bench_cudagraph);
    None off CUDA. Raises if `fn` cannot be captured (a host sync, another stream)."""
    if device != "cuda":
        return None
    from triton.testing import do_bench_cudagraph

    return float(do_bench_cudagraph(fn, rep=GRAPH_REP_MS, return_mode="median"))


def wall_ms(fn: Callable[[], None], device: str) -> float:
    """Per-call wall time in ms of back-to-back calls, synchronised once per sample: the time a
    Python caller sees, with dispatch and launch overhead included (a median over samples)."""
    calls, samples, warmup = (1, 1, 0) if DRY["enabled"] else (20, 5, 3)
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3 / calls)
    return statistics.median(times)


def peak_memory_mb(fn: Callable[[], None], device: str) -> Optional[float]:
    """Peak CUDA memory of one call beyond what was allocated before it (None on the CPU)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


_COPY_MS: Dict[Tuple[str, int], float] = {}


def copy_ms(nbytes: int, device: str) -> float:
    """Time of a device-to-device copy whose traffic (bytes read + bytes written) is `nbytes`,
    timed like the kernels (time_ms): the practical ceiling for a memory-bound op that moves
    that many bytes. Size-matched, since at small sizes launch latency, not bandwidth, bounds a
    copy too; cached per size."""
    key = (device, int(nbytes))
    if key not in _COPY_MS:
        half = max(1, int(nbytes) // 2)
        src = torch.empty(half, dtype=torch.uint8, device=device).random_(0, 255)
        dst = torch.empty_like(src)
        _COPY_MS[key] = time_ms(lambda: dst.copy_(src), device)
    return _COPY_MS[key]


def measure(fn: Callable[[], None], design_bytes: int, min_bytes: int, device: str, graph: bool = True) -> Dict:
    """One row's measured columns (see the module doc): ms, graph_ms, wall_ms, gbs, pct_copy,
    pct_sol, peak_mb, with bytes and min_bytes. `graph=False` leaves graph_ms out with the reason
    in graph_note; a capture that fails is recorded in graph_note too, never raised."""
    row: Dict = {"bytes": int(design_bytes), "min_bytes": int(min_bytes)}
    fn()  # compile (torch.compile, a Triton JIT) outside every timed region, even the dry run's one call
    _sync(device)
    ms = time_ms(fn, device)
    row["ms"] = ms
    row["gbs"] = design_bytes / (ms * 1e-3) / 1e9
    row["pct_copy"] = 100.0 * copy_ms(design_bytes, device) / ms
    row["pct_sol"] = 100.0 * copy_ms(min_bytes, device) / ms
    row["wall_ms"] = wall_ms(fn, device)
    row["graph_ms"] = None
    if device != "cuda":
        row["graph_note"] = "no CUDA graphs off CUDA"
    elif not graph:
        row["graph_note"] = "not captured"
    else:
        try:
            row["graph_ms"] = graph_ms(fn, device)
        except Exception as err:  # one column lost, not the run: say why in the JSON
            row["graph_note"] = f"capture failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
            try:
                torch.cuda.synchronize()
            except Exception:
                pass
    row["peak_mb"] = peak_memory_mb(fn, device)
    return row


def format_table(rows: List[Dict], columns: List[Tuple[str, str]]) -> str:
    """A plain-text table; columns are (key, header) pairs, floats shown with 3 significant digits."""

    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    body = [[cell(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, (_, h) in enumerate(columns)]
    lines = ["  ".join(h.ljust(w) for (_, h), w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def with_microseconds(row: Dict) -> Dict:
    """The row with us / graph_us / wall_us and MB columns for printing (the JSON keeps ms)."""
    shown = dict(row)
    for ms_key, us_key in (("ms", "us"), ("graph_ms", "graph_us"), ("wall_ms", "wall_us")):
        if row.get(ms_key) is not None:
            shown[us_key] = row[ms_key] * 1e3
    for key in ("bytes", "min_bytes"):
        if row.get(key) is not None:
            shown[key.replace("bytes", "mb")] = row[key] / 1e6
    return shown


TABLE_COLUMNS = [
    ("op", "op"), ("shape", "shape"), ("dtype", "dtype"), ("mode", "mode"), ("provider", "provider"),
    ("us", "us"), ("graph_us", "graph us"), ("wall_us", "wall us"),
    ("mb", "MB moved"), ("min_mb", "min MB"), ("gbs", "GB/s"), ("pct_copy", "% copy"), ("pct_sol", "% SOL"),
    ("peak_mb", "peak MB"), ("vs_eager", "x eager"), ("vs_compile", "x compile"),
]


def add_ratios(rows: List[Dict], eager: str = "reference-eager", compile_: str = "torch.compile") -> None:
    """Speed-up of each row over the eager and torch.compile providers at the same
    op/shape/dtype/mode (kernel time `ms`), from the times measured side by side in this run."""
    key = lambda r: (r["op"], r["shape"], r["dtype"], r["mode"])  # noqa: E731
    by_key: Dict = {}
    for r in rows:
        by_key.setdefault(key(r), {})[r["provider"]] = r.get("ms")
    for r in rows:
        peers = by_key[key(r)]
        for provider, column in ((eager, "vs_eager"), (compile_, "vs_compile")):
            if r.get("ms") and peers.get(provider):
                r[column] = peers[provider] / r["ms"]


def stop_margin_s(longest_row_s: float) -> float:
    """How long before the time limit bench_main stops starting rows: room for one more row as
    slow as the slowest so far (a cold torch.compile or Triton JIT) and for the last write."""
    return max(5.0, 1.5 * longest_row_s)


def bench_main(description: str, run_grid: Callable, argv=None, ratios: Callable = None, defaults: Optional[Dict] = None) -> List[Dict]:
    """The command line the bench scripts share: parse the grid, run it, add the speed-up columns
    (`ratios`, default add_ratios), print the table (and the skipped providers with their
    reasons), and optionally write JSON for gpu_check.sh. `defaults` overrides argparse defaults
    (e.g. a script's own device choice). --dry: tiny CPU sizes, see DRY.

    The JSON is rewritten (atomically) after every row, with "complete": false until the grid
    ends: a step killed at its timeout keeps every row it measured, and the grid's first rows
    (gpu_check.sh passes B = 1024 first) are the ones kept. --stop-at T (Unix time; default: the
    GPU_CHECK_STEP_DEADLINE that gpu_check.sh sets) starts no row when fewer than stop_margin_s
    are left before T; the JSON then says "stopped_early" and how many rows were measured."""
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if cuda else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[16, 64, 1024] if cuda else [64])
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--size", type=int, default=64 if cuda else 32)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--providers", nargs="+", help="default: all of the script's providers")
    parser.add_argument("--dry", action="store_true",
                        help="exercise every code path at tiny CPU sizes (times nothing meaningful): gpu_check.sh's dry run")
    parser.add_argument("--json", help="also write the rows here, after every row")
    deadline = os.environ.get(STEP_DEADLINE_ENV)
    parser.add_argument("--stop-at", type=float, default=float(deadline) if deadline else None, metavar="UNIX_TIME",
                        help=f"start no row once fewer than stop_margin_s are left before this time (default: ${STEP_DEADLINE_ENV})")
    if defaults:
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    configure(args.dry)
    if args.dry:
        args.device = "cpu"
    shapes = [Shape(b, args.channels, args.size, args.groups) for b in args.batches]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    rows: List[Dict] = []
    result = {"device": device_name, "dry": args.dry, "graph_l2": GRAPH_L2, "complete": False, "rows": rows}
    grid = iter(run_grid(shapes, args.dtypes, args.modes, args.providers, args.device))
    longest = 0.0
    while True:
        left = None if args.stop_at is None else args.stop_at - time.time()
        if left is not None and left < stop_margin_s(longest):
            result["stopped_early"] = (f"{len(rows)} rows measured; the rest of the grid was not started, "
                                       f"{max(left, 0):.0f} s before the step's time limit")
            print(f"stopped early: {result['stopped_early']}", file=sys.stderr, flush=True)
            break
        row_start = time.time()  # the deadline's clock
        try:
            row = next(grid)
        except StopIteration:
            result["complete"] = True
            break
        longest = max(longest, time.time() - row_start)
        print(f"  {row}", file=sys.stderr, flush=True)
        rows.append(row)
        (ratios or add_ratios)(rows)  # idempotent: each write has the ratios of the rows so far
        write_json(args.json, result)
    (ratios or add_ratios)(rows)
    write_json(args.json, result)
    print(format_table([with_microseconds(r) for r in rows if "ms" in r], TABLE_COLUMNS))
    for r in rows:
        if "skipped" in r:
            print(f"skipped {r['op']} {r['provider']} {r['mode']} {r['dtype']}: {r['skipped']}")
        if r.get("graph_note", "").startswith("capture failed"):
            print(f"no graph time for {r['op']} {r['provider']} {r['mode']} {r['dtype']} {r['shape']}: {r['graph_note']}")
    return rows


def measured_row(row: Dict, provider: str, device: str, setup: Callable[[], Tuple[Callable, int, int]], graph: bool = True) -> Dict:
    """Fill `row` with the measurement of setup()'s (step, design bytes, minimum bytes), or with
    why the provider is skipped."""
    why = provider_unavailable(provider, device)
    if why:
        row["skipped"] = why
    else:
        run, design, minimum = setup()
        row.update(measure(run, design, minimum, device, graph=graph))
    return row


def write_json(path: Optional[str], result: Dict) -> None:
    """Write a benchmark's result where --json asked (nothing when it was not given), atomically:
    a reader, or a kill in the middle of a write, sees the previous complete file or this one."""
    if path:
        partial = f"{path}.partial"
        with open(partial, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(partial, path)


def memory_mark(device: str) -> tuple:
    """Where a provider's memory is counted from: (peak resident set in MB, CUDA bytes allocated),
    after freeing what earlier providers left on a GPU and resetting its peak counter."""
    import gc
    import resource

    gpu = 0
    if device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        gpu = torch.cuda.memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, gpu


def memory_peak_mb(device: str, mark: tuple) -> float:
    """MB above `mark` (memory_mark): on a GPU the peak CUDA allocation, on the CPU the peak
    resident set (a fresh process per provider makes it the provider's own)."""
    import resource

    if device == "cuda":
        return (torch.cuda.max_memory_allocated() - mark[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - mark[0]
