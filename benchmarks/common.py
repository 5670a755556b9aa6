"""Shared setup for the kernel benchmarks: input factories, providers, timing and byte accounting.

Used by bench_invariant_loss.py, bench_guidance_combine.py (the command-line scripts that print
tables) and test_bench_kernels.py (the pytest-benchmark suite of `make bench`), so all three time
the same inputs through the same providers.

Providers:
  reference-eager  invdiff.ops.reference in eager PyTorch (the oracle, about ten kernels);
  torch.compile    the same reference through torch.compile (Inductor fuses what it can);
  triton           the fused kernels of invdiff.kernels (CUDA only: the CPU interpreter is a
                   test vehicle, not a performance path, and is never timed).
Modes: forward, backward (the backward alone, from a kept graph) and full (forward + backward).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

PROVIDERS = ("reference-eager", "torch.compile", "triton")
MODES = ("forward", "backward", "full")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    """The min step's tensors: frozen eps, G's output g (requires grad), target, weights (B, K)."""
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
        if device != "cuda":
            return "triton is timed on CUDA only (the CPU interpreter is a test vehicle)"
        from invdiff.kernels import unavailable_reason

        return unavailable_reason()
    return None


def _compiled(fn: Callable, cache: Dict) -> Callable:
    if fn not in cache:
        cache[fn] = torch.compile(fn, dynamic=False)
    return cache[fn]


_COMPILE_CACHE: Dict = {}


def op_for(provider: str, reference_fn: Callable, triton_fn: Callable) -> Callable:
    """The callable a provider times."""
    if provider == "reference-eager":
        return reference_fn
    if provider == "torch.compile":
        return _compiled(reference_fn, _COMPILE_CACHE)
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


def time_ms(fn: Callable[[], None], device: str, warmup: int = 5, reps: int = 20) -> float:
    """Median milliseconds per call: triton.testing.do_bench (CUDA events, L2 flushed between
    calls) on CUDA, wall-clock median on the CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


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


_COPY_BANDWIDTH: Dict[str, float] = {}


def copy_bandwidth_gbs(device: str, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in GB/s, counting bytes read and written: the
    practical ceiling for a memory-bound kernel on this machine."""
    if device not in _COPY_BANDWIDTH:
        n = nbytes // 4 if device == "cuda" else (64 << 20) // 4
        src = torch.empty(n, dtype=torch.float32, device=device).normal_()
        dst = torch.empty_like(src)
        ms = time_ms(lambda: dst.copy_(src), device)
        _COPY_BANDWIDTH[device] = 2 * src.numel() * 4 / (ms * 1e-3) / 1e9
    return _COPY_BANDWIDTH[device]


def measure(fn: Callable[[], None], ideal_bytes: int, device: str) -> Dict[str, Optional[float]]:
    """ms, achieved GB/s on the ideal bytes, % of measured copy bandwidth, peak memory (MB)."""
    ms = time_ms(fn, device)
    gbs = ideal_bytes / (ms * 1e-3) / 1e9
    return {
        "ms": ms,
        "gbs": gbs,
        "pct_copy": 100.0 * gbs / copy_bandwidth_gbs(device),
        "peak_mb": peak_memory_mb(fn, device),
    }


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


TABLE_COLUMNS = [
    ("op", "op"), ("shape", "shape"), ("dtype", "dtype"), ("mode", "mode"), ("provider", "provider"),
    ("ms", "ms"), ("gbs", "GB/s"), ("pct_copy", "% copy BW"), ("peak_mb", "peak MB"),
    ("vs_eager", "x eager"), ("vs_compile", "x compile"),
]


def add_ratios(rows: List[Dict]) -> None:
    """Speed-up of each row over reference-eager and torch.compile at the same op/shape/dtype/mode,
    from the times measured side by side in this run."""
    key = lambda r: (r["op"], r["shape"], r["dtype"], r["mode"])  # noqa: E731
    by_key = {}
    for r in rows:
        by_key.setdefault(key(r), {})[r["provider"]] = r.get("ms")
    for r in rows:
        peers = by_key[key(r)]
        for provider, column in (("reference-eager", "vs_eager"), ("torch.compile", "vs_compile")):
            if r.get("ms") and peers.get(provider):
                r[column] = peers[provider] / r["ms"]


def bench_main(description: str, run_grid: Callable, argv=None, ratios: Callable = None) -> List[Dict]:
    """The command line the bench scripts share: parse the grid, run it, add the speed-up columns
    (`ratios`, default add_ratios), print the table (and the skipped providers with their
    reasons), and optionally write JSON for gpu_summary.py."""
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if cuda else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[64, 256] if cuda else [64])
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--size", type=int, default=64 if cuda else 32)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    shapes = [Shape(b, args.channels, args.size, args.groups) for b in args.batches]
    rows = []
    for row in run_grid(shapes, args.dtypes, args.modes, args.providers, args.device):
        print(f"  {row}", file=sys.stderr, flush=True)
        rows.append(row)
    (ratios or add_ratios)(rows)
    print(format_table([r for r in rows if "ms" in r], TABLE_COLUMNS))
    for r in rows:
        if "skipped" in r:
            print(f"skipped {r['op']} {r['provider']} {r['mode']} {r['dtype']}: {r['skipped']}")
    if args.json:
        with open(args.json, "w") as f:
            device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
            json.dump({"device": device, "rows": rows}, f, indent=1)
    return rows


def measured_row(row: Dict, provider: str, device: str, setup: Callable[[], Tuple[Callable, int]]) -> Dict:
    """Fill `row` with the measurement of setup()'s step, or with why the provider is skipped."""
    why = provider_unavailable(provider, device)
    if why:
        row["skipped"] = why
    else:
        run, ideal = setup()
        row.update(measure(run, ideal, device))
    return row


def write_json(path: Optional[str], result: Dict) -> None:
    """Write a benchmark's result where --json asked (nothing when it was not given)."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
