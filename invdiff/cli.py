"""`invdiff` command line: train-base, debias, sample, evaluate, demo.

Every command answers bad input with one line on stderr and exit code 2, and writes its outputs
atomically, so a failed or interrupted command leaves what was there before untouched.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Dict, List, Optional

import torch


def _add_data_args(p: argparse.ArgumentParser, default_bias: float = 0.9) -> None:
    p.add_argument("--data", default="colored-digits", help="'colored-digits' (embedded) or an imagefolder path")
    p.add_argument("--bias", type=float, default=default_bias, help="colored-digits: majority-colour share p in [1/A, 1]")
    p.add_argument("--num-colors", type=int, default=2, help="colored-digits: number of stroke colours A")
    p.add_argument("--resolution", type=int, default=16, help="colored-digits: image size")
    p.add_argument("--data-seed", type=int, default=0, help="colored-digits: split and colouring seed")


def _load_data(args, split: str = "train"):
    from .data import load_dataset

    return load_dataset(args.data, split, args.bias, args.num_colors, args.resolution, args.data_seed)


def _data_spec(args) -> Dict:
    if args.data == "colored-digits":
        return {"name": "colored-digits", "p": args.bias, "num_colors": args.num_colors, "resolution": args.resolution, "seed": args.data_seed}
    return {"name": "imagefolder", "root": os.path.abspath(args.data)}


def prompt_dirname(prompt: str) -> str:
    """A filesystem-safe folder name for a prompt ("digit 3" -> "digit_3")."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", prompt).strip("._")
    return name or "prompt"


def cmd_train_base(args) -> None:
    from .io import staged_directory
    from .training import BaseTrainConfig, train_base

    dataset = _load_data(args)
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        raise FileExistsError(f"{args.out!r} is not empty; choose another --out or pass --overwrite")
    cfg = BaseTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    model = train_base(dataset, cfg)
    with staged_directory(args.out) as stage:
        model.save_pretrained(stage)
    print(f"saved base model to {args.out} (final loss {model.meta['final_loss']:.4f})")


def cmd_debias(args) -> None:
    from .runs import DebiasConfig, debias

    dataset = _load_data(args)
    cfg = DebiasConfig(
        groups=args.groups, lam=args.lam, ratio=args.ratio, steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, lam_warmup=args.lam_warmup, lam_mode=args.lam_mode, preset=args.preset, aggregation=args.aggregation,
        alpha=args.alpha, loss_timesteps=args.loss_timesteps, loss_draws=args.loss_draws,
        max_step_steps=args.max_step_steps, max_step=args.max_step,
        per_prompt_groups=not args.pooled_groups, seed=args.seed,
    )
    result = debias(args.base, dataset, args.out, cfg, _data_spec(args), overwrite=args.overwrite)
    d = result["meta"]["diagnostics"]
    print(f"saved run to {args.out}; inferred group sizes {[round(s, 1) for s in d.get('group_sizes', [])]}")


def cmd_sample(args) -> None:
    from .io import staged_directory, atomic_write_json
    from .report import save_png, to_uint8
    from .runs import load_model
    from .sampling import GuidedDenoiser, prompts_to_ids, sample

    if args.num < 1:
        raise ValueError("--num must be >= 1")
    base, guidance = load_model(args.model)
    prompts = [p for p in args.prompt for _ in range(args.num)]
    ids = prompts_to_ids(base, prompts)
    seeds = [args.seed + i for i in range(len(prompts))]
    manifest_path = os.path.join(args.out, "manifest.json")
    settings = {"model": os.path.abspath(args.model), "steps": args.steps, "guidance_scale": args.guidance_scale,
                "scheduler": args.scheduler, "strength": args.strength, "seed": args.seed}
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        if not os.path.isfile(manifest_path):
            raise FileExistsError(f"{args.out!r} is not empty and holds no invdiff samples; choose another --out")
        with open(manifest_path) as f:
            if json.load(f).get("settings") != settings:
                raise FileExistsError(f"{args.out!r} holds samples made with other settings; choose another --out or pass --overwrite")
    images = sample(GuidedDenoiser(base, guidance, args.strength), ids, seeds, args.steps, args.guidance_scale, args.scheduler)
    pixels = to_uint8(images)
    entries = []
    counters: Dict[str, int] = {}
    with staged_directory(args.out) as stage:
        for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
            k = counters.get(prompt, 0)
            counters[prompt] = k + 1
            rel = os.path.join(prompt_dirname(prompt), f"{k:04d}.png")
            save_png(pixels[i], os.path.join(stage, rel))
            entries.append({"prompt": prompt, "seed": seed, "path": rel})
        atomic_write_json(os.path.join(stage, "manifest.json"), {"settings": settings, "images": entries})
    print(f"wrote {len(entries)} images to {args.out}")


