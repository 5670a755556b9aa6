"""One debiasing run: the max step, then the min step, then the save.

`debias` only orchestrates; each step is a call into the module that holds it:

    the output folder, the base's reference   model_folders/write.py (check_output_dir, refer_to_base)
    the checkpoints' owner                     training.claim_checkpoint_dir
    the frozen base                            model_folders/load.py (load_base)
    the data in the base's space               models/sd.py (latent_dataset) for a latent base
    the max step                               environments.py (frozen_losses, max_step: groups, band, proposal)
    the min step                               training.py (new_guidance, min_step_config, train_guidance);
                                               the alternation, environments.alternate
    the calibration                            calibration.py
    the save                                   model_folders/write.py (write_run_folder)

Under torchrun / accelerate launch every stage is data-parallel (invdiff.distributed); only the
main process writes. The steps run in a fixed order, and so draw their random numbers in one: a
run is reproducible from its seed.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict
from typing import Dict, List, Optional, Tuple

import torch

from .calibration import calibrate
from .config import DebiasConfig
from .data.base import DiffusionDataset
from .distributed import barrier, init_from_env
from .environments import FrozenBank, MaxStepResult, alternate, frozen_losses, guided_losses, max_step
from .model_folders.load import load_base
from .model_folders.write import check_output_dir, refer_to_base, write_run_folder
from .models.base import FrozenBase
from .models.sd import latent_dataset
from .training import MinStepConfig, claim_checkpoint_dir, min_step_config, new_guidance, train_guidance


def _data_for_base(base: FrozenBase, dataset: DiffusionDataset, config: DebiasConfig, meta: Dict,
                   progress: bool) -> DiffusionDataset:
    """The training data as the base sees it, refused before any loss is computed if it does not
    fit the base. A latent base takes the dataset's prompts (encoded once by its frozen text
    encoder) and its images as VAE latents (encoded once, cached on disk if config.latent_cache);
    `meta` records the VAE factor and the pixel size G trains at. An embedded base must have
    been trained on the same prompts, at the data's size."""
    if hasattr(base, "decode_latents"):
        # The VAE's pixels per latent cell, for `invdiff sample` to check a size against without
        # the base (sampling_size), which a run folder may only refer to.
        meta["vae_factor"] = base.vae_factor
        base.conditioner.add_prompts(dataset.prompts)
        if base.prompts[: len(dataset.prompts)] != list(dataset.prompts):
            raise ValueError("the base already holds other prompts; load it fresh for this dataset")
        # The pixel size G trains at, which `invdiff sample` draws at by default (sampling_size).
        meta["resolution"] = int(dataset.resolution)
        return latent_dataset(base, dataset, config.latent_cache, progress=progress)
    if list(dataset.prompts) != base.prompts:
        raise ValueError("the dataset's prompts differ from those the base model was trained on")
    if tuple(dataset.images.shape[-2:]) != (base.unet.config.sample_size,) * 2:
        # G_psi would train at one size and sample at the base's: refuse before any loss is computed.
        raise ValueError(f"the data is {dataset.images.shape[-1]}x{dataset.images.shape[-2]} but the base model was "
                         f"trained at {base.unet.config.sample_size}x{base.unet.config.sample_size}; "
                         f"pass --resolution {base.unet.config.sample_size}")
    return dataset


