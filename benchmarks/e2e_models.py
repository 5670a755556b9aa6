"""Models for the end-to-end comparison with the official InvDiff approach (e2e_train.py,
e2e_sample.py), written from the paper's and repository's description, not from their code.

- `small`: the shipped p = 0.9 colored-digits base (a real trained model; 16x16, 3 channels).
- `sd15`: a UNet with Stable Diffusion 1.5's config (random weights: same shapes and FLOPs) at
  64x64 latents with 77x768 text embeddings; for a lent GPU.

The official G is a trainable full-size copy of the frozen UNet with its output conv zeroed,
combined as eps + r * G (it does not read the frozen prediction). invdiff's G_psi is the default
lightweight module (`GuidanceModule.from_frozen`, preset "small").
"""
from __future__ import annotations

import os
import sys
from typing import Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from invdiff.models.base import FrozenBase  # noqa: E402
from invdiff.models.guidance import GuidanceModule  # noqa: E402


class OfficialG(torch.nn.Module):
    """A full-size trainable copy of the frozen UNet, output conv zeroed: g = UNet'(x_t, t, c)."""

    def __init__(self, frozen_unet):
        super().__init__()
        import copy

        # A copy, not a new UNet loaded with the frozen weights: at SD 1.5 size a fresh UNet's
        # random init alone took seconds of the GPU check's budget.
        self.unet = copy.deepcopy(frozen_unet).train().requires_grad_(True)
        torch.nn.init.zeros_(self.unet.conv_out.weight)
        torch.nn.init.zeros_(self.unet.conv_out.bias)
        self.ratio = 2.0

    def forward(self, sample, timestep, prompt_embeds, frozen_output=None):
        kwargs = {}
        if self.unet.config.class_embed_type == "identity":
            kwargs["class_labels"] = prompt_embeds[:, 0]
        return self.unet(sample, timestep, prompt_embeds, **kwargs).sample

    def combine(self, eps, g, strength: float = 1.0):
        return eps + strength * self.ratio * g


class _TextTable(torch.nn.Module):
    """Fixed random 'text embeddings' per prompt id, (P+1, L, D), for the sd15 config."""

    def __init__(self, prompts: int, length: int, width: int):
        super().__init__()
        self.register_buffer("table", torch.randn(prompts + 1, length, width, generator=torch.Generator().manual_seed(0)))
        self.null_id = prompts

    def forward(self, ids):
        return self.table[ids]


def latent_shape(config: str) -> Tuple[int, int, int]:
    """(C, H, W) of one sample of the config's frozen UNet, without building it."""
    if config == "small":
        import json

        from invdiff.demo import shipped_base

        with open(os.path.join(shipped_base(0.9), "unet", "config.json")) as f:
            cfg = json.load(f)
        return cfg["in_channels"], cfg["sample_size"], cfg["sample_size"]
    return 4, 64, 64


def build(config: str, device: str, frozen_dtype: torch.dtype = torch.float32) -> Tuple[FrozenBase, int]:
    """(frozen base on `device`, number of prompts)."""
    if config == "small":
        from invdiff.demo import shipped_base

        base = FrozenBase.from_pretrained(shipped_base(0.9))
        prompts = base.conditioner.null_id
    elif config == "sd15":
        from diffusers import DDPMScheduler, UNet2DConditionModel

        torch.manual_seed(0)
        unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64)
        base = FrozenBase(unet, _TextTable(10, 77, 768), DDPMScheduler(beta_schedule="scaled_linear"))
        prompts = 10
    else:
        raise ValueError(f"unknown config {config!r}; choose small or sd15")
    base.unet.to(device=device, dtype=frozen_dtype)
    base.conditioner.to(device)
    return base.freeze(), prompts


SD15_BANK_N = 1000  # samples the sd15 config's bank is built for (it has no dataset of its own)


def dataset_size(config: str) -> int:
    """N for the bank's build: small, the colored-digits train split the shipped base was
    trained on (what `invdiff debias` builds the bank for); sd15, SD15_BANK_N."""
    if config == "small":
        from invdiff.data import colored_digits

        return len(colored_digits("train", p=0.9))
    return SD15_BANK_N


def dataset(config: str, n: int):
    """n training samples for the config's frozen base: small, the first n of the colored-digits
    train split; sd15, random 4 x 64 x 64 latents with 10 prompts (the bank's cost does not
    depend on their values)."""
    if config == "small":
        from invdiff.data import colored_digits

        data = colored_digits("train", p=0.9)
        return data.subset(torch.arange(min(n, len(data))))
    from invdiff.data.base import DiffusionDataset

    gen = torch.Generator().manual_seed(0)
    return DiffusionDataset(images=torch.randn(n, 4, 64, 64, generator=gen), prompt_ids=torch.arange(n) % 10,
                            prompts=[f"prompt {i}" for i in range(10)], sample_ids=torch.arange(n), name="sd15-random-latents")


def official_g(base: FrozenBase, device: str) -> OfficialG:
    return OfficialG(base.unet).to(device=device, dtype=torch.float32)


def invdiff_g(base: FrozenBase, device: str, preset: str = "small") -> GuidanceModule:
    torch.manual_seed(0)
    return GuidanceModule.from_frozen(base.unet.config, preset=preset, ratio=2.0).to(device)


def unet_flops(unet, prompt_width: int, text_length: int, device: str) -> int:
    """Forward FLOPs of one image (batch 1), counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = unet.config
    x = torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=device, dtype=unet.dtype)
    embeds = torch.randn(1, text_length, prompt_width, device=device, dtype=unet.dtype)
    kwargs = {"class_labels": embeds[:, 0]} if cfg.class_embed_type == "identity" else {}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor([500], device=device), embeds, **kwargs)
    return int(counter.get_total_flops())


def measured_peak_flops(device: str, dtype: torch.dtype) -> float:
    """Matrix-product throughput of this device in `dtype` (FLOP/s): the roofline for the
    sampler's 'fraction of peak'."""
    import time

    n = 4096 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    reps = 20 if device == "cuda" else 5
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)
