"""Orchestration of one debiasing run, and loading any model folder for sampling.

A run folder on an embedded base is self-contained:

    RUN_DIR/invdiff_run.json        what was run (base, data, K, lambda, r, steps, seeds)
    RUN_DIR/base/                   a copy of the frozen base model (a few MB)
    RUN_DIR/guidance/               G_psi, diffusers-style (config.json holds r)
    RUN_DIR/losses.safetensors      the frozen model's (N, T) losses and the t grid, by sample id
    RUN_DIR/environments.safetensors  W (N, K) by sample id, with diagnostics in its metadata
    RUN_DIR/train_log.json          the min step's per-step loss, group risks and variance

On a Stable Diffusion base (gigabytes) it holds no copy of the base: invdiff_run.json records the
base's place and content hash ("base_reference", models/base_reference.py), checked on every
load, and README.md is a model card. With copy_base (`invdiff debias --copy-base`) it is instead
a whole InvDiffPipeline folder, the base's unet/ vae/ text_encoder/ tokenizer/ scheduler/ copied in.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import asdict
from typing import Dict, Optional, Tuple

import torch

from .data.base import DiffusionDataset
from .environments import (  # noqa: F401 (MaxStepPolicy, guidance_band: re-exported)
    MaxStepPolicy,
    collect_losses,
    groups_from_losses,
    guidance_band,
    alternate,
    guided_losses,
    max_step,
    max_step_policy,
    save_environments,
    weights_for_objective,
)
from .io import CheckpointError, atomic_save_file, atomic_write_json, read_json, staged_directory
from .models.base import BASE_META, FrozenBase
from .models.base_reference import REFERENCE_KEY, RUN_META, describe_hub_base, describe_local_base, refers_to_base
from .models.sd import latent_dataset
from .models.guidance import GuidanceModule
from .training import MinStepConfig, train_guidance
from .config import OBJECTIVES, RECIPES, DebiasConfig, describe_changes, recipe_config  # noqa: F401 (re-exported)


def load_base(path: str, config: Optional[DebiasConfig] = None, device=None) -> FrozenBase:
    """The frozen base at `path`: a Stable Diffusion folder (or hub id) loads as a latent-space
    LatentDiffusionBase with the config's dtype, attention and compile options; an invdiff base
    folder as the embedded FrozenBase."""
    from .models.sd import LatentDiffusionBase, is_sd_folder, looks_like_hub_id, set_attention

    config = config or DebiasConfig()
    if is_sd_folder(path) or looks_like_hub_id(path) or refers_to_base(path):
        return LatentDiffusionBase.from_pretrained(
            path, dtype=config.frozen_dtype, attention=config.attention, device=device,
            channels_last=config.channels_last, compile_unet=config.compile_frozen,
        )
    base = FrozenBase.from_pretrained(path)
    base.meta["attention"] = set_attention(base.unet, config.attention)
    if config.channels_last:
        base.unet.to(memory_format=torch.channels_last)
    if config.compile_frozen:
        base.unet = torch.compile(base.unet)
    return base


def check_output_dir(out: str, meta: Dict, overwrite: bool = False) -> None:
    """Refuse to write over a folder that invdiff did not make as a run (outputs.py: with or
    without `overwrite`), or, without `overwrite`, a run with other settings."""
    from .outputs import check_output_folder

    check_output_folder(out, "run", overwrite)
    if not os.path.exists(out) or overwrite or not os.listdir(out):
        return
    existing = os.path.join(out, RUN_META)
    if not os.path.isfile(existing):
        raise FileExistsError(f"{out!r} is not empty and holds no invdiff run; choose another --out")
    old = read_json(existing, "run metadata")
    if not isinstance(old, dict):
        raise CheckpointError(f"run metadata at {existing} is not a JSON object")
    before = {k: old.get(k) for k in ("base", "data", "config")}
    after = {k: meta.get(k) for k in ("base", "data", "config")}
    if before != after:
        raise FileExistsError(f"{out!r} already holds a different run ({describe_changes(before, after)}); "
                              "choose another --out or pass --overwrite")


def weights_from_losses(losses: torch.Tensor, prompt_ids: torch.Tensor, config: DebiasConfig):
    """(N, T) frozen losses -> (W, scores): the groups of `config`'s max step (environments.max_step)."""
    weights, scores = groups_from_losses(losses, prompt_ids, max_step_policy(config))
    return weights_for_objective(weights, config), scores


