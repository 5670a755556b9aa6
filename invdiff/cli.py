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
    p.add_argument("--resolution", type=int, default=None,
                   help="colored-digits: image size (default 16); imagefolder: resize the shorter side to it and crop a square")
    p.add_argument("--no-center-crop", action="store_true", help="imagefolder: crop at a fixed per-image position instead of the center")
    p.add_argument("--random-flip", action="store_true", help="imagefolder: flip training images horizontally at random")
    p.add_argument("--data-seed", type=int, default=0, help="colored-digits: split and colouring seed")


def _load_data(args, split: str = "train"):
    from .data import load_dataset

    return load_dataset(args.data, split, args.bias, args.num_colors, args.resolution, args.data_seed,
                        center_crop=not args.no_center_crop, random_flip=args.random_flip)


def _data_spec(args) -> Dict:
    if args.data == "colored-digits":
        return {"name": "colored-digits", "p": args.bias, "num_colors": args.num_colors, "resolution": args.resolution or 16, "seed": args.data_seed}
    spec = {"name": "imagefolder", "root": os.path.abspath(args.data)}
    if args.resolution is not None:
        spec.update(resolution=args.resolution, center_crop=not args.no_center_crop)
    if args.random_flip:
        spec["random_flip"] = True
    return spec


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
    from .distributed import barrier, init_from_env

    rank, _ = init_from_env()
    cfg = BaseTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    model = train_base(dataset, cfg)
    if rank == 0:  # DDP keeps the weights identical on every rank
        with staged_directory(args.out) as stage:
            model.save_pretrained(stage)
        print(f"saved base model to {args.out} (final loss {model.meta['final_loss']:.4f})")
    barrier()


# `invdiff debias` flags that set a DebiasConfig field: flag dest -> field. They default to
# "not given", so that a --recipe's values hold unless a flag overrides them.
DEBIAS_FLAGS = {
    "groups": "groups", "lam": "lam", "ratio": "ratio", "steps": "steps", "batch_size": "batch_size", "lr": "lr",
    "lam_warmup": "lam_warmup", "lam_mode": "lam_mode", "preset": "preset", "aggregation": "aggregation",
    "alpha": "alpha", "loss_timesteps": "loss_timesteps", "loss_draws": "loss_draws",
    "max_step_steps": "max_step_steps", "max_step": "max_step", "seed": "seed", "frozen_dtype": "frozen_dtype",
    "attention": "attention", "latent_cache": "latent_cache", "guidance": "guidance_kind", "lora_rank": "lora_rank",
    "grad_accum": "grad_accum", "t_band": "t_band", "ema_decay": "ema_decay", "jtt_upweight": "jtt_upweight",
    "importance_mix": "importance_mix", "head": "head",
}
DEBIAS_SWITCHES = {"pooled_groups": ("per_prompt_groups", False), "channels_last": ("channels_last", True),
                   "compile": ("compile_frozen", True), "grad_checkpointing": ("grad_checkpointing", True),
                   "no_bank": ("use_bank", False), "gate_to_band": ("gate_to_band", True)}


def debias_config_from_args(args):
    """The DebiasConfig of `invdiff debias`: the --recipe preset, then every flag given on top."""
    from .runs import recipe_config

    overrides = {field: getattr(args, dest) for dest, field in DEBIAS_FLAGS.items() if hasattr(args, dest)}
    overrides.update({field: value for dest, (field, value) in DEBIAS_SWITCHES.items() if getattr(args, dest, False)})
    return recipe_config(args.recipe, **overrides)


def cmd_debias(args) -> None:
    from .runs import debias

    cfg = debias_config_from_args(args)
    dataset = _load_data(args)
    cfg.validate(len(dataset))  # every flag checked before the base is loaded or a loss computed
    result = debias(args.base, dataset, args.out, cfg, _data_spec(args), overwrite=args.overwrite,
                    checkpoint_every=args.checkpoint_every, checkpoint_dir=args.checkpoint_dir,
                    keep_checkpoints=args.keep_checkpoints, resume=args.resume)
    if result["meta"].get("processes", 1) > 1 and int(os.environ.get("RANK", "0")) != 0:
        return
    d = result["meta"]["diagnostics"]
    print(f"saved run to {args.out}; inferred group sizes {[round(s, 1) for s in d.get('group_sizes', [])]}; "
          f"G acts for t >= {result['meta']['t_min']}")


