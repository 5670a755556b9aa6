"""G_psi: the lightweight guidance module trained on top of the frozen UNet.

G is a small diffusers UNet whose config is derived from the frozen UNet's (same in/out
channels, sample size and conditioning, narrower and shallower), with its output convolution
zero-initialised so that training starts from the frozen model exactly (residual branch) and G
only has to learn a correction. The combine ratio r lives in G's config, so training and
sampling cannot disagree about it.
"""
from __future__ import annotations

import copy
from typing import Dict, Optional

import torch
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.modeling_utils import ModelMixin

from ..ops import guidance_combine
from ..ops.reference import check_ratio, combine_coefficients
from .prompt_gains import PromptGains

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
    if any("CrossAttn" in b for b in frozen_config.get("down_block_types", [])):
        # A text-conditioned frozen UNet (Stable Diffusion): G keeps its block pattern, so it reads
        # the text through cross-attention too, at 1/divisor width. Heads shrink where the
        # narrower width no longer divides evenly.
        heads = frozen_config.get("attention_head_dim") or 8
        heads = heads[0] if isinstance(heads, (list, tuple)) else heads
        while heads > 1 and any(w % heads for w in widths):
            heads //= 2
        cfg.update(
            down_block_types=list(frozen_config["down_block_types"]),
            up_block_types=list(frozen_config["up_block_types"]),
            mid_block_type=frozen_config.get("mid_block_type") or "UNetMidBlock2DCrossAttn",
            attention_head_dim=heads,
        )
        cfg.pop("time_embedding_dim", None)
        cfg.pop("class_embed_type", None)
    return cfg


TIME_FEATURES = 64
SAMPLE_STATS = 3  # per channel: mean of x_t, mean and std of the frozen prediction