def environment_weights(
    base: FrozenBase, dataset: DiffusionDataset, config: DebiasConfig, progress: bool = True, return_bank: bool = False
):
    """The max step. Returns (W (N, K), scores (N,), losses (N, T), timesteps (T,)) and, with
    return_bank, the `FrozenBank` of the frozen model's predictions it was computed from."""
    dataset = dataset.training_view()
    losses, grid, bank = collect_losses(
        base, dataset, config.loss_timesteps, config.loss_draws, config.seed, progress=progress, return_bank=True
    )
    weights, scores = weights_from_losses(losses, dataset.prompt_ids, config)
    if return_bank:
        return weights, scores, losses, grid, bank
    return weights, scores, losses, grid


def bank_parent(config: DebiasConfig, out: str) -> str:
    """Where a latent base's frozen-prediction bank goes on disk (in a temporary folder, removed
    after the run): beside the latent cache when there is one, else beside the output folder,
    both on disks the user chose. Not the system temp dir, which is often a RAM-backed tmpfs."""
    return config.latent_cache or os.path.dirname(os.path.abspath(out))


def debias(
    base_dir: str,
    dataset: DiffusionDataset,
    out: str,
    config: DebiasConfig = DebiasConfig(),
    data_spec: Optional[Dict] = None,
    overwrite: bool = False,
    copy_base: bool = False,
    progress: bool = True,
    weights: Optional[torch.Tensor] = None,
    frozen: Optional[Dict] = None,
    checkpoint_every: int = 0,
    checkpoint_dir: Optional[str] = None,
    keep_checkpoints: int = 2,
    resume: Optional[str] = None,
) -> Dict:
    """Max step then min step; writes RUN_DIR atomically. `weights` (N, K) skips the max step
    (used for the oracle baseline and for ERM with a single all-ones environment). `frozen`
    ({"losses", "timesteps", "bank"} from `collect_losses(..., return_bank=True)` with this
    config's grid and seed) reuses the frozen model's predictions across several runs.
    checkpoint_every / checkpoint_dir (default OUT.checkpoints) / keep_checkpoints / resume
    ("latest" or a checkpoint folder): the min step's atomic accelerate checkpoints. A resumed
    run recomputes the max step (deterministic) and continues the min step where it stopped.
    copy_base: a Stable Diffusion base is copied into the run folder (a self-contained
    InvDiffPipeline folder) rather than referred to by place and content hash; an embedded base
    is always copied.
    Under torchrun / accelerate launch every stage is data-parallel (see invdiff.distributed)."""
    if (checkpoint_every or resume) and checkpoint_dir is None:
        checkpoint_dir = out.rstrip("/") + ".checkpoints"
    from .distributed import barrier, init_from_env

    rank, world = init_from_env()
    dataset = dataset.training_view()
    config.validate(len(dataset))
    meta = {
        "kind": "invdiff-run",
        "base": os.path.abspath(base_dir),
        "data": data_spec or {"name": dataset.name, **dataset.info},
        "config": asdict(config),
        "given_weights": weights is not None,
    }
    check_output_dir(out, meta, overwrite)
    if checkpoint_dir and rank == 0:
        # A checkpoint only continues the run that made it: same base, data and config.
        identity = {k: meta[k] for k in ("base", "data", "config")}
        marker = os.path.join(checkpoint_dir, "run.json")
        if os.path.isfile(marker):
            stored = read_json(marker, what="checkpoint run description")
            if stored != json.loads(json.dumps(identity)):
                raise ValueError(f"the checkpoints in {checkpoint_dir!r} belong to a run with other settings; "
                                 "use another --checkpoint-dir or remove them")
        elif resume:
            raise ValueError(f"--resume {resume}: no checkpoints of this run in {checkpoint_dir!r}")
        else:
            os.makedirs(checkpoint_dir, exist_ok=True)
            atomic_write_json(marker, identity)
    base = load_base(base_dir, config).freeze()
    num_train_timesteps = base.scheduler.config.num_train_timesteps
    config.validate_for_base(num_train_timesteps)
    latent = hasattr(base, "decode_latents")
    if latent and not copy_base and rank == 0:
        # Hashed now, as loaded: the base G_psi is trained on (the files are likely still in the
        # page cache). Only the main process writes the run.
        source = base.meta["source"]
        meta[REFERENCE_KEY] = describe_local_base(source) if os.path.isdir(source) else describe_hub_base(source)
        if meta[REFERENCE_KEY] is None:
            import warnings

            warnings.warn(f"the hub cache does not show which commit of {source!r} was loaded, so a run folder "
                          "could not check it on load: the base is copied into the run folder", RuntimeWarning, stacklevel=2)
            del meta[REFERENCE_KEY]
            copy_base = True
    if latent:
        # The VAE's pixels per latent cell, for `invdiff sample` to check a size against without
        # the base (sampling_size), which a run folder may only refer to.
        meta["vae_factor"] = base.vae_factor
        # Text conditioning: the dataset's prompts take ids 0..P-1, encoded once by the frozen
        # text encoder; the images become VAE latents, encoded once (and cached on disk if asked).
        base.conditioner.add_prompts(dataset.prompts)
        if base.prompts[: len(dataset.prompts)] != list(dataset.prompts):
            raise ValueError("the base already holds other prompts; load it fresh for this dataset")
        # The pixel size G trains at, which `invdiff sample` draws at by default (sampling_size).
        meta["resolution"] = int(dataset.resolution)
        dataset = latent_dataset(base, dataset, config.latent_cache, progress=progress)
    elif list(dataset.prompts) != base.prompts:
        raise ValueError("the dataset's prompts differ from those the base model was trained on")
    elif tuple(dataset.images.shape[-2:]) != (base.unet.config.sample_size,) * 2:
        # G_psi would train at one size and sample at the base's: refuse before any loss is computed.
        raise ValueError(f"the data is {dataset.images.shape[-1]}x{dataset.images.shape[-2]} but the base model was "
                         f"trained at {base.unet.config.sample_size}x{base.unet.config.sample_size}; "
                         f"pass --resolution {base.unet.config.sample_size}")
    meta["attention"] = base.meta.get("attention")
    if frozen is None:
        frozen = dict(zip(
            ("losses", "timesteps", "bank"),
            # A latent base's UNet sees the min step's batch size in the loss pass too: the default
            # 512 (sample, t) jobs per forward would hold tens of GB of SD-1.5 activations at 512 px.
            collect_losses(base, dataset, config.loss_timesteps, config.loss_draws, config.seed, progress=progress, return_bank=True,
                           bank_dir=bank_parent(config, out) if latent else None,
                           **({"batch_size": config.batch_size} if latent else {})),
        ))
    losses, grid, bank = frozen["losses"], frozen["timesteps"], frozen["bank"]
    found = max_step(losses, dataset.prompt_ids, config, num_train_timesteps, bank_timesteps=bank.timesteps,
                     weights=weights, prompts=list(dataset.prompts))
    weights, scores, diagnostics, band_start, t_min = (found.weights, found.scores, found.diagnostics,
                                                       found.band_start, found.t_min)
    if found.proposal is not None:
        bank = dataclasses.replace(bank, proposal=found.proposal)
    torch.manual_seed(config.seed)  # G's initial weights depend on the run's seed only, not on history
    if config.guidance_kind == "lora":
        from .models.lora import LoraGuidance

        guidance = LoraGuidance.from_frozen(base.unet, config.ratio, config.lora_rank, t_min=t_min, band_start=band_start)
    else:
        guidance = GuidanceModule.from_frozen(base.unet.config, config.preset, config.ratio, t_min=t_min,
                                              head_kind=config.head, body=config.body,
                                              head_sees_sample=config.head_sees_sample, band_start=band_start)
    if config.grad_checkpointing and getattr(guidance, "unet", None) is not None:
        guidance.unet.enable_gradient_checkpointing()
    min_cfg = MinStepConfig(
        steps=config.steps,
        batch_size=config.batch_size,
        lr=config.lr,
        lam=config.lam,
        lam_warmup=config.lam_warmup,
        lam_mode=config.lam_mode,
        seed=config.seed,
        objective="groupdro" if config.objective == "groupdro" else "invariant",
        ema_decay=config.ema_decay,
        grad_accum=config.grad_accum,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints,
        resume=resume,
    )
    used_bank = bank if config.use_bank else None
    log = train_guidance(base, guidance, dataset, weights, min_cfg, progress=progress, bank=used_bank)
    if config.alternations and not meta["given_weights"]:
        logs = [log]

        def train_more(new_weights):
            more = dataclasses.replace(min_cfg, seed=min_cfg.seed + len(logs), checkpoint_every=0, resume=None)
            logs.append(train_guidance(base, guidance, dataset, new_weights, more, progress=progress, bank=used_bank,
                                       desc=f"min-step (alternation {len(logs)})"))

        # G's losses on the max step's own draws (the bank), so that each round's groups compare with the first.
        found, _ = alternate(lambda: guided_losses(base, guidance, dataset, bank, config.loss_draws), train_more, found,
                             dataset.prompt_ids, config, num_train_timesteps, config.alternations,
                             prompts=list(dataset.prompts))
        weights, scores, diagnostics = found.weights, found.scores, found.diagnostics
        # one log: each step tagged with its round (0: the first min step), then the last timing entry
        log = [{**entry, "round": r} for r, part in enumerate(logs) for entry in part if "step" in entry] + [logs[-1][-1]]
    if config.calibrate:
        from .calibration import calibrate

        meta["calibration"] = calibrate(base, guidance, dataset, losses, config, band_start, progress=progress and rank == 0)
        diagnostics = {**diagnostics, "warnings": list(diagnostics.get("warnings", [])) + meta["calibration"]["warnings"]}
    meta["diagnostics"] = diagnostics
    meta["t_min"] = t_min
    meta["band_start"] = band_start
    meta["min_step_seconds"] = log[-1].get("seconds")
    meta["processes"] = world
    result = {"weights": weights, "scores": scores, "losses": losses, "log": log, "meta": meta}
    if rank != 0:  # DDP keeps G identical on every rank: the main process writes the run
        barrier()
        return result
    with staged_directory(out, kind="run") as stage:
        if latent:  # InvDiffPipeline.from_pretrained loads the run folder, with or without a copy of its base
            from .pipeline import save_pipeline_folder, save_referring_folder

            if copy_base:
                save_pipeline_folder(stage, base, guidance, final_path=out)
            else:
                save_referring_folder(stage, guidance, meta[REFERENCE_KEY], final_path=out)
        else:
            shutil.copytree(base_dir, os.path.join(stage, "base"))
            guidance.save_pretrained(os.path.join(stage, "guidance"))
        save_environments(os.path.join(stage, "environments.safetensors"), weights, dataset.sample_ids, scores, diagnostics)
        if losses is not None:
            atomic_save_file(
                {"losses": losses, "timesteps": grid, "sample_ids": dataset.sample_ids},
                os.path.join(stage, "losses.safetensors"),
            )
        atomic_write_json(os.path.join(stage, "train_log.json"), {"log": log})
        atomic_write_json(os.path.join(stage, RUN_META), meta)
    barrier()
    return result


