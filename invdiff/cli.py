"""`invdiff` command line: train-base, debias, inspect, sample, evaluate, demo.

Every command answers bad input with one line on stderr and exit code 2, checked before any
compute, and writes its outputs atomically, so a failed or interrupted command leaves what was
there before untouched. Ctrl-C exits with one line and code 130, SIGTERM likewise with 143.
Output folders follow invdiff/outputs.py: only invdiff's own are replaced, one writer at a time.

Nothing heavy is imported at module level: `invdiff --help` and argument errors must answer in
well under a second, and torch plus diffusers take ~10 s to import on a small CPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import sys
import threading
from typing import Dict, List, Optional

from .config import (ATTENTION_BACKENDS, DEFAULT_GUIDANCE_EVERY, FROZEN_DTYPES, GUIDANCE_KINDS, LAM_MODES, SCHEDULER_NAMES,
                     SEED_LIMIT)
from .limits import MAX_BATCH_SIZE, MAX_IMAGE_SIDE, MAX_IMAGES_PER_PROMPT, check_fits_in_memory
from .outputs import check_output_file, check_output_folder, check_writable, output_lock

class _Parser(argparse.ArgumentParser):
    """argparse with every flag's default in --help, and usage errors as one line (exit 2)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


class _DescribedDefaultsFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Flags with their defaults, and a description printed as written (its lists and columns)."""


def _serve_description() -> str:
    from .serve.settings import MAX_BODY_BYTES  # torch-free, as this whole module

    return SERVE_DESCRIPTION.replace("{max_body}", f"{MAX_BODY_BYTES // 1024} KiB")


SERVE_DESCRIPTION = """\
Serve a model over HTTP: one sampling engine with continuous batching (docs/serving.md).

model folders (--model): any folder `invdiff sample` takes: an invdiff base model, a debias run
  folder, a Stable Diffusion folder or an InvDiffPipeline folder; checked before the model loads.

endpoints:
  POST /v1/images  JSON {"prompt", "num", "seed", "steps", "guidance_scale", "strength",
                   "scheduler", "response_format": "b64_json" | "png"}; image i uses seed + i
  GET  /healthz    200 alive; 503 once a dead engine could not be restarted
  GET  /readyz     200 once the model is loaded and warm; 503 while loading, restarting, draining
  GET  /metrics    Prometheus text

statuses (the body is JSON, {"detail": "..."}):
  413  the body is over {max_body} (refused before it is read)
  415  the body is not Content-Type: application/json
  422  input to fix: one phrase per bad field (a wrong type, out of range, an unknown prompt,
       JSON that does not parse, named by its field or its line and column)
  429  the queue is full (--max-queue images waiting): retry after Retry-After seconds
  500  sampling failed in the engine, named; the other requests go on
  503  the model is loading, the engine is restarting (Retry-After), or the server is draining
       (Retry-After)

SIGTERM (or Ctrl-C): stop taking connections, /readyz 503, finish in-flight requests for at most
  --drain-seconds; a request still running then gets a 503 with Retry-After, and the process
  exits (by the signal) at once. With --ray, Ray Serve drains the replicas for at
  most --drain-seconds (a request still running then gets the same JSON 503), and exits 0.
A port in use or a folder that is no model folder is one line and exit 2 at once, before the
model loads."""


def finite_float(text: str) -> float:
    """argparse type: a float that is neither NaN nor infinite (NaN would train all-NaN weights)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def int_at_least(minimum: int):
    """argparse type: an integer >= minimum (a count of steps or images, a checkpoint interval)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int >= {minimum}"  # argparse names the type in its messages
    return parse


def int_in_range(minimum: int, maximum: int, why: str = ""):
    """argparse type: an integer in [minimum, maximum]; `why` names where the cap comes from."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"must be in [{minimum}, {maximum}]{why}, got {value}")
        return value

    parse.__name__ = f"int in [{minimum}, {maximum}]"
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)
# Sizes have documented caps (invdiff/limits.py), checked here before anything is loaded.
batch_size_int = int_in_range(1, MAX_BATCH_SIZE, " (invdiff/limits.py)")
image_side_int = int_in_range(1, MAX_IMAGE_SIDE, " pixels (invdiff/limits.py)")
images_per_prompt_int = int_in_range(1, MAX_IMAGES_PER_PROMPT, " (invdiff/limits.py; a --prompts job takes more)")
# torch.Generator.manual_seed takes [0, 2**64); a negative seed would wrap onto a positive one.
seed_int = int_in_range(0, SEED_LIMIT - 1, " (2**64 - 1)")
data_seed_int = int_in_range(0, 2**63 - 1, " (2**63 - 1)")  # colored digits offsets it


def check_model_path(path: str, flag: str) -> None:
    """A model folder that does not exist is named as such (not 'not a model folder'), at once:
    a hub id is taken only with --allow-download (invdiff/hub.py)."""
    from .hub import check_model_source

    check_model_source(path, flag)


