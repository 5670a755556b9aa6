"""What one sample is: the scheduler that draws it and the shape of its latent.

Shared by the sampler (sampler.py) and the engine (engine.py), which must agree on both; kept
apart from either so that neither imports the other.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Tuple

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
)

from ..model_folders import check_image_size, check_sample_size  # noqa: F401 (check_image_size: re-exported)

if TYPE_CHECKING:
    from ..models.base import FrozenBase

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpm": DPMSolverMultistepScheduler,
}


def make_scheduler(name: str, base_config):
    """A sampling scheduler of kind `name` built from the base model's training scheduler config."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose from {sorted(SCHEDULERS)}")
    return SCHEDULERS[name].from_config(base_config)


def latent_shape(base: "FrozenBase", height: Optional[int] = None, width: Optional[int] = None) -> Tuple[int, int, int]:
    """(C, h, w) of the sample the sampler draws for height x width pixel images: divided by the
    VAE's factor for a latent base, as is in pixel space. None: the UNet's native sample_size (an
    integer, or a [height, width] pair)."""
    cfg = base.unet.config
    factor = getattr(base, "vae_factor", 1)
    native = check_sample_size(cfg.sample_size, "the UNet's config: 'sample_size'")  # (h, w): diffusers takes either
    sizes = []
    for side, (name, pixels) in enumerate((("height", height), ("width", width))):
        if pixels is None:
            sizes.append(native[side])
        else:
            check_image_size(int(pixels), factor, name)
            sizes.append(int(pixels) // factor)
    return (int(cfg.in_channels), *sizes)
