"""Loading a model folder of any kind: the frozen base a debias run trains on (`load_base`) and
the (frozen base, G_psi) pair that sampling draws with (`load_model`).

Each dispatches once on `kinds.classify`, and a run folder's reference to its base is followed in
one place, models/base_reference.base_source. Nothing here imports the training side
(training.py, environments.py, calibration.py, debiasing.py): the sampling job and the server load
their models through this module, and serving must not depend on the debias orchestration.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from ..config import FROZEN_DTYPES, DebiasConfig
from ..errors import CheckpointError
from ..models.base import FrozenBase
from ..models.base_reference import base_source
from ..models.guidance import GuidanceModule
from ..models.sd import DTYPES, LatentDiffusionBase, looks_like_hub_id, set_attention
from .kinds import FolderKind, NotAModelFolder, classify


def _loads_as_latent_base(path: str) -> bool:
    """Whether the base at `path` is a Stable Diffusion model in latent space: an SD or pipeline
    folder, a run that refers to its base, or a hub id that may be downloaded. Anything else is
    left to FrozenBase.from_pretrained, which names what is wrong with it."""
    try:
        return classify(path).latent
    except NotAModelFolder:
        return looks_like_hub_id(path)


def load_base(path: str, config: Optional[DebiasConfig] = None, device=None) -> FrozenBase:
    """The frozen base at `path`: a Stable Diffusion folder (or hub id) loads as a latent-space
    LatentDiffusionBase with the config's dtype, attention and compile options; an invdiff base
    folder as the embedded FrozenBase."""
    config = config or DebiasConfig()
    if _loads_as_latent_base(path):
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


def _guidance_at(folder: str, frozen_unet) -> Optional[GuidanceModule]:
    """G_psi saved in `folder`, ready to sample with (eval, no gradients), or None without the
    folder. A LoRA G attaches its adapters to `frozen_unet`."""
    if not os.path.isdir(folder):
        return None
    from ..models.lora import load_guidance

    try:
        return load_guidance(folder, frozen_unet).eval().requires_grad_(False)
    except Exception as exc:
        raise CheckpointError(f"could not load G_psi from {folder!r}: {exc}") from exc


def load_model(path: str, base: Optional[str] = None, frozen_dtype: str = "fp32") -> Tuple[FrozenBase, Optional[GuidanceModule]]:
    """(frozen base, G_psi or None) from: an invdiff base folder, a debias run folder, a Stable
    Diffusion folder, or an InvDiffPipeline folder (a --copy-base SD run folder is one). An SD run
    folder that refers to its base loads it from where it was, or from `base` (the base moved),
    after checking its content hash (models/base_reference.py). frozen_dtype (fp32 | bf16 | fp16):
    the frozen parts' dtype (an SD base is read in it; an embedded base's UNet is cast); G stays
    in its own dtype."""
    if frozen_dtype not in FROZEN_DTYPES:
        raise ValueError(f"frozen_dtype must be fp32, bf16 or fp16, got {frozen_dtype!r}")
    # First, whatever the folder: a `base` given for any but a run that refers to its base is a ValueError.
    source, revision = base_source(path, base)
    kind = classify(path)
    if kind.latent:
        frozen = LatentDiffusionBase.from_pretrained(source, dtype=frozen_dtype, revision=revision).freeze()
        guidance = _guidance_at(os.path.join(path, "guidance"), frozen.unet)
        if guidance is None and kind is FolderKind.REFERRING_RUN:
            raise CheckpointError(f"run folder {path!r} has no guidance/ (G_psi)")
        return frozen, guidance
    if kind is FolderKind.RUN:
        frozen = FrozenBase.from_pretrained(os.path.join(path, "base"))
        guidance = _guidance_at(os.path.join(path, "guidance"), frozen.unet)
        if guidance is None:
            raise CheckpointError(f"run folder {path!r} has no guidance/ (G_psi)")
        frozen = frozen.freeze()
    else:  # FolderKind.BASE
        frozen, guidance = FrozenBase.from_pretrained(path).freeze(), None
    if frozen_dtype != "fp32":
        # An embedded base is small and stored in fp32: loaded so, then the frozen UNet is cast
        # (and with it any LoRA adapters on it: sampling is inference only).
        frozen.unet.to(DTYPES[frozen_dtype])
    return frozen, guidance
