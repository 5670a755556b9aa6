"""G_psi: the lightweight guidance module trained on top of the frozen UNet.

G is a small diffusers UNet whose config is derived from the frozen UNet's (same in/out
channels, sample size and conditioning, narrower and shallower), with its output convolution
zero-initialised so that training starts from the frozen model exactly (residual branch) and G
only has to learn a correction. The combine ratio r lives in G's config, so training and
sampling cannot disagree about it.
"""
from __future__ import annotations

import copy
from typing import Dict

import torch
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from ..ops import guidance_combine
from ..ops.reference import check_ratio

# Width divisors per preset. "small" keeps G at roughly 1/16 of the frozen UNet's conv FLOPs
# (FLOPs scale with width squared), inside DESIGN.md's 10% budget.
PRESETS = {"tiny": 8, "small": 4, "medium": 2}


def guidance_unet_config(frozen_config: Dict, preset: str = "small") -> Dict:
    """A G_psi UNet config derived from the frozen UNet's: same I/O and conditioning, 1/divisor width."""
    if preset not in PRESETS:
        raise ValueError(f"unknown G_psi preset {preset!r}; choose from {sorted(PRESETS)}")
    div = PRESETS[preset]
    groups = 4
    widths = [max(groups, (c // div) // groups * groups) for c in frozen_config["block_out_channels"]]
    n = len(widths)
    cfg = {
        k: copy.deepcopy(frozen_config[k])
        for k in (
            "sample_size",
            "in_channels",
            "out_channels",
            "cross_attention_dim",
            "class_embed_type",
            "resnet_time_scale_shift",
        )
        if k in frozen_config
    }
    time_dim = frozen_config.get("time_embedding_dim") or frozen_config["block_out_channels"][0] * 4
    cfg.update(
        block_out_channels=widths,
        down_block_types=["DownBlock2D"] * n,
        up_block_types=["UpBlock2D"] * n,
        mid_block_type="UNetMidBlock2D",
        layers_per_block=1,
        norm_num_groups=groups,
        # With identity class embeddings the prompt vector is added to the time embedding, so G
        # keeps the frozen model's time-embedding width to accept the same prompt vectors.
        time_embedding_dim=time_dim,
    )
    return cfg


class GuidanceModule(ModelMixin, ConfigMixin):
    """G_psi(x_t, t, c) -> (B, C, H, W) correction, combined with the frozen eps by ratio r."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, unet_config: Dict, ratio: float = 2.0, preset: str = "small"):
        super().__init__()
        check_ratio(ratio)
        self.unet = UNet2DConditionModel(**unet_config)
        torch.nn.init.zeros_(self.unet.conv_out.weight)
        torch.nn.init.zeros_(self.unet.conv_out.bias)

    @classmethod
    def from_frozen(cls, frozen_unet_config: Dict, preset: str = "small", ratio: float = 2.0):
        return cls(unet_config=guidance_unet_config(dict(frozen_unet_config), preset), ratio=ratio, preset=preset)

    @property
    def ratio(self) -> float:
        return float(self.config.ratio)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """sample: (B, C, H, W); timestep: (B,); prompt_embeds: (B, L, D). Returns (B, C, H, W)."""
        kwargs = {}
        if self.unet.config.class_embed_type == "identity":
            kwargs["class_labels"] = prompt_embeds[:, 0]
        return self.unet(sample, timestep, prompt_embeds, **kwargs).sample

    def combine(self, eps: torch.Tensor, g: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """eps_tilde with the trained ratio r. `strength` s moves along the line from the frozen eps
        (s=0) to the trained combination (s=1) and past it (s>1), whichever branch r uses; it is
        the sampling-time guidance-strength sweep and leaves r itself untouched."""
        combined = guidance_combine(eps, g, self.ratio)
        if strength == 1.0:
            return combined
        return eps + strength * (combined - eps)
