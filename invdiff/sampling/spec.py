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


def check_image_size(pixels: int, factor: int, name: str = "height") -> None:
    """A sampled image's height or width must be a whole number of latent cells (`factor` pixels
    each, the VAE's downsampling factor; 1 in pixel space): ValueError otherwise."""
    if pixels < 1 or pixels % factor:
        nearest = max(factor, pixels // factor * factor)
        raise ValueError(f"{name} {pixels} is not a multiple of the VAE's downsampling factor {factor}; "
                         f"use a multiple of {factor} (e.g. {nearest})")


def latent_shape(base: "FrozenBase", height: Optional[int] = None, width: Optional[int] = None) -> Tuple[int, int, int]:
    """(C, h, w) of the sample the sampler draws for height x width pixel images: divided by the
    VAE's factor for a latent base, as is in pixel space. None: the UNet's native sample_size."""
    cfg = base.unet.config
    factor = getattr(base, "vae_factor", 1)
    sizes = []
    for name, pixels in (("height", height), ("width", width)):
        if pixels is None:
            sizes.append(int(cfg.sample_size))
        else:
            check_image_size(int(pixels), factor, name)
            sizes.append(int(pixels) // factor)
    return (int(cfg.in_channels), *sizes)