def sample_statistics(sample: torch.Tensor, frozen: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) x_t and frozen prediction -> (B, 3C) per-channel global statistics.

    Why the head reads them: the correction a reweighting asks for is sample-specific. Under the
    reweighted data, the posterior over the attribute given x_t moves by a factor that depends on
    the evidence for each attribute value in x_t (for a colour: how much of each channel the noise
    and the emerging strokes carry). A map that sees only (t, prompt) must apply one average
    correction to every sample, which blends attribute values instead of choosing one.
    Measured on colored digits, it did not lower the Frechet distance (418 against 428 with the
    head alone, docs/dev_runs), so it is off by default.
    """
    return torch.cat([sample.mean((2, 3)), frozen.mean((2, 3)), frozen.std((2, 3))], 1)
# The recalibration head: "affine" (A(t, c) @ eps + b(t, c)), "zero-sum" (A's rows sum to zero,
# no b), or "none" (the UNet body alone).
HEADS = ("affine", "zero-sum", "none")


def prompt_embeds_dim(unet_config: Dict) -> int:
    return int(unet_config["cross_attention_dim"])


def in_band(timestep: torch.Tensor, t_min: int, batch: int) -> torch.Tensor:
    """(B,) bool: which rows' timesteps lie in G_psi's band [t_min, T). timestep: (B,) or scalar."""
    t = timestep.reshape(-1)
    return (t.expand(batch) if t.numel() == 1 else t) >= t_min


def neutral_output(eps: torch.Tensor, ratio: float) -> torch.Tensor:
    """The G output that the combine with ratio r turns into the frozen eps itself: 0 for r > 1
    (eps + r*g), eps for r <= 1 (r*g + (1-r)*eps). eps: (B, C, H, W); returns the same shape.
    A zero there would be (1-r)*eps for r <= 1: a frozen prediction scaled down, not G switched off."""
    a, b = combine_coefficients(ratio)
    return torch.zeros_like(eps) if a == 1.0 else eps * ((1.0 - a) / b)


def gate_to_band(out: torch.Tensor, timestep: torch.Tensor, t_min: int, ratio: float = 2.0,
                 frozen_output: Optional[torch.Tensor] = None) -> torch.Tensor:
    """G's output outside its band replaced by `neutral_output`, so eps_tilde is the frozen eps
    there. out, frozen_output: (B, C, H, W); frozen_output is needed for r <= 1 only."""
    if t_min <= 0:
        return out
    rows = in_band(timestep, t_min, out.shape[0]).view(-1, 1, 1, 1)
    if combine_coefficients(ratio)[0] == 1.0:
        return out * rows.to(out.dtype)
    if frozen_output is None:
        raise ValueError(f"G with ratio r = {ratio} <= 1 acting from t_min = {t_min} needs the frozen prediction")
    return torch.where(rows, out, neutral_output(frozen_output.to(out.dtype), ratio))


def set_prompt_gains(guidance, record: Optional[Dict]) -> None:
    """Either kind of G: the calibration's gains (models/prompt_gains.py) into its config.json and
    its forward. record: {"keys", "gains", "default"} or None (uncalibrated)."""
    gains = PromptGains(record)  # checks the record before anything changes
    guidance.register_to_config(prompt_gains=record)
    device = next(guidance.parameters(), torch.empty(0)).device
    guidance.calibrated_gains = gains.to(device)


def combine_with_strength(eps: torch.Tensor, g: torch.Tensor, ratio: float, strength: float = 1.0) -> torch.Tensor:
    """eps_tilde with the trained ratio r, for either kind of G_psi. `strength` s moves along the
    line from the frozen eps (s=0) to the trained combination (s=1) and past it (s>1), whichever
    branch r uses; it is the sampling-time guidance-strength sweep and leaves r itself untouched.
    eps, g: (B, C, H, W)."""
    combined = guidance_combine(eps, g, ratio)
    if strength == 1.0:
        return combined
    return eps + strength * (combined - eps)


class GuidanceModule(ModelMixin, ConfigMixin):
    """G_psi(x_t, t, c) -> (B, C, H, W) correction, combined with the frozen eps by ratio r."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, unet_config: Dict, ratio: float = 2.0, preset: str = "small", sees_frozen_output: bool = True,
                 t_min: int = 0, head_kind: str = "affine", body: bool = True, head_sees_sample: bool = False,
                 band_start: int = 0, prompt_gains: Optional[Dict] = None):
        super().__init__()
        check_ratio(ratio)
        self.calibrated_gains = PromptGains(prompt_gains)  # identity until the calibration sets them
        if head_kind not in HEADS:
            raise ValueError(f"unknown recalibration head {head_kind!r}; choose from {HEADS}")
        if not body and (head_kind == "none" or not sees_frozen_output):
            raise ValueError("a G_psi without its UNet body needs the recalibration head (and the frozen output)")
        if t_min < 0:
            raise ValueError(f"t_min must be >= 0, got {t_min}")
        unet_config = dict(unet_config)
        if sees_frozen_output:
            # G reads the frozen model's prediction beside x_t. The correction InvDiff needs
            # (e.g. "this digit's predicted colour, partly swapped") is then a simple function
            # of its input; without it a zero-initialised G barely moved in 400 steps (measured).
            unet_config["in_channels"] = 2 * unet_config["in_channels"]
        # The UNet body: spatial, sample-specific corrections. body=False leaves the head alone
        # (no UNet at all: sampling then costs G almost nothing).
        self.unet = UNet2DConditionModel(**unet_config) if body else None
        if body:
            torch.nn.init.zeros_(self.unet.conv_out.weight)
            torch.nn.init.zeros_(self.unet.conv_out.bias)
        channels = unet_config["out_channels"]
        if sees_frozen_output and head_kind != "none":
            # The recalibration head: a per-(t, prompt) affine map of the frozen prediction,
            # A(t, c) @ eps_frozen + b(t, c), over channels. A global attribute (a colour, a
            # latent-space style direction) is a channel-space shift, which this head expresses
            # with a few parameters reached in one step of backprop, while the UNet body learns
            # spatial corrections. Zero-initialised like the UNet's output.
            emb_dim = prompt_embeds_dim(unet_config)
            self.head = torch.nn.Sequential(
                torch.nn.Linear(emb_dim + TIME_FEATURES + (SAMPLE_STATS * channels if head_sees_sample else 0), 128),
                torch.nn.SiLU(),
                torch.nn.Linear(128, channels * channels + channels),
            )
            torch.nn.init.zeros_(self.head[-1].weight)
            torch.nn.init.zeros_(self.head[-1].bias)
        else:
            self.head = None

    @classmethod
    def from_frozen(cls, frozen_unet_config: Dict, preset: str = "small", ratio: float = 2.0, sees_frozen_output: bool = True,
                    t_min: int = 0, head_kind: str = "affine", body: bool = True, head_sees_sample: bool = False,
                    band_start: int = 0):
        return cls(
            unet_config=guidance_unet_config(dict(frozen_unet_config), preset),
            ratio=ratio,
            preset=preset,
            sees_frozen_output=sees_frozen_output,
            t_min=t_min,
            head_kind=head_kind,
            body=body,
            head_sees_sample=head_sees_sample,
            band_start=band_start,
        )

    @property
    def ratio(self) -> float:
        return float(self.config.ratio)

    @property
    def t_min(self) -> int:
        """G acts for t >= t_min only (environments.guidance_band); 0 = every t."""
        return int(self.config.get("t_min", 0))

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, prompt_embeds: torch.Tensor, frozen_output: torch.Tensor | None = None
    ) -> torch.Tensor:
        """sample: (B, C, H, W) x_t; timestep: (B,); prompt_embeds: (B, L, D); frozen_output:
        (B, C, H, W) the frozen model's prediction, required when config.sees_frozen_output.
        Returns (B, C, H, W): `finish` of `body_output`."""
        return self.finish(self.body_output(sample, timestep, prompt_embeds, frozen_output), timestep, prompt_embeds,
                           frozen_output, sample)

    def body_output(self, sample: torch.Tensor, timestep: torch.Tensor, prompt_embeds: torch.Tensor,
                    frozen_output: torch.Tensor | None = None) -> torch.Tensor:
        """G's UNet body alone (shapes as `forward`): (B, C, H, W) in G's dtype, zeros without a
        body. Nearly all of G's cost; sampling may run it at every k-th step only and reuse its
        output between (sampling.GuidedSchedule.guidance_every), while `finish` runs every step."""
        if self.config.sees_frozen_output:
            if frozen_output is None:
                raise ValueError("this G_psi reads the frozen model's prediction: pass frozen_output")
        # G runs in its own dtype (fp32): with a bf16/fp16 frozen base, x_t and the prompt embeddings
        # (from the frozen text encoder) arrive in the frozen dtype. No-ops when everything is fp32.
        dtype = next(self.parameters()).dtype  # not ModelMixin.dtype, which walks every submodule per call
        sample, prompt_embeds = sample.to(dtype), prompt_embeds.to(dtype)
        if self.unet is None:
            return torch.zeros_like(frozen_output, dtype=sample.dtype)
        unet_in = torch.cat([sample, frozen_output.to(sample.dtype)], dim=1) if self.config.sees_frozen_output else sample
        kwargs = {}
        if self.unet.config.class_embed_type == "identity":
            kwargs["class_labels"] = prompt_embeds[:, 0]
        return self.unet(unet_in, timestep, prompt_embeds, **kwargs).sample

    def finish(self, out: torch.Tensor, timestep: torch.Tensor, prompt_embeds: torch.Tensor,
               frozen_output: torch.Tensor | None = None, sample: torch.Tensor | None = None) -> torch.Tensor:
        """G's output from its body's output `out` (B, C, H, W): the recalibration head's affine
        map of this step's frozen prediction, the calibrated gains and the band gate. Cheap (per
        (t, prompt) maps over channels), and read from the current frozen prediction, which
        changes from step to step far more than the body's correction does. sample: x_t, read
        only by a head that sees sample statistics."""
        prompt_embeds = prompt_embeds.to(out.dtype)
        if self.head is None:
            return gate_to_band(self.calibrated_gains.apply(out, frozen_output, prompt_embeds, self.ratio, timestep), timestep,
                                self.t_min, self.ratio, frozen_output)
        b, c = out.shape[:2]
        t = timestep.reshape(-1).expand(b) if timestep.numel() == 1 else timestep
        feats = [get_timestep_embedding(t, TIME_FEATURES).to(out.dtype), prompt_embeds.mean(1).to(out.dtype)]
        if self.config.get("head_sees_sample", False):
            feats.append(sample_statistics(sample.to(out.dtype), frozen_output.to(out.dtype)))
        feats = torch.cat(feats, 1)
        params = self.head(feats)
        mix, shift = params[:, : c * c].view(b, c, c), params[:, c * c :]
        if self.config.get("head_kind", "affine") == "zero-sum":
            # Rows summing to zero and no shift: a pixel whose channels are equal (a grey or black
            # background, in pixel space) is left alone; only the differences between channels
            # (the chroma) are remapped.
            mix, shift = mix - mix.mean(2, keepdim=True), torch.zeros_like(shift)
        frozen = frozen_output.to(out.dtype)
        out = out + torch.einsum("bij,bjhw->bihw", mix, frozen) + shift.view(b, c, 1, 1)
        return gate_to_band(self.calibrated_gains.apply(out, frozen, prompt_embeds, self.ratio, timestep), timestep,
                            self.t_min, self.ratio, frozen)

    def set_prompt_gains(self, record: Optional[Dict]) -> None:
        """Record the calibration's per-prompt gains in G's config and use them from now on."""
        set_prompt_gains(self, record)

    def combine(self, eps: torch.Tensor, g: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        return combine_with_strength(eps, g, self.ratio, strength)