def _alternate(base: FrozenBase, guidance, dataset: DiffusionDataset, bank: FrozenBank, found: MaxStepResult,
               min_cfg: MinStepConfig, config: DebiasConfig, num_train_timesteps: int, first_log: List[Dict],
               progress: bool) -> Tuple[MaxStepResult, List[Dict]]:
    """The paper's alternation after the first min step (environments.alternate): the groups
    re-inferred from the guided model's losses, G trained further on them, config.alternations
    rounds at most. Returns (the groups G was last trained on, one log of every round's steps)."""
    used_bank = bank if config.use_bank else None
    logs = [first_log]

    def train_more(new_weights):
        more = dataclasses.replace(min_cfg, seed=min_cfg.seed + len(logs), checkpoint_every=0, resume=None)
        logs.append(train_guidance(base, guidance, dataset, new_weights, more, progress=progress, bank=used_bank,
                                   desc=f"min-step (alternation {len(logs)})"))

    # G's losses on the max step's own draws (the bank), so that each round's groups compare with the first.
    found, _ = alternate(lambda: guided_losses(base, guidance, dataset, bank, config.loss_draws), train_more, found,
                         dataset.prompt_ids, config, num_train_timesteps, config.alternations,
                         prompts=list(dataset.prompts))
    # one log: each step tagged with its round (0: the first min step), then the last timing entry
    log = [{**entry, "round": r} for r, part in enumerate(logs) for entry in part if "step" in entry] + [logs[-1][-1]]
    return found, log


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
    Returns {"weights": (N, K), "scores": (N,), "losses": (N, T), "log": [...], "meta": {...}}.
    Under torchrun / accelerate launch every stage is data-parallel (see invdiff.distributed)."""
    if (checkpoint_every or resume) and checkpoint_dir is None:
        checkpoint_dir = out.rstrip("/") + ".checkpoints"
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
        claim_checkpoint_dir(checkpoint_dir, {k: meta[k] for k in ("base", "data", "config")}, resume)

    base = load_base(base_dir, config).freeze()
    num_train_timesteps = base.scheduler.config.num_train_timesteps
    config.validate_for_base(num_train_timesteps)
    if hasattr(base, "decode_latents") and not copy_base and rank == 0:
        # Hashed now, as loaded: the base G_psi is trained on (the files are likely still in the
        # page cache). Only the main process writes the run.
        copy_base = not refer_to_base(meta, base.meta["source"])
    dataset = _data_for_base(base, dataset, config, meta, progress)
    meta["attention"] = base.meta.get("attention")

    # The max step: the frozen model's losses, then the groups, the band and the t proposal.
    if frozen is None:
        frozen = frozen_losses(base, dataset, config, out, progress=progress)
    losses, grid, bank = frozen["losses"], frozen["timesteps"], frozen["bank"]
    found = max_step(losses, dataset.prompt_ids, config, num_train_timesteps, bank_timesteps=bank.timesteps,
                     weights=weights, prompts=list(dataset.prompts))
    band_start, t_min = found.band_start, found.t_min
    if found.proposal is not None:
        bank = dataclasses.replace(bank, proposal=found.proposal)

    # The min step: a fresh G trained on the groups (and, if asked, on re-inferred ones).
    guidance = new_guidance(base, config, t_min=t_min, band_start=band_start)
    min_cfg = min_step_config(config, checkpoint_dir, checkpoint_every, keep_checkpoints, resume)
    log = train_guidance(base, guidance, dataset, found.weights, min_cfg, progress=progress,
                         bank=bank if config.use_bank else None)
    if config.alternations and not meta["given_weights"]:
        found, log = _alternate(base, guidance, dataset, bank, found, min_cfg, config, num_train_timesteps, log, progress)

    diagnostics = found.diagnostics
    if config.calibrate:
        meta["calibration"] = calibrate(base, guidance, dataset, losses, config, band_start, progress=progress and rank == 0)
        diagnostics = {**diagnostics, "warnings": list(diagnostics.get("warnings", [])) + meta["calibration"]["warnings"]}
    meta["diagnostics"] = diagnostics
    meta["t_min"] = t_min
    meta["band_start"] = band_start
    meta["min_step_seconds"] = log[-1].get("seconds")
    meta["processes"] = world
    result = {"weights": found.weights, "scores": found.scores, "losses": losses, "log": log, "meta": meta}

    if rank == 0:  # DDP keeps G identical on every rank: the main process writes the run
        write_run_folder(out, result, base, guidance, base_dir, copy_base, dataset.sample_ids, grid)
    barrier()
    return result
