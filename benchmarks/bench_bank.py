"""Min-step step time with the frozen-prediction bank fp32 in RAM against fp16 memory-mapped on disk.

    python benchmarks/bench_bank.py --json bank.json            # the tiny SD folder, CPU
    python benchmarks/bench_bank.py --latent-size 64 --images 256 --json bank.json   # SD-sized latents (a GPU)

Both providers train the same G_psi with the real min step (invdiff.training.train_guidance) on the
same latents, groups and draws; only the bank differs:
  ram   collect_losses(..., return_bank=True): fp32 tensors in RAM (the embedded base's bank);
  disk  collect_losses(..., bank_dir=DIR): fp16 files, memory-mapped (a latent base's bank since
        issue 13), so each step gathers its rows from the page cache and upcasts them.
A step's time is the time between two consecutive optimiser steps (a step hook on the min step's
AdamW), so it covers everything one step does; the median is over the steps after --warmup, with
the providers run alternately --repeats times. The bank gather alone (one batch's noise and
prediction rows, upcast to fp32) is timed too: it is the only work that differs.
The tiny SD folder has random weights: step time does not depend on the weights.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import write_json  # noqa: E402
from invdiff import training  # noqa: E402
from invdiff.data import load_dataset  # noqa: E402
from invdiff.environments import collect_losses  # noqa: E402
from invdiff.models.guidance import GuidanceModule  # noqa: E402
from invdiff.models.sd import LatentDiffusionBase, latent_dataset  # noqa: E402
from invdiff.config import DebiasConfig  # noqa: E402
from invdiff.environments import weights_from_losses  # noqa: E402
from tests.utils import make_tiny_sd_folder, write_tiny_imagefolder  # noqa: E402

PROVIDERS = ("ram", "disk")


def step_times(base, latent, weights, bank, steps: int, batch: int) -> list:
    """Seconds between consecutive optimiser steps of one train_guidance run of `steps` steps."""
    stamps = []
    make_adamw = training.adamw

    def timed_adamw(params, lr):
        opt = make_adamw(params, lr)
        opt.register_step_post_hook(lambda *args: stamps.append(time.perf_counter()))
        return opt

    torch.manual_seed(0)  # the same G for both providers
    guidance = GuidanceModule.from_frozen(base.unet.config, preset="small")
    training.adamw = timed_adamw
    try:
        config = training.MinStepConfig(steps=steps, batch_size=batch, lr=1e-3, lam_mode="absolute")
        training.train_guidance(base, guidance, latent, weights, config, progress=False, bank=bank)
    finally:
        training.adamw = make_adamw
    return [b - a for a, b in zip(stamps, stamps[1:])]


def gather_ms(bank, batch: int, reps: int = 200) -> float:
    """Median ms to draw one batch's (sample, draw) rows of noise and prediction, upcast to fp32."""
    gen = torch.Generator().manual_seed(0)
    n = bank.pred.shape[0]
    times = []
    for _ in range(reps):
        idx, pick = torch.randint(0, n, (batch,), generator=gen), torch.randint(0, bank.draws, (batch,), generator=gen)
        start = time.perf_counter()
        bank.noise[idx, pick].float(), bank.pred[idx, pick].float()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent-size", type=int, default=8, help="latent side (8: the tests' tiny SD folder; 64: SD 1.5 at 512)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--loss-timesteps", type=int, default=20, help="T: the bank holds T x draws rows per image")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run, after the warm-up")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="runs per provider, alternating")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_tiny_sd_folder(os.path.join(tmp, "sd"), latent_size=args.latent_size)
        base = LatentDiffusionBase.from_pretrained(folder, device=device).freeze()
        data = load_dataset(write_tiny_imagefolder(os.path.join(tmp, "data"), size=2 * args.latent_size,
                                                   per_prompt=args.images // 2))
        base.conditioner.add_prompts(data.prompts)
        latent = latent_dataset(base, data, progress=False)
        banks, build_s = {}, {}
        for provider in PROVIDERS:
            start = time.perf_counter()
            losses, _, banks[provider] = collect_losses(base, latent, args.loss_timesteps, 1, progress=False, return_bank=True,
                                                        bank_dir=os.path.join(tmp, "bank") if provider == "disk" else None)
            build_s[provider] = time.perf_counter() - start
        weights, _ = weights_from_losses(losses, latent.prompt_ids, DebiasConfig())
        times = {p: [] for p in PROVIDERS}
        for _ in range(args.repeats):
            for provider in PROVIDERS:
                times[provider] += step_times(base, latent, weights, banks[provider], args.warmup + args.steps, args.batch)[args.warmup:]
                print(f"  {provider}: {1e3 * statistics.median(times[provider]):.2f} ms/step so far", file=sys.stderr, flush=True)
        result = {
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "threads": torch.get_num_threads(),
            "config": {"latent": [4, args.latent_size, args.latent_size], "images": len(latent), "draws_per_image": banks["ram"].draws,
                       "batch": args.batch, "timed_steps_per_provider": args.steps * args.repeats, "warmup": args.warmup},
            "bank_bytes": {p: 2 * banks[p].pred.numel() * banks[p].pred.element_size() for p in PROVIDERS},
            "bank_build_s": build_s,
            "step_ms": {p: 1e3 * statistics.median(times[p]) for p in PROVIDERS},
            "gather_ms": {p: gather_ms(banks[p], args.batch) for p in PROVIDERS},
        }
        del banks  # the disk bank's folder goes with it, before the temporary folder is removed
    result["step_ratio_disk_over_ram"] = result["step_ms"]["disk"] / result["step_ms"]["ram"]
    result["gather_ratio_disk_over_ram"] = result["gather_ms"]["disk"] / result["gather_ms"]["ram"]
    print(f"min step, latents 4x{args.latent_size}x{args.latent_size}, {len(latent)} images x {result['config']['draws_per_image']} draws, "
          f"batch {args.batch}, {result['device']}: fp32 bank in RAM {result['step_ms']['ram']:.2f} ms/step, fp16 bank on disk "
          f"{result['step_ms']['disk']:.2f} ms/step ({result['step_ratio_disk_over_ram']:.3f}x); gather alone "
          f"{result['gather_ms']['ram']:.3f} vs {result['gather_ms']['disk']:.3f} ms ({result['gather_ratio_disk_over_ram']:.2f}x); "
          f"bank {result['bank_bytes']['ram'] / 2**20:.2f} MiB in RAM vs {result['bank_bytes']['disk'] / 2**20:.2f} MiB on disk")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