from .model_folders import sampling_size  # noqa: E402,F401 (torch-free home, for the CLI; re-exported)


def load_model(path: str, base: Optional[str] = None, frozen_dtype: str = "fp32") -> Tuple[FrozenBase, Optional[GuidanceModule]]:
    """(frozen base, G_psi or None) from: an invdiff base folder, a debias run folder, a Stable
    Diffusion folder, or an InvDiffPipeline folder (a --copy-base SD run folder is one). An SD run
    folder that refers to its base loads it from where it was, or from `base` (the base moved),
    after checking its content hash (models/base_reference.py). frozen_dtype (fp32 | bf16 | fp16):
    the frozen parts' dtype (an SD base is read in it; an embedded base's UNet is cast); G stays
    in its own dtype."""
    if frozen_dtype not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"frozen_dtype must be fp32, bf16 or fp16, got {frozen_dtype!r}")
    from .models.base_reference import resolve_base
    from .models.sd import LatentDiffusionBase, is_sd_folder

    if frozen_dtype != "fp32" and not (is_sd_folder(path) or refers_to_base(path)):
        # An embedded base is small and stored in fp32: load it so, then cast the frozen UNet (and
        # with it any LoRA adapters on it: sampling is inference only).
        frozen, guidance = load_model(path, base)
        frozen.unet.to({"bf16": torch.bfloat16, "fp16": torch.float16}[frozen_dtype])
        return frozen, guidance

    def guidance_at(folder, frozen_unet):
        if not os.path.isdir(folder):
            return None
        from .models.lora import load_guidance

        try:
            return load_guidance(folder, frozen_unet).eval().requires_grad_(False)
        except Exception as exc:
            raise CheckpointError(f"could not load G_psi from {folder!r}: {exc}") from exc

    if base is not None and not refers_to_base(path):
        raise ValueError(f"{path!r} is no run folder that refers to its base model: a base to load it with "
                         "(base=, invdiff sample --base) applies only to those")
    if refers_to_base(path):
        source, revision = resolve_base(path, base)
        frozen = LatentDiffusionBase.from_pretrained(source, dtype=frozen_dtype, revision=revision).freeze()
        guidance = guidance_at(os.path.join(path, "guidance"), frozen.unet)
        if guidance is None:
            raise CheckpointError(f"run folder {path!r} has no guidance/ (G_psi)")
        return frozen, guidance
    if is_sd_folder(path):
        base = LatentDiffusionBase.from_pretrained(path, dtype=frozen_dtype).freeze()
        return base, guidance_at(os.path.join(path, "guidance"), base.unet)
    if os.path.isfile(os.path.join(path, RUN_META)):
        base = FrozenBase.from_pretrained(os.path.join(path, "base"))
        guidance = guidance_at(os.path.join(path, "guidance"), base.unet)
        if guidance is None:
            raise CheckpointError(f"run folder {path!r} has no guidance/ (G_psi)")
        return base.freeze(), guidance
    if os.path.isfile(os.path.join(path, BASE_META)) or os.path.isdir(os.path.join(path, "unet")):
        return FrozenBase.from_pretrained(path).freeze(), None
    raise CheckpointError(f"{path!r} is neither an invdiff base model, a run folder nor a Stable Diffusion folder")