def cmd_sample(args) -> None:
    from .io import staged_directory, atomic_write_json
    from .report import save_png, to_uint8
    from .runs import load_model
    from .sampling import GuidedDenoiser, prompts_to_ids, sample

    if args.num < 1:
        raise ValueError("--num must be >= 1")
    if args.prompts:
        if args.prompt:
            raise ValueError("give --prompt or --prompts FILE, not both")
        from .sample_job import run_sample_job

        summary = run_sample_job(
            args.model, args.prompts, args.out, num=args.num, seed=args.seed, steps=args.steps,
            guidance_scale=args.guidance_scale, scheduler=args.scheduler, strength=args.strength,
            batch_size=args.batch_size, attention=args.attention, resume=args.resume, overwrite=args.overwrite,
            eta_below=args.eta_below_band,
        )
        if "manifest" in summary:
            print(f"{summary['items']} images in {args.out} ({summary['resumed']} kept from before); manifest {summary['manifest']}")
        return
    if not args.prompt:
        raise ValueError("give --prompt TEXT (repeatable) or --prompts FILE")
    if args.resume:
        raise ValueError("--resume applies to --prompts jobs")
    from .models.sd import set_attention

    base, guidance = load_model(args.model)
    attention = set_attention(base.unet, args.attention)
    print(f"attention: {attention}")
    prompts = [p for p in args.prompt for _ in range(args.num)]
    ids = prompts_to_ids(base, prompts)
    seeds = [args.seed + i for i in range(len(prompts))]
    manifest_path = os.path.join(args.out, "manifest.json")
    settings = {"model": os.path.abspath(args.model), "steps": args.steps, "guidance_scale": args.guidance_scale,
                "scheduler": args.scheduler, "strength": args.strength, "seed": args.seed, "attention": args.attention,
                "eta_below_band": args.eta_below_band}
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        if not os.path.isfile(manifest_path):
            raise FileExistsError(f"{args.out!r} is not empty and holds no invdiff samples; choose another --out")
        with open(manifest_path) as f:
            if json.load(f).get("settings") != settings:
                raise FileExistsError(f"{args.out!r} holds samples made with other settings; choose another --out or pass --overwrite")
    images = sample(GuidedDenoiser(base, guidance, args.strength), ids, seeds, args.steps, args.guidance_scale, args.scheduler,
                    batch_size=args.batch_size, eta_below=args.eta_below_band)
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
    """Colored-digits samples: Bias, digit accuracy, Frechet distance in the classifier's feature
    space and precision/recall on those features. Any other samples: the quality metrics that
    the given weights allow (Bias needs an attribute classifier for their prompts, which only the
    colored-digits benchmark ships). FID and CLIP-T run only with local weights."""
    from .data import colored_digits, load_dataset
    from .io import atomic_write_json
    from .metrics import evaluate_samples, load_digit_classifier
    from .quality import quality_report

    images, prompts = load_samples(args.images)
    digit_prompts = [re.fullmatch(r"digit (\d)", p) for p in prompts]
    if all(digit_prompts):
        ids = torch.tensor([int(m.group(1)) for m in digit_prompts])
        classifier = load_digit_classifier()
        ref = colored_digits("eval", num_colors=args.num_colors, resolution=images.shape[-1]).images
        result = evaluate_samples(images, ids, 10, args.num_colors, classifier, ref, torch.arange(10) % args.num_colors)
        features_fn = classifier.features
    else:
        ref = load_dataset(args.reference, "train", resolution=images.shape[-1]).images if args.reference else None
        result = {"bias": None, "skipped": [
            "Bias skipped: it needs an attribute classifier for these prompts; the shipped one is for colored digits"]}
        features_fn = None
    if ref is None:
        result.setdefault("skipped", []).append("FID, precision/recall skipped: no real images (--reference DIR)")
        quality = quality_report(images, images, prompts, clip_model=args.clip_model)
        quality["skipped"] = [line for line in quality["skipped"] if not line.startswith(("FID", "precision"))]
    else:
        quality = quality_report(ref, images, prompts, features_fn=features_fn,
                                 inception_weights=args.inception_weights, clip_model=args.clip_model)
    result.setdefault("skipped", []).extend(quality.pop("skipped"))
    result.update({k: v for k, v in quality.items() if k not in ("num_real", "num_fake")})
    for line in result["skipped"]:
        print(line, file=sys.stderr)
    text = json.dumps({k: v for k, v in result.items() if k not in ("counts", "skipped")}, indent=2)
    print(text)
    if args.out:
        atomic_write_json(args.out, result)