def _add_data_args(p: argparse.ArgumentParser, default_bias: float = 0.9) -> None:
    p.add_argument("--data", default="colored-digits", help="'colored-digits' (embedded) or an imagefolder path")
    p.add_argument("--bias", type=finite_float, default=default_bias, help="colored-digits: majority-colour share p in [1/A, 1]")
    p.add_argument("--num-colors", type=positive_int, default=2, help="colored-digits: number of stroke colours A")
    p.add_argument("--resolution", type=image_side_int, default=None,
                   help="colored-digits: image size (None: 16); imagefolder: resize the shorter side to it and crop a square "
                        "(None: the images' own size)")
    p.add_argument("--no-center-crop", action="store_true", help="imagefolder: crop at a fixed per-image position instead of the center")
    p.add_argument("--random-flip", action="store_true", help="imagefolder: flip training images horizontally at random")
    p.add_argument("--data-seed", type=data_seed_int, default=0, help="colored-digits: split and colouring seed")


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


def cmd_train_base(args) -> None:
    check_output_folder(args.out, "base", args.overwrite)
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        raise FileExistsError(f"{args.out!r} holds a base model; choose another --out or pass --overwrite to replace it")
    with output_lock(args.out):
        _train_base(args)


def _train_base(args) -> None:
    from .io import staged_directory
    from .training import BaseTrainConfig, train_base

    dataset = _load_data(args)
    from .distributed import barrier, init_from_env

    rank, _ = init_from_env()
    cfg = BaseTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    model = train_base(dataset, cfg)
    if rank == 0:  # DDP keeps the weights identical on every rank
        with staged_directory(args.out, kind="base") as stage:
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
    "alternations": "alternations",
    "attention": "attention", "latent_cache": "latent_cache", "guidance": "guidance_kind", "lora_rank": "lora_rank",
    "grad_accum": "grad_accum", "t_band": "t_band", "ema_decay": "ema_decay", "jtt_upweight": "jtt_upweight",
    "importance_mix": "importance_mix", "head": "head",
}
DEBIAS_SWITCHES = {"pooled_groups": ("per_prompt_groups", False), "channels_last": ("channels_last", True),
                   "compile": ("compile_frozen", True), "grad_checkpointing": ("grad_checkpointing", True),
                   "no_bank": ("use_bank", False), "gate_to_band": ("gate_to_band", True),
                   "no_calibrate": ("calibrate", False)}


def debias_config_from_args(args):
    """The DebiasConfig of `invdiff debias`: the --recipe preset, then every flag given on top."""
    from .config import recipe_config

    overrides = {field: getattr(args, dest) for dest, field in DEBIAS_FLAGS.items() if hasattr(args, dest)}
    overrides.update({field: value for dest, (field, value) in DEBIAS_SWITCHES.items() if getattr(args, dest, False)})
    return recipe_config(args.recipe, **overrides)


def cmd_debias(args) -> None:
    check_model_path(args.base, "--base")
    check_output_folder(args.out, "run", args.overwrite)
    if args.checkpoint_dir:
        check_writable(args.checkpoint_dir, "--checkpoint-dir", folder=True)
        if os.path.isdir(args.checkpoint_dir) and os.listdir(args.checkpoint_dir) and not os.path.isfile(
                os.path.join(args.checkpoint_dir, "run.json")):
            # Checkpoint rotation removes old checkpoints there: never in a folder of the user's.
            raise FileExistsError(f"--checkpoint-dir {args.checkpoint_dir!r} is not empty and holds no invdiff "
                                  "checkpoints; choose another folder")
    with output_lock(args.out):
        _debias(args)


def _debias(args) -> None:
    from .debiasing import debias

    cfg = debias_config_from_args(args)
    dataset = _load_data(args)
    cfg.validate(len(dataset))  # every flag checked before the base is loaded or a loss computed
    result = debias(args.base, dataset, args.out, cfg, _data_spec(args), overwrite=args.overwrite, copy_base=args.copy_base,
                    checkpoint_every=args.checkpoint_every, checkpoint_dir=args.checkpoint_dir,
                    keep_checkpoints=args.keep_checkpoints, resume=args.resume)
    if result["meta"].get("processes", 1) > 1 and int(os.environ.get("RANK", "0")) != 0:
        return
    sizes = result["meta"]["diagnostics"].get("group_sizes", [])
    print(f"saved run to {args.out}; G acts for t >= {result['meta']['t_min']}")
    if sizes:
        print(describe_group_sizes(sizes, cfg.groups, [dataset.prompts[p] for p in sorted(set(dataset.prompt_ids.tolist()))]))
    if "calibration" in result["meta"]:
        print(describe_calibration(result["meta"]["calibration"]))
    if os.path.isfile(os.path.join(args.out, "inspect", "report.json")):
        print(f"the groups in pictures: {os.path.join(args.out, 'inspect', 'report.md')}")
    for warning in result["meta"]["diagnostics"].get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)


INSPECT_RUN_FILES = {  # what `inspect --run` reads, and who writes it
    "invdiff_run.json": "it is not a debias run folder",
    "losses.safetensors": "every `invdiff debias` writes the frozen model's losses there (invdiff 0.1.0 on, no flag "
                          "needed): rerun debias, or run the max step alone with --base BASE --data DATA",
    "environments.safetensors": "every `invdiff debias` writes its groups there (invdiff 0.1.0 on): rerun debias, or "
                                "run the max step alone with --base BASE --data DATA",
}


