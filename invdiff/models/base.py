"""The frozen base model: a diffusers UNet, its prompt conditioner and its noise scheduler.

On disk it follows diffusers conventions, one folder per component saved with
`save_pretrained` (config.json + safetensors), plus `invdiff_base.json` describing how it was
trained:

    BASE_DIR/unet/  BASE_DIR/conditioner/  BASE_DIR/scheduler/  BASE_DIR/invdiff_base.json
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from ..io import CheckpointError, apply_umask, atomic_write_json, require_safetensors
from ..model_folders import BASE_META, read_json_object, read_unet_config  # BASE_META: re-exported
from .conditioner import PromptEmbedding


def base_unet_config(resolution: int = 16, channels: int = 3, widths=(16, 32, 64), embedding_dim: int = 64) -> Dict:
    """The default frozen-UNet architecture for the embedded benchmark.

    Attention-free on purpose: at 16x16 on 2 CPU cores a diffusers UNet with cross-attention costs
    ~1.3 s per training step at batch 128 (measured), the same widths without attention ~0.5 s.
    The prompt enters as an identity class embedding added to the time embedding.
    """
    n = len(widths)
    return dict(
        sample_size=resolution,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=list(widths),
        down_block_types=["DownBlock2D"] * n,
        up_block_types=["UpBlock2D"] * n,
        mid_block_type="UNetMidBlock2D",
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=embedding_dim,
        class_embed_type="identity",
        time_embedding_dim=embedding_dim,
        # FiLM (scale and shift) conditioning: with plain additive time/prompt embeddings the
        # prompt->colour association stayed weak (a p=0.9 base drew odd digits in their majority
        # colour only ~50% of the time at w=1 after 2500 steps; measured).
        resnet_time_scale_shift="scale_shift",
    )


def default_scheduler(num_train_timesteps: int = 1000, prediction_type: str = "v_prediction") -> DDPMScheduler:
    """Cosine schedule with v-prediction by default.

    Why v: the spurious attribute (stroke colour) is decided at high noise, where an
    eps-prediction loss weights errors in the clean image by alpha_bar / (1 - alpha_bar) ~ 0; the
    eps base above came out unfaithful to its data (majority share 0.47-0.87 at p=0.9, w=1). The v
    target weights the clean image ~1 there.
    """
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="squaredcos_cap_v2",
        prediction_type=prediction_type,
        clip_sample=True,
    )


def training_target(scheduler, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The model's own training target: the noise for epsilon-prediction, v for v-prediction."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(sample, noise, timesteps)
    if kind == "sample":
        return sample
    raise ValueError(f"unsupported prediction_type {kind!r}")


class FrozenBase(torch.nn.Module):
    """The frozen eps_theta with its conditioner. eps(): (B,C,H,W), (B,), (B,L,D) -> (B,C,H,W)."""

    def __init__(self, unet: UNet2DConditionModel, conditioner: PromptEmbedding, scheduler, meta: Optional[Dict] = None):
        super().__init__()
        self.unet = unet
        self.conditioner = conditioner
        self.scheduler = scheduler
        self.meta = dict(meta or {})

    @property
    def prompts(self):
        return list(self.conditioner.config.prompts)

    def freeze(self) -> "FrozenBase":
        """requires_grad off and eval mode for the frozen weights. LoRA adapters that a G_psi attached
        to the UNet (models/lora.py) are G's parameters, not the base's: they keep their requires_grad,
        so that freezing the base in the min step does not freeze G."""
        adapters = [(p, p.requires_grad) for name, p in self.named_parameters() if ".lora_" in name]
        self.requires_grad_(False)
        for p, flag in adapters:
            p.requires_grad_(flag)
        self.eval()
        return self

    def prompt_embeds(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        return self.conditioner(prompt_ids)

    def eps(self, sample: torch.Tensor, timestep: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """The frozen UNet in its own dtype (a bf16/fp16 UNet next to an fp32 conditioner, as in
        benchmarks/e2e_models.py), fp32 out for G and the loss, as LatentDiffusionBase.eps. For an
        fp32 UNet every cast is a no-op, so its eps stays bit-identical."""
        out = self.eps_native(sample, timestep, prompt_embeds)
        return out.to(torch.promote_types(out.dtype, torch.float32))  # bf16/fp16 -> fp32; fp64 stays

    def eps_native(self, sample: torch.Tensor, timestep: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """`eps` in the UNet's own dtype: what the sampling engine feeds the fused step, which
        reads a bf16/fp16 model output next to its fp32 state (no fp32 copy)."""
        dtype = self.unet.dtype
        sample, prompt_embeds = sample.to(dtype), prompt_embeds.to(dtype)
        kwargs = {}
        if self.unet.config.class_embed_type == "identity":
            kwargs["class_labels"] = prompt_embeds[:, 0]
        return self.unet(sample, timestep, prompt_embeds, **kwargs).sample

    def save_pretrained(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        for part in ("unet", "conditioner", "scheduler"):
            getattr(self, part).save_pretrained(os.path.join(directory, part))
            apply_umask(os.path.join(directory, part))  # safetensors writes its files 0600
        atomic_write_json(os.path.join(directory, BASE_META), self.meta)

    @classmethod
    def from_pretrained(cls, directory: str) -> "FrozenBase":
        if not os.path.isdir(directory):
            raise CheckpointError(f"base model folder {directory!r} does not exist")
        for part in ("unet", "conditioner", "scheduler"):
            if not os.path.isdir(os.path.join(directory, part)):
                raise CheckpointError(f"{directory!r} is not an invdiff base model: missing {part}/")
        meta = read_json_object(os.path.join(directory, BASE_META), what="base model metadata")
        # Checked before diffusers reads it: a damaged UNet config is one line naming the file and
        # the key, not a diffusers traceback, nor a bad size found only when sampling.
        read_unet_config(os.path.join(directory, "unet"))
        require_safetensors(os.path.join(directory, "unet"), "the base model's UNet")
        require_safetensors(os.path.join(directory, "conditioner"), "the base model's conditioner")
        try:
            unet = UNet2DConditionModel.from_pretrained(os.path.join(directory, "unet"), use_safetensors=True)
            conditioner = PromptEmbedding.from_pretrained(os.path.join(directory, "conditioner"), use_safetensors=True)
            scheduler = DDPMScheduler.from_pretrained(os.path.join(directory, "scheduler"))
        except Exception as exc:  # corrupt safetensors, truncated json, ...
            # One line: diffusers' messages may span several.
            raise CheckpointError(f"could not load the base model in {directory!r}: {' '.join(str(exc).split())}") from exc
        return cls(unet, conditioner, scheduler, meta)
