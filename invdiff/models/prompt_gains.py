"""Per-prompt gains on G_psi's correction, set by the label-free calibration (invdiff/calibration.py).

The calibration finds, for each training prompt, the factor gamma by which G's push must be
scaled for that prompt's samples to reach balance. Applying it inside G's forward (rather than in
each sampler) keeps every path that runs G, the engine, the pipeline and the service, equal
without any of them knowing about it: strength s = 1 is then the calibrated push.

G sees prompts only as embeddings, so a prompt is recognised by a key: a fixed random
projection of its flattened embedding (PROMPT_KEY_DIM numbers). A row whose key lies within
MATCH_TOLERANCE (relative distance) of a calibrated prompt's takes that prompt's gain; any other
prompt (a new one, or the empty prompt of classifier-free guidance) takes the default gain, the
median of the calibrated ones. The keys and gains live in G's config.json, so a saved G carries
them whatever its kind (a UNet G's weights or a LoRA G's adapters).
"""
from __future__ import annotations

import functools
from typing import Dict, Optional

import torch

from ..ops.reference import combine_coefficients

PROMPT_KEY_DIM = 32
KEY_SEED = 0x1DD1F
# Relative distance under which two keys are one prompt. A bf16 or fp16 text encoder changes an
# embedding by about 0.4% relative; two different prompts differ far more (tests/test_calibration.py).
MATCH_TOLERANCE = 0.02


@functools.lru_cache(maxsize=8)
def _projection(numel: int, device: torch.device) -> torch.Tensor:
    """(numel, PROMPT_KEY_DIM) fixed random projection, the same on every machine for a numel.
    Cached: G's forward asks for it at every sampling step (at Stable Diffusion size it is 1.9M
    draws, and a host-to-device copy)."""
    gen = torch.Generator().manual_seed(KEY_SEED + numel)
    return (torch.randn(numel, PROMPT_KEY_DIM, generator=gen, dtype=torch.float64) / numel ** 0.5).float().to(device)


def prompt_keys(prompt_embeds: torch.Tensor) -> torch.Tensor:
    """(B, L, D) prompt embeddings -> (B, PROMPT_KEY_DIM) fp32 keys."""
    flat = prompt_embeds.detach().reshape(prompt_embeds.shape[0], -1).float()
    return flat @ _projection(flat.shape[1], flat.device)  # a cached constant: callers must not modify it


def correction_gain_input(g: torch.Tensor, eps: torch.Tensor, gain: torch.Tensor, ratio: float) -> torch.Tensor:
    """G's output g' whose combined correction is `gain` times g's:
    combine(eps, g') - eps = gain * (combine(eps, g) - eps). With combine = a*eps + b*g that is
    g' = gain*g + (gain - 1)*(a - 1)/b * eps. g, eps: (B, C, H, W); gain: (B,)."""
    a, b = combine_coefficients(ratio)
    if a != 1.0 and eps is None:
        raise ValueError(f"with ratio r = {ratio} <= 1 a gain on G's correction needs the frozen prediction")
    gain = gain.to(g.dtype).view(-1, *([1] * (g.dim() - 1)))
    if a == 1.0:
        return g * gain
    return g * gain + (gain - 1.0) * ((a - 1.0) / b) * eps.to(g.dtype)


class PromptGains(torch.nn.Module):
    """The calibrated gains, from the `prompt_gains` entry of G's config ({"keys": (P, K) list,
    "gains": (P,) list, "default": float}) or None (every gain 1: uncalibrated)."""

    def __init__(self, record: Optional[Dict] = None):
        super().__init__()
        record = record or {}
        keys, gains = record.get("keys") or [], record.get("gains") or []
        if len(keys) != len(gains) or any(len(k) != PROMPT_KEY_DIM for k in keys):
            raise ValueError(f"prompt_gains in G's config is malformed: {len(keys)} keys of {PROMPT_KEY_DIM} numbers "
                             f"expected for {len(gains)} gains")
        values = [float(v) for v in gains] + [float(record.get("default", 1.0))]
        if not all(v >= 0 and v == v and v != float("inf") for v in values):
            raise ValueError("prompt_gains in G's config holds a negative or non-finite gain")
        # Not persistent: the config is their home, so weights files and LoRA adapters stay as they were.
        self.register_buffer("keys", torch.tensor(keys, dtype=torch.float32).view(-1, PROMPT_KEY_DIM), persistent=False)
        self.register_buffer("gains", torch.tensor(values[:-1], dtype=torch.float32), persistent=False)
        self.default = values[-1]
        # The gains act at t >= band_start only (0: at every t); G's correction below is left as trained.
        self.band_start = int(record.get("band_start", 0))
        if self.band_start < 0:
            raise ValueError("prompt_gains in G's config has a negative band_start")

    @property
    def active(self) -> bool:
        return self.gains.numel() > 0 or self.default != 1.0

    def forward(self, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B,) the gain of each row's prompt."""
        b = prompt_embeds.shape[0]
        out = torch.full((b,), self.default, device=prompt_embeds.device)
        if self.gains.numel() == 0:
            return out
        keys = prompt_keys(prompt_embeds)
        distance = torch.cdist(keys, self.keys.to(keys.device))
        nearest = distance.argmin(1)
        scale = self.keys.to(keys.device).norm(dim=1)[nearest].clamp_min(1e-12)
        matched = distance.gather(1, nearest[:, None]).squeeze(1) <= MATCH_TOLERANCE * scale
        return torch.where(matched, self.gains.to(keys.device)[nearest], out)

    def apply(self, g: torch.Tensor, eps: torch.Tensor, prompt_embeds: torch.Tensor, ratio: float,
              timestep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """G's output with each row's correction scaled by its prompt's gain (at t >= band_start).
        g, eps: (B, C, H, W); prompt_embeds: (B, L, D); timestep: (B,) or scalar."""
        if not self.active:
            return g
        gain = self(prompt_embeds)
        if self.band_start > 0:
            if timestep is None:
                raise ValueError("band-limited prompt gains need the timestep")
            t = timestep.reshape(-1).to(gain.device)
            gain = torch.where((t.expand(gain.shape[0]) if t.numel() == 1 else t) >= self.band_start, gain,
                               torch.ones_like(gain))
        return correction_gain_input(g, eps, gain, ratio)
