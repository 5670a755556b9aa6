"""Writing a debias run folder: whether a run may write to its --out at all, how the folder holds
its base, and the write itself, staged so that the folder is written whole or not at all.

A run folder on an embedded base is self-contained:

    RUN_DIR/invdiff_run.json        what was run (base, data, K, lambda, r, steps, seeds)
    RUN_DIR/base/                   a copy of the frozen base model (a few MB)
    RUN_DIR/guidance/               G_psi, diffusers-style (config.json holds r)
    RUN_DIR/losses.safetensors      the frozen model's (N, T) losses and the t grid, by sample id
    RUN_DIR/environments.safetensors  W (N, K) by sample id, with diagnostics in its metadata
    RUN_DIR/train_log.json          the min step's per-step loss, group risks and variance
    RUN_DIR/inspect/                what the max step found, in pictures: report.md, report.json,
                                    scores.png, groups/<prompt>.png (inspection.py; as `invdiff inspect`)

On a Stable Diffusion base (gigabytes) it holds no copy of the base: invdiff_run.json records the
base's place and content hash ("base_reference", models/base_reference.py), checked on every
load, and README.md is a model card. With copy_base (`invdiff debias --copy-base`) it is instead
a whole InvDiffPipeline folder, the base's unet/ vae/ text_encoder/ tokenizer/ scheduler/ copied in.
"""
from __future__ import annotations

import os
import shutil
import warnings
from typing import Dict

import torch

from ..config import describe_changes
from ..environments import save_environments
from ..inspection import INSPECT_DIR, write_run_inspection
from ..io import CheckpointError, atomic_save_file, atomic_write_json, read_json, staged_directory
from ..models.base import FrozenBase
from ..models.base_reference import REFERENCE_KEY, describe_base
from .kinds import RUN_META


def check_output_dir(out: str, meta: Dict, overwrite: bool = False) -> None:
    """Refuse to write over a folder that invdiff did not make as a run (outputs.py: with or
    without `overwrite`), or, without `overwrite`, a run with other settings."""
    from ..outputs import check_output_folder

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


def refer_to_base(meta: Dict, source: str) -> bool:
    """Record in the run's `meta` where its Stable Diffusion base, loaded from `source` (a folder
    or a hub id), is and what it holds (REFERENCE_KEY), so that the run folder need not copy it.
    Call it as the base is loaded: the hash then reads files likely still in the page cache.
    False, with a RuntimeWarning and nothing recorded, when the hub cache does not show which
    commit of `source` was loaded: the run folder must then hold a copy of its base."""
    reference = describe_base(source)
    if reference is None:
        # stacklevel 3: the warning points at debias's caller
        warnings.warn(f"the hub cache does not show which commit of {source!r} was loaded, so a run folder "
                      "could not check it on load: the base is copied into the run folder", RuntimeWarning, stacklevel=3)
        return False
    meta[REFERENCE_KEY] = reference
    return True


def write_run_folder(out: str, result: Dict, base: FrozenBase, guidance, base_dir: str, copy_base: bool,
                     sample_ids: torch.Tensor, timesteps: torch.Tensor) -> None:
    """Write the run folder `out` (see the module's docstring), staged: all of it or nothing.

    result: what debias returns, {"weights": (N, K), "scores": (N,), "losses": (N, T) or None,
    "log": [...], "meta": {...}}; meta["diagnostics"] goes into environments.safetensors' metadata.
    base, base_dir: the frozen base as loaded and the folder it came from (an embedded base is
    copied from there). copy_base: a Stable Diffusion base is copied in (a whole InvDiffPipeline
    folder) rather than referred to by meta[REFERENCE_KEY]. sample_ids: (N,) the rows' sample ids;
    timesteps: (T,) the loss grid."""
    meta = result["meta"]
    with staged_directory(out, kind="run") as stage:
        if hasattr(base, "decode_latents"):  # InvDiffPipeline.from_pretrained loads the run folder, with or without a copy of its base
            from ..pipeline import save_pipeline_folder, save_referring_folder

            if copy_base:
                save_pipeline_folder(stage, base, guidance, final_path=out)
            else:
                save_referring_folder(stage, guidance, meta[REFERENCE_KEY], final_path=out)
        else:
            shutil.copytree(base_dir, os.path.join(stage, "base"))
            guidance.save_pretrained(os.path.join(stage, "guidance"))
        save_environments(os.path.join(stage, "environments.safetensors"), result["weights"], sample_ids,
                          result["scores"], meta["diagnostics"])
        if result["losses"] is not None:
            atomic_save_file(
                {"losses": result["losses"], "timesteps": timesteps, "sample_ids": sample_ids},
                os.path.join(stage, "losses.safetensors"),
            )
        atomic_write_json(os.path.join(stage, "train_log.json"), {"log": result["log"]})
        # The groups the min step trained on, in pictures: a few seconds, from what is at hand
        # (the training images are loaded again from the run's data record, only those shown).
        write_run_inspection(os.path.join(stage, INSPECT_DIR), result, sample_ids)
        atomic_write_json(os.path.join(stage, RUN_META), meta)