def cmd_inspect(args) -> None:
    """The run folder's files, the flags and the output folder are checked first, torch-free;
    the data and --prompts once the data is loaded, before the base loads or a loss is computed."""
    if args.run is not None:
        if not os.path.isdir(args.run):
            raise FileNotFoundError(f"--run {args.run!r} does not exist")
        for name, why in INSPECT_RUN_FILES.items():
            if not os.path.isfile(os.path.join(args.run, name)):
                raise FileNotFoundError(f"--run {args.run!r} has no {name}: {why}")
        given = [f"--{dest.replace('_', '-')}" for dest in DEBIAS_FLAGS if hasattr(args, dest)]
        given += [f"--{dest.replace('_', '-')}" for dest in DEBIAS_SWITCHES if getattr(args, dest, False)]
        if args.recipe != "invdiff" or given:
            raise ValueError(f"{(given or ['--recipe'])[0]} applies to --base: with --run the run's own max step is read")
        from .model_folders import RUN_META, read_json_object

        if read_json_object(os.path.join(args.run, RUN_META), "run metadata").get("given_weights"):
            raise ValueError(f"--run {args.run!r} was given its groups (debias(weights=...): the oracle or ERM row), "
                             "so it has no inferred groups to inspect")
    else:
        check_model_path(args.base, "--base")
    check_output_folder(args.out, "inspect")
    with output_lock(args.out):
        _inspect(args)


def _inspect(args) -> None:
    from .inspection import choose_prompts, inspect_base, inspect_run
    from .io import staged_directory

    data_args = argparse.Namespace(**{**vars(args), "data": args.data or "colored-digits"})
    dataset = None if args.data is None and args.run is not None else _load_data(data_args)
    if args.run is not None:
        with staged_directory(args.out, kind="inspect") as stage:
            report = inspect_run(args.run, stage, dataset, args.prompts)
    else:
        from .debiasing import _data_for_base
        from .model_folders.load import load_base

        cfg = debias_config_from_args(args)
        cfg.validate(len(dataset))
        present = sorted(set(dataset.prompt_ids.tolist()))
        choose_prompts(dataset.prompts, present, args.prompts)  # an unknown prompt is one line, before the base loads
        base = load_base(args.base, cfg).freeze()
        data = _data_for_base(base, dataset, cfg, {}, progress=True)
        source = {"base": os.path.abspath(args.base), "data": _data_spec(data_args)}
        with staged_directory(args.out, kind="inspect") as stage:
            report = inspect_base(base, data, dataset, cfg, stage, source, args.prompts)
    print(f"wrote {os.path.join(args.out, 'report.md')} ({len(report['prompts'])} prompts)")
    for row in report["prompts"]:
        for warning in row["warnings"]:
            print(f"warning: {row['prompt']}: {warning}", file=sys.stderr)


def describe_calibration(record: Dict) -> str:
    """One line: the gains the calibration chose ("digit 0: 1.42; ...") or its pooled gain."""
    if record.get("prompts"):
        gains = "; ".join(f"{name}: {entry['gain']:.2f}" for name, entry in record["prompts"].items())
        return f"calibrated push (strength 1 = these gains on G, target {record['target']:.2f} of samples reading high): {gains}"
    if record["mode"] == "untrusted":
        return f"push not calibrated (the high-loss group stands {record['separation']:.1f} robust sd out): G pushes as trained"
    pooled = record["pooled"]
    return (f"calibrated push: one gain {pooled['gain']:.2f} for every prompt (from {pooled['prompts_sampled']} prompts), "
            f"target {record['target']:.2f}")


def describe_group_sizes(sizes: List[float], groups: int, prompts: List[str]) -> str:
    """The inferred (soft) group sizes, labelled: K per prompt ("digit 0: 161 | 19"), or K pooled."""
    def row(part):
        return " | ".join(f"{s:.0f}" for s in part)

    if len(sizes) == groups * len(prompts) and len(prompts) > 1:
        per_prompt = [f"{prompt}: {row(sizes[i * groups:(i + 1) * groups])}" for i, prompt in enumerate(prompts)]
        return f"inferred group sizes per prompt (K={groups}): " + "; ".join(per_prompt)
    return f"inferred group sizes (K={groups}, pooled over prompts): {row(sizes)}"


