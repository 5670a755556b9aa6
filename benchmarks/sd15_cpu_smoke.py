"""Stable Diffusion 1.5 at its real size on the CPU: peak memory, time and disk of debias and sample.

    OMP_NUM_THREADS=2 python benchmarks/sd15_cpu_smoke.py --json sd15_smoke.json    # SD 1.5-sized
    OMP_NUM_THREADS=1 python benchmarks/sd15_cpu_smoke.py --tiny                    # check the script

What it measures, per configuration (frozen dtype fp32|bf16 x G_psi kind unet|lora):
  - wall time and peak RSS of `invdiff debias` and of `invdiff sample` on the run it wrote;
  - the run folder's size on disk, each top-level entry's size, and G_psi's folder (guidance/);
and for bf16 + unet with --latent-cache, debias at two dataset sizes N1 < N2, to show whether
the peak RSS grows with N by more than the latent cache does.

How: a folder with SD 1.5's architecture and random weights (benchmarks/bench_latent_cache.py's
sd_sized_folder: UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder; time and memory do not depend on
the weights) and a two-prompt imagefolder (tests/utils.py) at --resolution. The real CLI runs as
a subprocess per command at tiny step counts, so each measurement is one fresh process. Peak RSS
is the child's own ru_maxrss from os.wait4 (exact, no sampling; it counts resident pages of
memory-mapped files too, as RSS does). Sizes are sums of file sizes, symlinks not followed, so
a run folder that refers to its base is not charged for the base.

Read the results with two things in mind. The frozen passes batch up to a fixed size (the VAE 32
images, the per-sample losses 512 (sample, t) jobs), so below that fill point a larger N also means
larger batches: the JSON says when N1 is below it. And on a CPU without native bf16 (AVX2 only)
bf16 is emulated and far slower than fp32 (the JSON's machine.bf16_conv_slowdown; a warning is
printed), so the bf16 configs can take hours at SD size there. `invdiff sample` has no dtype flag:
it loads the frozen parts in fp32 whatever the run trained with.

Not part of `make test` or `make bench`: at SD size it writes about 4 GB (the base folder, plus a
run folder while one is measured) and takes several minutes on a CPU. --tiny uses the tests' tiny
SD folder instead, to check the script in seconds.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.bench_latent_cache import sd_sized_folder  # noqa: E402
from tests.utils import make_tiny_sd_folder, write_tiny_imagefolder  # noqa: E402

MB = 1e6
CONFIGS = ("fp32-unet", "fp32-lora", "bf16-unet", "bf16-lora", "scaling")
PROMPT = "a red square"  # one of write_tiny_imagefolder's two prompts
RUN_LIMIT_MB = {"unet": 200.0, "lora": 50.0}  # the targets for a run folder
# Peak RSS of identical runs differs by allocator timing; growth with N beyond the latent cache
# counts only above this share of RSS(N1).
RSS_TOLERANCE = 0.05


def tree_bytes(path: str) -> int:
    """Sum of the sizes of the files under `path` (lstat: a symlink counts as itself)."""
    if not os.path.lexists(path):
        return 0
    if not os.path.isdir(path) or os.path.islink(path):
        return os.lstat(path).st_size
    total = 0
    for root, _, files in os.walk(path):  # followlinks=False
        total += sum(os.lstat(os.path.join(root, f)).st_size for f in files)
    return total


def run_child(argv, log_path: str) -> dict:
    """Run `python -m invdiff.cli ARGV` to completion: wall seconds, the child's peak RSS, rc."""
    cmd = [sys.executable, "-m", "invdiff.cli", *argv]
    with open(log_path, "w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        # wait4 gives this child's own rusage; RUSAGE_CHILDREN would be the max over all children so far.
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    result = {"cmd": " ".join(cmd[1:]), "rc": proc.returncode, "wall_s": round(wall, 2), "peak_rss_mb": round(peak / MB, 1)}
    if proc.returncode != 0:
        with open(log_path) as f:
            result["log_tail"] = f.read()[-3000:]
    return result


def measure(name, dtype, kind, n, data, args, work, cache=None, sample=True) -> dict:
    out = os.path.join(work, f"run_{name}_n{n}")
    row = {"config": name, "frozen_dtype": dtype, "guidance": kind, "n_images": n, "latent_cache": bool(cache)}
    argv = ["debias", "--base", args.base, "--data", data, "--out", out, "--resolution", str(args.resolution),
            "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--loss-timesteps", str(args.loss_timesteps),
            "--loss-draws", "1", "--frozen-dtype", dtype, "--guidance", kind, "--overwrite"]
    if cache:
        # A cache left by an earlier run in --workdir would skip the VAE pass and lower the peak.
        shutil.rmtree(cache, ignore_errors=True)
        argv += ["--latent-cache", cache]
    row["debias"] = run_child(argv, out + ".debias.log")
    if row["debias"]["rc"] == 0:
        row["run_folder_mb"] = round(tree_bytes(out) / MB, 3)
        row["run_folder_parts_mb"] = {e: round(tree_bytes(os.path.join(out, e)) / MB, 3) for e in sorted(os.listdir(out))}
        row["g_folder_mb"] = round(tree_bytes(os.path.join(out, "guidance")) / MB, 3)
        if cache:
            row["latent_cache_mb"] = round(tree_bytes(cache) / MB, 3)
        if sample:
            samples = out + "_samples"
            row["sample"] = run_child(["sample", "--model", out, "--prompt", PROMPT, "--num", "1", "--steps", str(args.sample_steps),
                                       "--height", str(args.resolution), "--width", str(args.resolution), "--out", samples,
                                       "--overwrite"], out + ".sample.log")
            if not args.keep_runs:
                shutil.rmtree(samples, ignore_errors=True)
    if not args.keep_runs:  # at SD size one that copies its base (--copy-base) is ~4 GB
        shutil.rmtree(out, ignore_errors=True)
        if cache:
            shutil.rmtree(cache, ignore_errors=True)
    return row


def target(measured_mb, limit_mb) -> dict:
    return {"limit_mb": limit_mb, "measured_mb": measured_mb, "margin_mb": round(limit_mb - measured_mb, 3),
            "met": measured_mb < limit_mb}


def evaluate(rows, fill) -> dict:
    targets = {}
    ok = [r for r in rows if r["debias"]["rc"] == 0]
    for kind, limit in RUN_LIMIT_MB.items():
        sizes = [r["run_folder_mb"] for r in ok if r["guidance"] == kind and r["config"] != "scaling"]
        if sizes:
            targets[f"run_folder_{kind}_under_{limit:g}MB"] = target(max(sizes), limit)
    for kind in RUN_LIMIT_MB:
        rss = {r["frozen_dtype"]: r["debias"]["peak_rss_mb"] for r in ok if r["guidance"] == kind and r["config"] != "scaling"}
        if {"fp32", "bf16"} <= rss.keys():
            targets[f"debias_rss_bf16_over_fp32_{kind}"] = {"fp32_mb": rss["fp32"], "bf16_mb": rss["bf16"],
                                                           "ratio": round(rss["bf16"] / rss["fp32"], 3)}
    scaling = sorted((r for r in ok if r["config"] == "scaling"), key=lambda r: r["n_images"])
    if len(scaling) == 2:
        (a, b) = scaling
        diff = b["debias"]["peak_rss_mb"] - a["debias"]["peak_rss_mb"]
        cache_diff = b["latent_cache_mb"] - a["latent_cache_mb"]
        tolerance = RSS_TOLERANCE * a["debias"]["peak_rss_mb"]
        entry = {"n": [a["n_images"], b["n_images"]], "rss_mb": [a["debias"]["peak_rss_mb"], b["debias"]["peak_rss_mb"]],
                 "ratio": round(b["debias"]["peak_rss_mb"] / a["debias"]["peak_rss_mb"], 3), "diff_mb": round(diff, 1),
                 "latent_cache_diff_mb": round(cache_diff, 3), "excess_mb": round(diff - cache_diff, 1),
                 "tolerance_mb": round(tolerance, 1), "margin_mb": round(tolerance - (diff - cache_diff), 1),
                 "met": diff - cache_diff <= tolerance}
        # The frozen passes batch up to a fixed size: below it a larger N also means larger
        # batches (more activations at once), which is not the dataset being held in memory.
        if a["n_images"] < fill["fill_images"]:
            entry["note"] = (f"N1={a['n_images']} is below the {fill['fill_images']} images that fill the frozen passes' batches "
                             f"(VAE: {fill['vae_batch']} images; losses: {fill['loss_batch']} (sample, t) jobs at "
                             f"--loss-timesteps {fill['loss_timesteps']}): the difference includes larger batches")
        targets["debias_rss_flat_in_n"] = entry
    return targets


def batch_fill(loss_timesteps: int) -> dict:
    """The batch sizes debias's frozen passes use (read from the code, so they follow it)."""
    from invdiff.environments import collect_losses
    from invdiff.models.sd import latent_dataset

    vae = inspect.signature(latent_dataset).parameters["batch_size"].default
    loss = inspect.signature(collect_losses).parameters["batch_size"].default
    # One (sample, t) job per image and grid timestep (--loss-draws 1).
    return {"vae_batch": vae, "loss_batch": loss, "loss_timesteps": loss_timesteps,
            "fill_images": max(vae, -(-loss // loss_timesteps))}


def bf16_slowdown() -> float:
    """How many times slower a bf16 3x3 convolution runs than an fp32 one here. CPUs without native
    bf16 (AVX2 only) emulate it: on the project's 2-core AMD EPYC (AVX2, torch 2.13 CPU) a 320-channel
    conv at 32x32 was 130x slower and a 1024^2 matmul 85x slower in bf16, so the bf16 configs at SD size take hours, not minutes."""
    import torch

    conv, x = torch.nn.Conv2d(64, 64, 3, padding=1), torch.randn(1, 64, 32, 32)
    seconds = []
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            c, xx = conv.to(dtype), x.to(dtype)
            c(xx)  # warm-up
            start = time.perf_counter()
            for _ in range(3):
                c(xx)
            seconds.append(time.perf_counter() - start)
    return seconds[1] / seconds[0]


def table(rows) -> str:
    head = ["config", "N", "debias s", "debias RSS MB", "sample s", "sample RSS MB", "run MB", "G MB", "cache MB"]
    lines = [head]
    for r in rows:
        d, s = r["debias"], r.get("sample") or {}
        failed = "FAILED" if d["rc"] else None
        lines.append([r["config"] if r["config"] != "scaling" else f"scaling ({r['frozen_dtype']}-{r['guidance']})", str(r["n_images"]),
                      failed or f"{d['wall_s']:.1f}", failed or f"{d['peak_rss_mb']:.0f}",
                      ("FAILED" if s.get("rc") else f"{s['wall_s']:.1f}") if s else "-",
                      ("FAILED" if s.get("rc") else f"{s['peak_rss_mb']:.0f}") if s else "-",
                      f"{r['run_folder_mb']:.2f}" if "run_folder_mb" in r else "-",
                      f"{r['g_folder_mb']:.2f}" if "g_folder_mb" in r else "-",
                      f"{r['latent_cache_mb']:.2f}" if "latent_cache_mb" in r else "-"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    fmt = lambda line: " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))  # noqa: E731
    return "\n".join([fmt(lines[0]), "-+-".join("-" * w for w in widths), *map(fmt, lines[1:])])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--json", help="write every measurement here")
    parser.add_argument("--resolution", type=int, default=None, help="image size in pixels (None: 256, or 32 with --tiny)")
    parser.add_argument("--workdir", help="where the base, data and runs go (None: a temporary folder, removed at the end); "
                                          "a base folder already there is reused")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny SD folder instead of the SD 1.5-sized one")
    parser.add_argument("--sizes", default="8,32", help="N1,N2: dataset sizes (even) for the scaling config; N1 is also "
                                                        "the other configs' size")
    parser.add_argument("--steps", type=int, default=2, help="debias --steps (min-step steps)")
    parser.add_argument("--batch-size", type=int, default=2, help="debias --batch-size")
    parser.add_argument("--loss-timesteps", type=int, default=2, help="debias --loss-timesteps")
    parser.add_argument("--sample-steps", type=int, default=2, help="sample --steps")
    parser.add_argument("--scaling-dtype", default="bf16", choices=["fp32", "bf16"], help="frozen dtype of the scaling config")
    parser.add_argument("--keep-runs", action="store_true", help="keep the run, sample and latent-cache folders "
                                                                 "(removed once measured)")
    args = parser.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown --configs {sorted(unknown)}; choose from {list(CONFIGS)}")
    n1, n2 = (int(s) for s in args.sizes.split(","))
    if not (0 < n1 < n2) or n1 % 2 or n2 % 2:
        parser.error("--sizes needs even N1 < N2 (the imagefolder has two prompts)")
    args.resolution = args.resolution or (32 if args.tiny else 256)

    work = os.path.abspath(args.workdir) if args.workdir else tempfile.mkdtemp(prefix="sd15_smoke_")
    os.makedirs(work, exist_ok=True)
    say = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    result = {"machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                          "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
              "settings": {"base": "tiny" if args.tiny else "sd-1.5-sized", "resolution": args.resolution, "sizes": [n1, n2],
                           "steps": args.steps, "batch_size": args.batch_size, "loss_timesteps": args.loss_timesteps,
                           "sample_steps": args.sample_steps, "configs": configs}}
    slowdown = bf16_slowdown()
    result["machine"]["bf16_conv_slowdown"] = round(slowdown, 1)
    if slowdown > 4 and not args.tiny and any(c.startswith("bf16") or (c == "scaling" and args.scaling_dtype == "bf16") for c in configs):
        say(f"warning: a bf16 convolution runs {slowdown:.0f}x slower than fp32 on this CPU (no native bf16): the bf16 "
            "configs will take hours at SD size; --configs fp32-unet,fp32-lora,scaling --scaling-dtype fp32 skips them")
    try:
        args.base = os.path.join(work, "tiny_sd" if args.tiny else "sd15")
        if not os.path.isfile(os.path.join(args.base, "model_index.json")):
            say(f"building the {'tiny' if args.tiny else 'SD 1.5-sized'} base folder in {args.base}")
            start = time.perf_counter()
            shutil.rmtree(args.base, ignore_errors=True)  # a half-written one from an interrupted build
            (make_tiny_sd_folder if args.tiny else sd_sized_folder)(args.base)
            result["settings"]["base_build_s"] = round(time.perf_counter() - start, 1)
        result["settings"]["base_mb"] = round(tree_bytes(args.base) / MB, 1)
        data = {}
        for n in sorted({n1, n2} if "scaling" in configs else {n1}):
            data[n] = write_tiny_imagefolder(os.path.join(work, f"data_{args.resolution}px_n{n}"), size=args.resolution,
                                             per_prompt=n // 2)
        jobs = [(c, *c.split("-"), n1, None) for c in configs if c != "scaling"]
        if "scaling" in configs:
            jobs += [("scaling", args.scaling_dtype, "unet", n, os.path.join(work, f"latents_n{n}")) for n in (n1, n2)]
        rows = []
        for i, (name, dtype, kind, n, cache) in enumerate(jobs, 1):
            say(f"[{i}/{len(jobs)}] {name}: debias{'' if cache else ' + sample'}, frozen {dtype}, G {kind}, N={n}"
                f"{', latent cache' if cache else ''}")
            row = measure(name, dtype, kind, n, data[n], args, work, cache=cache, sample=cache is None)
            for step in ("debias", "sample"):
                if step in row:
                    rc = row[step]["rc"]
                    say(f"    {step}: " + (f"{row[step]['wall_s']:.1f} s, peak RSS {row[step]['peak_rss_mb']:.0f} MB" if rc == 0
                                           else f"FAILED (rc {rc}):\n{row[step]['log_tail']}"))
            rows.append(row)
        result["runs"] = rows
        result["targets"] = evaluate(rows, batch_fill(args.loss_timesteps))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\n{result['settings']['base']} base ({result['settings']['base_mb']:.0f} MB), {args.resolution}px, "
          f"OMP_NUM_THREADS={result['machine']['omp_num_threads']}")
    print(table(rows))
    if args.tiny and result["targets"]:
        print("  (tiny base: the limits below are the SD-size targets, shown to exercise the code)")
    for name, t in result["targets"].items():
        verdict = "" if "met" not in t else ("  MET" if t["met"] else "  NOT MET")
        print(f"  {name}: {json.dumps({k: v for k, v in t.items() if k != 'met'})}{verdict}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    failed = [r["config"] for r in rows if r["debias"]["rc"] or (r.get("sample") or {}).get("rc")]
    if failed:
        print(f"failed: {', '.join(failed)} (log tails above{' and in ' + args.json if args.json else ''})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