def cmd_demo(args) -> None:
    from .demo import run_demo

    seeds = args.seeds if args.seeds is not None else ([0, 1, 2] if args.full else [0])
    run_demo(args.out, seeds=seeds, quick=args.quick, full=args.full, settings_keys=args.settings, rows=args.rows,
             cached_only=args.cached_only)


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

    from .environments import AGGREGATIONS, MAX_STEP_METHODS
    from .runs import RECIPES

    d = DebiasConfig()
    given = argparse.SUPPRESS  # a config flag left out keeps the recipe's value

    def opt(flag, help, **kw):
        field = DEBIAS_FLAGS[flag.lstrip("-").replace("-", "_")]
        p.add_argument(flag, default=given, help=f"{help} (default: {getattr(d, field)})", **kw)

    p.add_argument("--recipe", default="invdiff", choices=sorted(RECIPES),
                   help="preset: invdiff (default), official (the paper's recipe as published), jtt, groupdro; "
                        "flags given on top override it")
    opt("--groups", "number of environments K", type=int)
    opt("--lam", "variance-penalty weight lambda", type=float)
    opt("--ratio", "combine ratio r (<=1 interpolate, >1 residual)", type=float)
    opt("--steps", "min-step optimisation steps", type=int)
    opt("--batch-size", "min-step batch size", type=int)
    opt("--lr", "min-step learning rate", type=float)
    opt("--lam-warmup", "steps over which lambda ramps up from 0", type=int)
    opt("--lam-mode", "relative: lambda is divided by the batch's mean loss (scale-free)", choices=["absolute", "relative"])
    opt("--preset", "G_psi size preset: tiny, small, medium")
    opt("--guidance", "kind of G_psi: a narrow UNet from --preset, or LoRA adapters (peft) on the frozen UNet",
        choices=["unet", "lora"])
    opt("--lora-rank", "LoRA rank for --guidance lora", type=int)
    opt("--aggregation", "per-sample loss aggregation", choices=list(AGGREGATIONS))
    opt("--max-step", "environment inference: gap (widest gap above the median), mixture, official (projected Adam)",
        choices=list(MAX_STEP_METHODS))
    p.add_argument("--pooled-groups", action="store_true", help="infer K groups over all prompts instead of K per prompt")
    opt("--alpha", "weight of the official min-loss term in the max step", type=float)
    opt("--loss-timesteps", "max step: size of the t grid", type=int)
    opt("--loss-draws", "max step: noise draws per grid timestep", type=int)
    opt("--max-step-steps", "max step (official): Adam steps", type=int)
    opt("--t-band", "where the attribute is decided: auto (the high-spread band of t), off, or the band's first timestep; "
        "sampling turns stochastic below it")
    p.add_argument("--gate-to-band", action="store_true", help="G acts inside the --t-band only")
    opt("--ema-decay", "EMA of G's weights, in (0, 1); off when not given", type=float)
    opt("--jtt-upweight", "--recipe jtt: weight of the high-loss group", type=float)
    opt("--importance-mix", "share of uniform t draws in the min step, in (0, 1]; 1 = no importance sampling", type=float)
    opt("--head", "G_psi's recalibration head: affine, zero-sum (leaves grey pixels alone), none (UNet body only)",
        choices=["affine", "zero-sum", "none"])
    p.add_argument("--no-bank", action="store_true", help="min step: fresh (t, noise) every step instead of the frozen bank")
    opt("--seed", "seed", type=int)
    opt("--frozen-dtype", "dtype of the frozen UNet/VAE/text encoder (G_psi trains in fp32)", choices=["fp32", "bf16", "fp16"])
    opt("--attention", "attention backend of the frozen UNet: PyTorch SDPA or xformers (if installed)",
        choices=["sdpa", "xformers"])
    p.add_argument("--channels-last", action="store_true", help="run the frozen UNet in channels_last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the frozen UNet")
    p.add_argument("--grad-checkpointing", action="store_true", help="gradient checkpointing in G_psi's UNet")
    opt("--latent-cache", "Stable Diffusion bases: keep the VAE latents here (memory-mapped)")
    opt("--grad-accum", "min-step micro-batches per optimiser step (group statistics are per micro-batch)", type=int)
    p.add_argument("--checkpoint-every", type=int, default=0, help="min step: save an accelerate checkpoint every N steps")
    p.add_argument("--checkpoint-dir", default=None, help="where checkpoints go (default: OUT.checkpoints)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="how many of the newest checkpoints to keep")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint folder: continue an interrupted min step")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_debias)

    p = sub.add_parser("sample", help="sample PNGs from a base model or a run folder")
    p.add_argument("--model", required=True, help="base model folder, debias run folder, Stable Diffusion or InvDiffPipeline folder")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "xformers"], help="attention backend of the frozen UNet")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable); the images are written all at once")
    p.add_argument("--prompts", default=None,
                   help="a .txt or .jsonl prompts file: a sharded, resumable job with manifest.jsonl (see sample_job.py)")
    p.add_argument("--resume", action="store_true", help="--prompts jobs: keep the finished images, sample the rest")
    p.add_argument("--batch-size", type=int, default=64, help="engine slots (images sampled together)")
    p.add_argument("--num", type=int, default=8)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=25)
    # w = 1 (no CFG on top of G): on the shipped p=0.9 base, w = 2 already pushes the base past
    # its data's bias and lowers quality, and CFG amplifies the conditional branch's attribute
    # back (README "Guidance scale").
    p.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance scale w (1 = off)")
    p.add_argument("--scheduler", default="ddim", choices=["ddim", "ddpm", "euler", "dpm"])
    p.add_argument("--strength", type=float, default=1.0, help="G_psi strength s (0 = frozen model, 1 = as trained)")
    p.add_argument("--eta-below-band", type=float, default=None,
                   help="DDIM eta under the attribute band recorded in G (default 1: stochastic there; 0 = deterministic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("evaluate", help="Bias and quality of samples")
    p.add_argument("--images", required=True, help="a folder written by `invdiff sample`")
    p.add_argument("--num-colors", type=int, default=2)
    p.add_argument("--reference", default=None, help="an imagefolder of real images (FID, precision/recall) for non-digit samples")
    p.add_argument("--inception-weights", default=None, help="local FID Inception weights (torch-fidelity's .pth); else FID is skipped")
    p.add_argument("--clip-model", default=None, help="local CLIP folder (CLIPModel + CLIPProcessor) for CLIP-T; else skipped")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="debias the shipped p=0.9 base model and report")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: 0; 0 1 2 with --full)")
    p.add_argument("--quick", action="store_true", help="tiny settings, for smoke tests only")
    p.add_argument("--full", action="store_true",
                   help="the whole matrix: every setting (design and held out), every row, strengths 0.5/1/1.5, 3 seeds")
    p.add_argument("--settings", nargs="+", default=None, help="settings to run (default: the design setting; all with --full)")
    p.add_argument("--rows", nargs="+", default=None, help="rows to run (default: base erm oracle invdiff official; all with --full)")
    p.add_argument("--cached-only", action="store_true", help="report the cells already in OUT/cells, run nothing")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from .data.base import DataError
    from .io import CheckpointError
    from .models.conditioner import UnknownPromptError
    from .models.sd import AttentionBackendError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (DataError, CheckpointError, UnknownPromptError, FileExistsError, ValueError, AttentionBackendError) as exc:
        print(f"invdiff {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
