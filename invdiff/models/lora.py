"""LoRA adapters (peft) on a copy of the frozen UNet: the second kind of G_psi.

    G_psi(x_t, t, c) = UNet_{theta + LoRA}(x_t, t, c) - eps_theta(x_t, t, c)

The LoRA branch is initialised to zero (peft's default B = 0), so G starts at 0 like the
zero-initialised UNet kind and combine(eps, G; r) starts at the frozen model; only the adapter
weights train. It fits large text-conditioned UNets, where a fresh narrow UNet would have to learn
the text pathway from scratch while LoRA reuses the frozen one. Saved with diffusers'
ModelMixin conventions (config.json + safetensors); the saved file holds the UNet copy too,
so for Stable Diffusion it is the UNet's size.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from diffusers import ConfigMixin, ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config

from ..ops.reference import check_ratio
from .guidance import combine_with_strength, gate_to_band

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class LoraGuidance(ModelMixin, ConfigMixin):
    """G_psi as LoRA adapters on the frozen UNet's attention projections."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, unet_config: Dict, ratio: float = 2.0, rank: int = 4, alpha: Optional[float] = None,
                 target_modules: Sequence[str] = DEFAULT_TARGETS, t_min: int = 0, band_start: int = 0):
        super().__init__()
        if t_min < 0:
            raise ValueError(f"t_min must be >= 0, got {t_min}")
        from peft import LoraConfig

        check_ratio(ratio)
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.unet = UNet2DConditionModel(**dict(unet_config))
        self.unet.requires_grad_(False)
        targets = list(target_modules)
        present = {name.rsplit(".", 1)[-1] for name, _ in self.unet.named_modules()} | {
            ".".join(name.split(".")[-2:]) for name, _ in self.unet.named_modules()}
        if not any(t in present for t in targets):
            raise ValueError(f"none of the LoRA target modules {targets} exist in this UNet (it has no attention?); "
                             "use the 'unet' kind of G_psi")
        self.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights=True, target_modules=targets))

    @classmethod
    def from_frozen(cls, frozen_unet, ratio: float = 2.0, rank: int = 4, t_min: int = 0, band_start: int = 0) -> "LoraGuidance":
        """Adapters on a copy of `frozen_unet` (its weights copied, its dtype kept at fp32 for training)."""
        g = cls(dict(frozen_unet.config), ratio=ratio, rank=rank, t_min=t_min, band_start=band_start)
        own = g.unet.state_dict()
        state = {}
        for key, value in getattr(frozen_unet, "_orig_mod", frozen_unet).state_dict().items():
            wrapped = key.rsplit(".", 1)[0] + ".base_layer." + key.rsplit(".", 1)[1]  # peft wraps adapted layers
            state[wrapped if wrapped in own else key] = value.float()
        missing, unexpected = g.unet.load_state_dict(state, strict=False)
        if unexpected or any("lora" not in k for k in missing):
            raise RuntimeError(f"copying the frozen UNet into the LoRA G failed: missing {missing[:3]}, unexpected {unexpected[:3]}")
        return g

    @property
    def ratio(self) -> float:
        return float(self.config.ratio)

    @property
    def t_min(self) -> int:
        return int(self.config.get("t_min", 0))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, prompt_embeds: torch.Tensor,
                frozen_output: Optional[torch.Tensor] = None) -> torch.Tensor:
        """sample: (B, C, H, W); timestep: (B,); prompt_embeds: (B, L, D); frozen_output: (B, C, H, W)
        the frozen prediction (required). Returns the adapted UNet's prediction minus it."""
        if frozen_output is None:
            raise ValueError("the LoRA G_psi is a residual on the frozen prediction: pass frozen_output")
        out = self.unet(sample, timestep, prompt_embeds).sample
        return gate_to_band(out - frozen_output.to(out.dtype), timestep, self.t_min)

    def combine(self, eps: torch.Tensor, g: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        return combine_with_strength(eps, g, self.ratio, strength)


def load_guidance(folder: str):
    """G_psi of either kind from a saved folder (its config names the class)."""
    import json
    import os

    from ..io import require_safetensors
    from .guidance import GuidanceModule

    with open(os.path.join(folder, "config.json")) as f:
        kind = json.load(f).get("_class_name", "GuidanceModule")
    cls = {"GuidanceModule": GuidanceModule, "LoraGuidance": LoraGuidance}.get(kind)
    if cls is None:
        raise ValueError(f"{folder!r} holds a {kind}, not an invdiff G_psi")
    require_safetensors(folder, "G_psi")
    return cls.from_pretrained(folder, use_safetensors=True)