def cmd_sample(args) -> None:
    """Everything that needs no model is checked first, before torch is imported: the paths, the
    output folder, the prompts file and the sizes (a refusal answers in well under a second)."""
    check_model_path(args.model, "--model")
    if args.base is not None:
        check_model_path(args.base, "--base")
    if args.eta_below_band is not None and not 0.0 <= args.eta_below_band <= 1.0:
        raise ValueError(f"--eta-below-band must be in [0, 1], got {args.eta_below_band}")
    if args.guidance_scale < 0:
        raise ValueError(f"--guidance-scale must be >= 0, got {args.guidance_scale}")
    from .model_folders import sampling_size

    if args.prompts:
        if args.prompt:
            raise ValueError("give --prompt or --prompts FILE, not both")
        from .sampling.job import read_prompts

        check_output_folder(args.out, "sample-job", args.overwrite)
        read_prompts(args.prompts, args.num, args.seed, args.guidance_scale)  # every line checked, FILE:LINE
        sampling_size(args.model, args.height, args.width)
        with output_lock(args.out):
            _sample_job(args)
        return
    if not args.prompt:
        raise ValueError("give --prompt TEXT (repeatable) or --prompts FILE")
    if args.resume:
        raise ValueError("--resume applies to --prompts jobs")
    total = len(args.prompt) * args.num
    if args.seed + total > SEED_LIMIT:
        raise ValueError(f"--seed {args.seed}: image i uses seed + i, and seeds up to {args.seed + total - 1} pass "
                         f"torch's limit 2**64 - 1; start from a smaller --seed")
    check_output_folder(args.out, "samples", args.overwrite)
    # From the model's config files alone: a size the VAE cannot decode is refused before any load.
    height, width = sampling_size(args.model, args.height, args.width)
    # Every image is held until all are written: float32 from the sampler, uint8 for the PNGs.
    # (No size: not a model folder, which loading names in one line.)
    if height and width:
        check_fits_in_memory(total * 3 * height * width * 5, f"{total} images of {height}x{width}",
                             "lower --num, or use a --prompts job, which writes each image as it is done")
    manifest_path = os.path.join(args.out, "manifest.json")
    settings = {"model": os.path.abspath(args.model), "steps": args.steps, "guidance_scale": args.guidance_scale,
                "scheduler": args.scheduler, "strength": args.strength, "seed": args.seed, "attention": args.attention,
                "eta_below_band": args.eta_below_band, "height": height, "width": width}
    if args.guidance_every != 1:  # only when G is reused: sample folders made before the flag keep their settings
        settings["guidance_every"] = args.guidance_every
    if args.base is not None:  # only when given: sample folders made before --base existed keep their settings
        settings["base"] = os.path.abspath(args.base)
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        from .config import describe_changes
        from .io import read_json

        if not os.path.isfile(manifest_path):
            raise FileExistsError(f"{args.out!r} is not empty and holds no invdiff samples; choose another --out")
        old = read_json(manifest_path, "sample manifest")
        old_settings = old.get("settings") if isinstance(old, dict) else None
        if old_settings != settings:
            raise FileExistsError(f"{args.out!r} holds samples made with other settings "
                                  f"({describe_changes(old_settings or {}, settings)}); "
                                  "choose another --out or pass --overwrite")
    with output_lock(args.out):
        _sample(args, settings, height, width)


def _sample_job(args) -> None:
    from .sampling.job import run_sample_job

    summary = run_sample_job(
        args.model, args.prompts, args.out, num=args.num, seed=args.seed, steps=args.steps,
        guidance_scale=args.guidance_scale, scheduler=args.scheduler, strength=args.strength,
        batch_size=args.batch_size, attention=args.attention, resume=args.resume, overwrite=args.overwrite,
        eta_below=args.eta_below_band, height=args.height, width=args.width, base_dir=args.base,
        guidance_every=args.guidance_every,
    )
    if "manifest" in summary:
        print(f"{summary['items']} images in {args.out} ({summary['resumed']} kept from before); manifest {summary['manifest']}")


def _sample(args, settings: Dict, height: int, width: int) -> None:
    from .io import atomic_write_json, staged_directory
    from .models.sd import set_attention
    from .report import save_png, to_uint8
    from .model_folders.load import load_model
    from .sampling import GuidedDenoiser, prompts_to_ids, sample
    from .sampling.job import prompt_dirname

    base, guidance = load_model(args.model, args.base)
    prompts = [p for p in args.prompt for _ in range(args.num)]
    ids = prompts_to_ids(base, prompts)  # an unknown prompt fails here, before any sampling
    # What is really active: "none" for a UNet without attention layers, whatever was asked.
    attention = set_attention(base.unet, args.attention)
    print(f"attention: {attention}")
    seeds = [args.seed + i for i in range(len(prompts))]
    images = sample(GuidedDenoiser(base, guidance, args.strength), ids, seeds, args.steps, args.guidance_scale, args.scheduler,
                    batch_size=args.batch_size, eta_below=args.eta_below_band, height=height, width=width,
                    guidance_every=args.guidance_every)
    pixels = to_uint8(images)
    entries = []
    counters: Dict[str, int] = {}
    # One folder per prompt, one-to-one (a slug plus a hash of the prompt), recorded in the manifest.
    folders = {prompt: prompt_dirname(prompt) for prompt in args.prompt}
    with staged_directory(args.out, kind="samples") as stage:
        for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
            k = counters.get(prompt, 0)
            counters[prompt] = k + 1
            rel = os.path.join(folders[prompt], f"{k:04d}.png")
            save_png(pixels[i], os.path.join(stage, rel))
            entries.append({"prompt": prompt, "seed": seed, "path": rel})
        atomic_write_json(os.path.join(stage, "manifest.json"),
                          {"settings": settings, "attention_used": attention, "prompt_folders": folders,
                           "images": entries})
    print(f"wrote {len(entries)} images to {args.out}")


EVALUATE_MADE_BY = "invdiff evaluate"  # in its --out JSON: what lets a later evaluate overwrite it


def cmd_evaluate(args) -> None:
    """Colored-digits samples: Bias, digit accuracy, Frechet distance in the classifier's feature
    space and precision/recall on those features. Any other samples: the quality metrics that
    the given weights allow (Bias needs an attribute classifier for their prompts, which only the
    colored-digits benchmark ships). FID and CLIP-T run only with local weights."""
    if args.out:
        check_output_file(args.out, EVALUATE_MADE_BY)
    from .quality import check_weight_paths

    check_weight_paths(args.inception_weights, args.clip_model)
    import torch

    from .data import colored_digits, load_dataset
    from .io import atomic_write_json
    from .metrics import evaluate_samples, load_digit_classifier
    from .quality import quality_report
    from .sampling.job import load_samples  # a plain sample folder (manifest.json) or a job (manifest.jsonl)

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
        atomic_write_json(args.out, {"made_by": EVALUATE_MADE_BY, **result})