def load_samples(directory: str):
    """Images and prompts from a `sample` output folder (its manifest.json)."""
    import numpy as np
    from PIL import Image

    from .io import read_json

    manifest = read_json(os.path.join(directory, "manifest.json"), "sample manifest")
    imgs, prompts = [], []
    for e in manifest["images"]:
        with Image.open(os.path.join(directory, e["path"])) as im:
            imgs.append(np.asarray(im.convert("RGB"), dtype=np.float32))
        prompts.append(e["prompt"])
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2) / 127.5 - 1.0
    return x, prompts


def cmd_evaluate(args) -> None:
    from .data import colored_digits
    from .io import atomic_write_json
    from .metrics import evaluate_samples, load_digit_classifier

    images, prompts = load_samples(args.images)
    digits = []
    for p in prompts:
        m = re.fullmatch(r"digit (\d)", p)
        if not m:
            raise ValueError(f"evaluate measures colored-digits samples (prompts 'digit 0'..'digit 9'); got {p!r}")
        digits.append(int(m.group(1)))
    ids = torch.tensor(digits)
    ref = colored_digits("eval", num_colors=args.num_colors, resolution=images.shape[-1]).images
    result = evaluate_samples(images, ids, 10, args.num_colors, load_digit_classifier(), ref, torch.arange(10) % args.num_colors)
    text = json.dumps({k: v for k, v in result.items() if k != "counts"}, indent=2)
    print(text)
    if args.out:
        atomic_write_json(args.out, result)


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(args.out, seeds=args.seeds, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="invdiff", description="InvDiff: debias a diffusion model without bias labels.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train-base", help="train a small (biased) base diffusion model")
    _add_data_args(p)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_train_base)

    p = sub.add_parser("debias", help="max step (environment inference) then min step (train G_psi)")
    p.add_argument("--base", required=True, help="base model folder")
    _add_data_args(p)
    p.add_argument("--out", required=True)
    from .runs import DebiasConfig

    d = DebiasConfig()
    p.add_argument("--groups", type=int, default=d.groups, help="number of environments K")
    p.add_argument("--lam", type=float, default=d.lam, help="variance-penalty weight lambda")
    p.add_argument("--ratio", type=float, default=d.ratio, help="combine ratio r (<=1 interpolate, >1 residual)")
    p.add_argument("--steps", type=int, default=d.steps, help="min-step optimisation steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--lam-warmup", type=int, default=d.lam_warmup, help="steps over which lambda ramps up from 0")
    p.add_argument("--lam-mode", default=d.lam_mode, choices=["absolute", "relative"],
                   help="relative: lambda is divided by the batch's mean loss (scale-free)")
    p.add_argument("--preset", default=d.preset, help="G_psi size preset: tiny, small, medium")
    p.add_argument("--aggregation", default=d.aggregation, help="per-sample loss aggregation: spread, zscore, mean, high-noise")
    p.add_argument("--max-step", default=d.max_step, choices=["mixture", "official"],
                   help="environment inference: Gaussian-mixture groups (default) or the official projected Adam")
    p.add_argument("--pooled-groups", action="store_true", help="infer K groups over all prompts instead of K per prompt")
    p.add_argument("--alpha", type=float, default=d.alpha, help="weight of the official min-loss term in the max step")
    p.add_argument("--loss-timesteps", type=int, default=d.loss_timesteps, help="max step: size of the t grid")
    p.add_argument("--loss-draws", type=int, default=d.loss_draws, help="max step: noise draws per grid timestep")
    p.add_argument("--max-step-steps", type=int, default=d.max_step_steps, help="max step: Adam steps")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_debias)

    p = sub.add_parser("sample", help="sample PNGs from a base model or a run folder")
    p.add_argument("--model", required=True, help="base model folder or debias run folder")
    p.add_argument("--prompt", action="append", required=True)
    p.add_argument("--num", type=int, default=8)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance-scale", type=float, default=2.0)
    p.add_argument("--scheduler", default="ddim", choices=["ddim", "ddpm", "euler", "dpm"])
    p.add_argument("--strength", type=float, default=1.0, help="G_psi strength s (0 = frozen model, 1 = as trained)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("evaluate", help="Bias and quality of colored-digits samples")
    p.add_argument("--images", required=True, help="a folder written by `invdiff sample`")
    p.add_argument("--num-colors", type=int, default=2)
    p.add_argument("--out", default=None, help="write the result as JSON here")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="debias the shipped p=0.9 base model and report")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--quick", action="store_true", help="tiny settings, for smoke tests only")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from .data.base import DataError
    from .io import CheckpointError
    from .models.conditioner import UnknownPromptError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (DataError, CheckpointError, UnknownPromptError, FileExistsError, ValueError) as exc:
        print(f"invdiff {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