def cmd_demo(args) -> None:
    check_output_folder(args.out, "demo")
    with output_lock(args.out):
        _demo(args)


def _demo(args) -> None:
    from .demo import run_demo

    seeds = args.seeds if args.seeds is not None else ([0, 1, 2] if args.full else [0])
    # The folder is new, empty or already the demo's own (check_output_folder); run_demo marks it.
    run_demo(args.out, seeds=seeds, quick=args.quick, full=args.full, settings_keys=args.settings, rows=args.rows,
             cached_only=args.cached_only)


def cmd_serve(args) -> None:
    """The engine behind an HTTP service (invdiff/serve/app.py), or Ray Serve replicas of it.
    Everything a start can fail on for the user's input (a model folder that is missing or no
    model folder, a port in use, a bad setting) is checked first, torch-free, in well under a
    second: one line and exit 2, not a 503 or an exit status after a model load of tens of seconds."""
    check_model_path(args.model, "--model")
    if args.base is not None:
        check_model_path(args.base, "--base")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if not args.ray and (args.replicas != 1 or args.gpus_per_replica is not None):
        raise ValueError("--replicas and --gpus-per-replica apply to --ray")
    if args.metrics_export_port is not None:
        if not args.ray:
            raise ValueError("--metrics-export-port applies to --ray (without it, scrape GET /metrics)")
        if not 1 <= args.metrics_export_port <= 65535:
            raise ValueError(f"--metrics-export-port must be in 1..65535, got {args.metrics_export_port}")
        if os.environ.get("RAY_ADDRESS"):
            raise ValueError("--metrics-export-port sets the port of the Ray that `invdiff serve --ray` starts; the cluster "
                             "at RAY_ADDRESS exports on the port its nodes were started with (ray start --metrics-export-port)")
    import importlib.util

    needed = ["fastapi", "uvicorn", "prometheus_client"] + (["ray"] if args.ray else [])
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        extra = "serve,ray" if args.ray else "serve"
        raise ValueError(f"{', '.join(missing)} not installed; pip install 'invdiff[{extra}]'")
    from .serve.settings import ServeSettings

    settings = ServeSettings(model=args.model, base=args.base, device=args.device, max_batch=args.max_batch,
                             max_queue=args.max_queue, max_images_per_request=args.max_images_per_request,
                             attention=args.attention, frozen_dtype=args.frozen_dtype, eta_below_band=args.eta_below_band,
                             guidance_every=args.guidance_every,
                             drain_seconds=args.drain_seconds, engine_process=not args.engine_in_process,
                             expose_details=args.expose_details)
    if os.path.exists(args.model):  # (a hub id, with downloads allowed, is named by its download)
        from .model_folders import classify, sampling_size

        classify(args.model)  # which kind of model folder, from which files exist: none is read
        sampling_size(args.model)  # its config files, as `invdiff sample` reads them before a load
    sockets = None
    if not args.ray:  # Ray's proxy binds the port, and one already running on RAY_ADDRESS holds it
        from .serve.settings import listen_sockets

        sockets = listen_sockets(args.host, args.port)  # held from here on: nothing can take it during the load
    if args.ray:
        from .serve.ray_serve import run

        run(settings, args.replicas, args.host, args.port, args.gpus_per_replica, metrics_export_port=args.metrics_export_port)
        return
    from .serve.app import serve

    serve(settings, args.host, args.port, sockets=sockets)


def build_parser() -> argparse.ArgumentParser:
    from .config import AGGREGATIONS, MAX_ALTERNATIONS, MAX_STEP_METHODS, RECIPES, BaseTrainConfig, DebiasConfig

    parser = _Parser(prog="invdiff", description="InvDiff: debias a diffusion model without bias labels.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train-base", help="train a small (biased) base diffusion model")
    _add_data_args(p)
    p.add_argument("--out", required=True, help="folder for the base model (diffusers layout)")
    b = BaseTrainConfig()  # the flags' defaults are the config's
    p.add_argument("--steps", type=positive_int, default=b.steps, help="optimisation steps")
    p.add_argument("--batch-size", type=batch_size_int, default=b.batch_size, help="images per step")
    p.add_argument("--lr", type=finite_float, default=b.lr, help="AdamW learning rate")
    p.add_argument("--seed", type=seed_int, default=b.seed, help="seed of the weights, batches and noise")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an --out that holds another base model: only a folder invdiff made (it holds invdiff's marker file and nothing else); a folder with any other file, the working folder and the folders above it are never replaced")
    p.set_defaults(func=cmd_train_base)

    p = sub.add_parser("debias", help="max step (environment inference) then min step (train G_psi)")
    p.add_argument("--base", required=True,
                   help="base model folder (invdiff base or Stable Diffusion folder), or a hub id with --allow-download")
    _add_data_args(p)
    p.add_argument("--out", required=True, help="run folder to write")

    d = DebiasConfig()  # also the defaults of sample's and serve's --attention and --frozen-dtype
    given = argparse.SUPPRESS  # a config flag left out keeps the recipe's value

    def opt(flag, help, **kw):
        field = DEBIAS_FLAGS[flag.lstrip("-").replace("-", "_")]
        p.add_argument(flag, default=given, help=f"{help} (default: {getattr(d, field)})", **kw)

    p.add_argument("--recipe", default="invdiff", choices=sorted(RECIPES),
                   help="preset: invdiff, official (the paper's recipe as published), jtt, groupdro; "
                        "flags given on top override it")
    opt("--groups", "number of environments K", type=positive_int)
    opt("--lam", "variance-penalty weight lambda", type=finite_float)
    opt("--ratio", "combine ratio r (<=1 interpolate, >1 residual)", type=finite_float)
    opt("--steps", "min-step optimisation steps", type=positive_int)
    opt("--batch-size", "min-step batch size", type=batch_size_int)
    opt("--lr", "min-step learning rate", type=finite_float)
    opt("--lam-warmup", "steps over which lambda ramps up from 0", type=nonnegative_int)
    opt("--lam-mode", "relative: lambda is divided by the batch's mean loss (scale-free)", choices=LAM_MODES)
    opt("--preset", "G_psi size preset", choices=["tiny", "small", "medium"])
    opt("--guidance", "kind of G_psi: a narrow UNet from --preset, or LoRA adapters (peft) on the frozen UNet",
        choices=GUIDANCE_KINDS)
    opt("--lora-rank", "LoRA rank for --guidance lora", type=positive_int)
    opt("--aggregation", "per-sample loss aggregation", choices=list(AGGREGATIONS))
    opt("--max-step", "environment inference: gap (widest gap above the median), otsu (least within-group variance of "
        "the winsorized scores, groups above the lowest at most half), mixture, official (projected Adam)",
        choices=list(MAX_STEP_METHODS))
    p.add_argument("--pooled-groups", action="store_true", help="infer K groups over all prompts instead of K per prompt")
    opt("--alpha", "weight of the official min-loss term in the max step", type=finite_float)
    opt("--loss-timesteps", "max step: size of the t grid", type=positive_int)
    opt("--loss-draws", "max step: noise draws per grid timestep", type=positive_int)
    opt("--max-step-steps", "max step (official): Adam steps", type=positive_int)
    opt("--alternations", "the paper's alternation: re-infer the groups from the guided model's losses and train G "
        "further, at most N times (0: off; it stops early once a round moves <= 1%% of the samples)",
        type=int_in_range(0, MAX_ALTERNATIONS))
    opt("--t-band", "where the attribute is decided: auto (the high-spread band of t), off, or the band's first timestep; "
        "sampling turns stochastic below it")
    p.add_argument("--gate-to-band", action="store_true", help="G acts inside the --t-band only")
    opt("--ema-decay", "EMA of G's weights, in (0, 1); off when not given", type=finite_float)
    opt("--jtt-upweight", "--recipe jtt: weight of the high-loss group", type=finite_float)
    opt("--importance-mix", "share of uniform t draws in the min step, in (0, 1]; 1 = no importance sampling", type=finite_float)
    opt("--head", "G_psi's recalibration head: affine, zero-sum (leaves grey pixels alone), none (UNet body only)",
        choices=["affine", "zero-sum", "none"])
    p.add_argument("--no-bank", action="store_true", help="min step: fresh (t, noise) every step instead of the frozen bank")
    p.add_argument("--no-calibrate", action="store_true",
                   help="skip the label-free calibration of the push (by default each prompt's strength is set so that its "
                        "samples read balanced between the groups; see invdiff/calibration.py)")
    opt("--seed", "seed", type=seed_int)
    opt("--frozen-dtype", "dtype of the frozen UNet/VAE/text encoder (G_psi trains in fp32)", choices=FROZEN_DTYPES)
    opt("--attention", "attention backend of the frozen UNet: PyTorch SDPA or xformers (if installed)",
        choices=ATTENTION_BACKENDS)
    p.add_argument("--channels-last", action="store_true", help="run the frozen UNet in channels_last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the frozen UNet")
    p.add_argument("--grad-checkpointing", action="store_true", help="gradient checkpointing in G_psi's UNet")
    opt("--latent-cache", "Stable Diffusion bases: keep the VAE latents here (memory-mapped)")
    opt("--grad-accum", "min-step micro-batches per optimiser step (group statistics are per micro-batch)", type=positive_int)
    p.add_argument("--checkpoint-every", type=nonnegative_int, default=0,
                   help="min step: save an accelerate checkpoint every N steps (0: never)")
    p.add_argument("--checkpoint-dir", default=None, help="where checkpoints go (None: OUT.checkpoints)")
    p.add_argument("--keep-checkpoints", type=positive_int, default=2, help="how many of the newest checkpoints to keep")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint folder: continue an interrupted min step")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an --out that holds another run: only a folder invdiff made (it holds invdiff's marker file and nothing else); a folder with any other file, the working folder and the folders above it are never replaced")
    p.add_argument("--copy-base", action="store_true",
                   help="Stable Diffusion bases: copy the base into the run folder (a self-contained diffusers pipeline "
                        "folder, gigabytes) instead of recording its place and content hash, checked on every load")
    p.add_argument("--allow-download", action="store_true",
                   help="allow a hub id (org/name) given on this command line to be downloaded; without it invdiff "
                        "never goes online, and a run folder never decides what is downloaded")
    p.set_defaults(func=cmd_debias)

    p = sub.add_parser("inspect", help="see what the max step finds before you debias: its groups in pictures (report.md, PNGs)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--base", default=None, help="base model folder: run the max step alone on --data (no min step)")
    source.add_argument("--run", default=None,
                        help="a debias run folder: read its saved losses and groups (its data is loaded again from its "
                             "record unless --data is given)")
    _add_data_args(p)
    p.set_defaults(data=None)  # --base: colored-digits; --run: the run's own data
    p.add_argument("--out", required=True, help="folder for report.md, report.json and the PNGs")
    p.add_argument("--prompts", nargs="+", default=None,
                   help="report only these prompts (the max step still runs on all, so its groups are debias's)")
    p.add_argument("--recipe", default="invdiff", choices=sorted(RECIPES), help="--base: the max step of this debias preset")
    # opt() (debias's) adds to `p` as it is when called: here, inspect's parser.
    opt("--groups", "--base: number of environments K", type=positive_int)
    opt("--max-step", "--base: environment inference (as for debias)", choices=list(MAX_STEP_METHODS))
    opt("--aggregation", "--base: per-sample loss aggregation", choices=list(AGGREGATIONS))
    p.add_argument("--pooled-groups", action="store_true", help="--base: infer K groups over all prompts instead of K per prompt")
    opt("--loss-timesteps", "--base: size of the max step's t grid", type=positive_int)
    opt("--loss-draws", "--base: noise draws per grid timestep", type=positive_int)
    opt("--seed", "--base: seed of the max step's noise and cut", type=seed_int)
    opt("--frozen-dtype", "--base: dtype of the frozen UNet, VAE and text encoder", choices=FROZEN_DTYPES)
    opt("--latent-cache", "--base, Stable Diffusion bases: keep the VAE latents here (memory-mapped)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("sample", help="sample PNGs from a base model or a run folder")
    p.add_argument("--model", required=True, help="base model folder, debias run folder, Stable Diffusion or InvDiffPipeline folder")
    p.add_argument("--base", default=None,
                   help="a Stable Diffusion run's base model at a new place (None: where it was when the run was made); "
                        "its content must match the hash the run recorded")
    p.add_argument("--attention", default=d.attention, choices=ATTENTION_BACKENDS, help="attention backend of the frozen UNet")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable); the images are written all at once")
    p.add_argument("--prompts", default=None,
                   help="a .txt or .jsonl prompts file: a sharded, resumable job with manifest.jsonl (see invdiff/sampling/job.py)")
    p.add_argument("--resume", action="store_true", help="--prompts jobs: keep the finished images, sample the rest")
    p.add_argument("--batch-size", type=batch_size_int, default=64, help="engine slots (images sampled together)")
    p.add_argument("--num", type=images_per_prompt_int, default=8, help="images per prompt")
    p.add_argument("--out", required=True, help="folder for the PNGs and their manifest")
    p.add_argument("--steps", type=positive_int, default=25, help="sampling steps")
    # w = 1 (no CFG on top of G): on the shipped p=0.9 base, w = 2 already pushes the base past
    # its data's bias and lowers quality, and CFG amplifies the conditional branch's attribute
    # back (docs/research_notes.md, "What we found" 8).
    p.add_argument("--guidance-scale", type=finite_float, default=1.0, help="classifier-free guidance scale w (1 = off)")
    p.add_argument("--scheduler", default="ddim", choices=SCHEDULER_NAMES, help="sampling scheduler")
    p.add_argument("--strength", type=finite_float, default=1.0, help="G_psi strength s (0 = frozen model, 1 = the calibrated push, or G as trained when the run was not calibrated)")
    p.add_argument("--eta-below-band", type=finite_float, default=None,
                   help="DDIM eta under the attribute band recorded in G (None: 1, stochastic there; 0 = deterministic)")
    p.add_argument("--guidance-every", type=positive_int, default=DEFAULT_GUIDANCE_EVERY,
                   help="run G_psi's UNet body at every K-th step of each image and reuse its output between (its "
                        "cheap head runs every step; 1: every step): fewer G evaluations, with a measured effect on "
                        "Bias and quality (docs/results.md)")
    p.add_argument("--height", type=image_side_int, default=None,
                   help="image height in pixels, a multiple of the VAE's downsampling factor (None: the size the run "
                        "trained at, else the model's native size, the UNet's sample_size x that factor)")
    p.add_argument("--width", type=image_side_int, default=None, help="image width in pixels (None: as --height's default)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the first image; image i uses seed + i")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an --out that holds samples made with other settings: only a folder invdiff made (it holds invdiff's marker file and nothing else); a folder with any other file, the working folder and the folders above it are never replaced")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("evaluate", help="Bias and quality of samples")
    p.add_argument("--images", required=True, help="a folder written by `invdiff sample` (plain or --prompts job)")
    p.add_argument("--num-colors", type=positive_int, default=2, help="colored digits: number of stroke colours A")
    p.add_argument("--reference", default=None, help="an imagefolder of real images (FID, precision/recall) for non-digit samples")
    p.add_argument("--inception-weights", default=None, help="local FID Inception weights (torch-fidelity's .pth); else FID is skipped")
    p.add_argument("--clip-model", default=None, help="local CLIP folder (CLIPModel + CLIPProcessor) for CLIP-T; else skipped")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("serve", help="serve a model over HTTP (continuous batching; Ray Serve with --ray)",
                       description=_serve_description(), formatter_class=_DescribedDefaultsFormatter)
    p.add_argument("--model", required=True, help="any model folder `invdiff sample` takes")
    p.add_argument("--base", default=None, help="a Stable Diffusion run's base model at a new place (as for sample)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=nonnegative_int, default=8000, help="port to listen on")
    p.add_argument("--max-batch", type=batch_size_int, default=16, help="engine slots: images sampled together")
    p.add_argument("--max-queue", type=positive_int, default=64, help="images waiting for a slot; beyond it requests get 429")
    p.add_argument("--max-images-per-request", type=positive_int, default=16, help="largest num one request may ask for")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (None: cuda if available)")
    p.add_argument("--attention", default=d.attention, choices=ATTENTION_BACKENDS, help="attention backend of the frozen UNet")
    p.add_argument("--frozen-dtype", default=d.frozen_dtype, choices=FROZEN_DTYPES, help="dtype of the frozen UNet (G stays fp32)")
    p.add_argument("--eta-below-band", type=finite_float, default=None, help="as for sample")
    p.add_argument("--guidance-every", type=positive_int, default=DEFAULT_GUIDANCE_EVERY, help="as for sample")
    p.add_argument("--drain-seconds", type=finite_float, default=30.0,
                   help="on SIGTERM, finish in-flight requests for at most this long; those still running then get "
                        "a 503 with Retry-After (with --ray: Ray Serve's graceful_shutdown_timeout_s)")
    p.add_argument("--engine-in-process", action="store_true",
                   help="run the engine as a thread of the server's process; without this flag it runs in a process "
                        "of its own, so that HTTP work never holds the GIL the sampling loop needs, and a dead engine "
                        "process is restarted (docs/serving.md)")
    p.add_argument("--expose-details", action="store_true",
                   help="let responses show the model's absolute path (/readyz, the images' \"model\", paths in error details) "
                        "and X-Served-By show host:pid; without it they show the model folder's name and a random id of "
                        "the server process (logged at start)")
    p.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment (starts Ray, or joins RAY_ADDRESS)")
    p.add_argument("--replicas", type=positive_int, default=1, help="--ray: replicas (one per GPU)")
    p.add_argument("--gpus-per-replica", type=finite_float, default=None, help="--ray: GPUs per replica (None: 1 on CUDA, else 0)")
    p.add_argument("--metrics-export-port", type=positive_int, default=None,
                   help="--ray: the port where the local Ray started here exports every replica's metrics for Prometheus "
                        "(ray_invdiff_*, tagged by replica; None: a port Ray picks, logged at start; docs/serving.md)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="debias the shipped p=0.9 base model and report")
    p.add_argument("--out", default="demo_out", help="folder for the report, plots and cached cells")
    p.add_argument("--seeds", type=seed_int, nargs="+", default=None, help="seeds (None: 0; 0 1 2 with --full)")
    p.add_argument("--quick", action="store_true", help="tiny settings, for smoke tests only")
    p.add_argument("--full", action="store_true",
                   help="the whole matrix: every setting (design and held out), every row, strengths 0.5/1/1.5, 3 seeds")
    p.add_argument("--settings", nargs="+", default=None, help="settings to run (None: the design setting; all with --full)")
    p.add_argument("--rows", nargs="+", default=None, help="rows to run (None: base erm oracle invdiff official; all with --full)")
    p.add_argument("--cached-only", action="store_true", help="report the cells already in OUT/cells, run nothing")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error, already printed as one line (2)
        return exc.code if isinstance(exc.code, int) else 0
    from .errors import USER_ERRORS
    from .hub import set_downloads_allowed

    set_downloads_allowed(getattr(args, "allow_download", False))  # before anything can import huggingface_hub
    # `serve` drains on SIGTERM through uvicorn's own handler; signal handlers belong to the main thread.
    handle_sigterm = args.command != "serve" and threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGTERM, _raise_terminated) if handle_sigterm else None
    try:
        args.func(args)
    except USER_ERRORS as exc:
        _close_progress_bars()
        print(f"invdiff {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Outputs are staged beside their place and swapped in only when complete, so nothing
        # partial is left; a --prompts job keeps its finished images for --resume.
        _close_progress_bars()
        print(f"invdiff {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        # SIGTERM (kill, Slurm, docker stop) unwinds like Ctrl-C: temporaries (the frozen-prediction
        # bank, staging folders) are removed on the way out and the old output stays as it was.
        _close_progress_bars()
        print(f"invdiff {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if handle_sigterm:
            signal.signal(signal.SIGTERM, previous_handler)
    return 0


class Terminated(BaseException):
    """Raised in the main thread by SIGTERM: a BaseException, so that no `except Exception` on
    the way out swallows it, as with KeyboardInterrupt."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _close_progress_bars() -> None:
    """End the bars an exception left open, so that the error starts on a line of its own."""
    if "tqdm" in sys.modules:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()


if __name__ == "__main__":
    sys.exit(main())
