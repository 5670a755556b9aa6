"""Guided sampling with any diffusers scheduler.

Guidance is a model wrapper (k-diffusion style), not a fork of a pipeline: `GuidedDenoiser`
returns eps_tilde = combine(eps_theta, G_psi; r) and is used for both the conditional and the
unconditional branch; classifier-free guidance is applied on top of the two eps_tilde.

`sample` runs the continuous-batching engine (sampling/engine.py) with the fused guided step;
`guided_loop` is the plain loop over `scheduler.step`: `sample_unfused` runs it (the oracle the
engine is tested against, and the eager baseline of the benchmarks) and so does InvDiffPipeline.
Both take their timesteps, per-step eta and latent shape from schedule.guided_schedule.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, List, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from ..config import DEFAULT_GUIDANCE_EVERY
from ..models.base import FrozenBase
from ..models.guidance import GuidanceModule, in_band, neutral_output
from ..ops import cfg_combine
from .engine import Request, SamplingEngine
from .schedule import GuidedSchedule, guided_schedule
# Re-exported: their home was this module (sampling/__init__.py's table still names it).
from .schedule import STOCHASTIC_BELOW_BAND, attribute_band_start, below_band_eta  # noqa: F401
from .spec import make_scheduler


class GuidedDenoiser(torch.nn.Module):
    """eps_tilde(x, t, c) = combine(eps_theta(x, t, c), G_psi(x, t, c); r), or eps_theta alone."""

    def __init__(self, base: FrozenBase, guidance: Optional[GuidanceModule] = None, strength: float = 1.0):
        super().__init__()
        self.base = base
        self.guidance = guidance
        self.strength = strength

    @torch.no_grad()
    def branches(self, sample: torch.Tensor, timestep: torch.Tensor, prompt_embeds: torch.Tensor, native: bool = False,
                 run_guidance: Optional[bool] = None, fresh: Optional[torch.Tensor] = None, body: Optional[torch.Tensor] = None):
        """(eps_theta, G_psi's output or None), uncombined: the fused step combines them.
        sample: (B, C, H, W); timestep: (B,); prompt_embeds: (B, L, D). run_guidance: whether G
        runs (None: unless the strength is 0); the engine, whose slots each have a strength of
        their own, runs it when any slot's strength is not 0.

        Reuse (GuidedSchedule.guidance_every), when `fresh` is given: fresh (B,) bool, the rows
        whose G body (GuidanceModule.body_output, nearly all of G's cost) runs now; body
        (B, C, H, W) in G's dtype, each row's body output from the last step that ran it (None:
        zeros). Every row in G's band then gets G's `finish` (head, gains, band gate) on this
        step's frozen prediction. Returns (eps, g, body), body updated in place for the fresh rows.

        native=False: both in fp32 (or wider), as G and the combine take them. native=True: both in
        the frozen UNet's dtype, for the engine's fused step, which reads a bf16/fp16 model output
        next to its fp32 state: the UNet's output is not copied to fp32, and G's output is rounded
        to that dtype (an error of the size the frozen output already carries). An fp32 UNet gives
        the same tensors either way."""
        raw = self.base.eps_native(sample, timestep, prompt_embeds)
        eps = raw.to(torch.promote_types(raw.dtype, torch.float32))  # what G reads: a no-op for fp32
        out = raw if native else eps
        if run_guidance is None:
            run_guidance = self.strength != 0.0
        reusing = fresh is not None
        if self.guidance is None or not run_guidance:
            return (out, None, body) if reusing else (out, None)
        rows = in_band(timestep, self.guidance.t_min, eps.shape[0])
        if not bool(rows.any()):  # outside G's band (guidance_band): the frozen model alone, G not run
            return (out, None, body) if reusing else (out, None)
        t = timestep.reshape(-1).expand(eps.shape[0]) if timestep.numel() == 1 else timestep
        every = bool(rows.all())
        sel, t_sel = (slice(None), timestep) if every else (rows, t[rows])  # the rows G acts on (a view when all)
        if reusing:
            if body is None:
                body = torch.zeros(eps.shape, dtype=next(self.guidance.parameters()).dtype, device=eps.device)
            run = rows & fresh.to(rows.device)
            if bool(run.all()):
                body.copy_(self.guidance.body_output(sample, timestep, prompt_embeds, eps))
            elif bool(run.any()):
                body[run] = self.guidance.body_output(sample[run], t[run], prompt_embeds[run], eps[run]).to(body.dtype)
            g_out = self.guidance.finish(body[sel], t_sel, prompt_embeds[sel], eps[sel], sample[sel])
        else:
            g_out = self.guidance(sample[sel], t_sel, prompt_embeds[sel], eps[sel])
        if not every:
            # rows outside the band get the output that combines to the frozen eps (0 for r > 1)
            full = neutral_output(eps, self.guidance.ratio)
            full[rows] = g_out.to(full.dtype)
            g_out = full
        return (out, g_out.to(out.dtype), body) if reusing else (out, g_out.to(out.dtype))

    @torch.no_grad()
    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        eps, g = self.branches(sample, timestep, prompt_embeds)
        return eps if g is None else self.guidance.combine(eps, g, self.strength)


def initial_noise(shape, seeds: Sequence[int]):
    """(N, C, H, W) starting noise and the N per-image generators it came from.

    One generator per image, kept for the scheduler's own noise (DDPM, DDIM with eta > 0, Euler
    ancestral), so an image depends on its seed only, not on its batch or position.
    """
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return torch.stack([torch.randn(shape, generator=g) for g in gens]), gens


def sampling_engine(denoiser: GuidedDenoiser, scheduler: str = "ddim", max_batch: int = 64, *, device=None, eta: float = 0.0,
                    eta_below: Optional[float] = None, band_start: Optional[int] = None,
                    height: Optional[int] = None, width: Optional[int] = None,
                    guidance_every: int = DEFAULT_GUIDANCE_EVERY) -> SamplingEngine:
    """The engine `sample`, `invdiff sample --prompts` and `invdiff serve` all sample with: the
    schedule of `guided_schedule` (per-step eta, image size), the one the plain loop samples with.
    Building it in one place is what keeps their images equal for the same request."""
    schedule = guided_schedule(denoiser, scheduler, eta=eta, eta_below=eta_below, band_start=band_start, height=height, width=width,
                               guidance_every=guidance_every)
    return SamplingEngine(denoiser, scheduler, max_batch=max_batch, device=device, schedule=schedule)


@torch.no_grad()
def sample(
    denoiser: GuidedDenoiser,
    prompt_ids: torch.Tensor,
    seeds: Sequence[int],
    steps: int = 50,
    guidance_scale: float = 1.0,
    scheduler: str = "ddim",
    batch_size: int = 256,
    progress: bool = True,
    device: Optional[torch.device] = None,
    eta: float = 0.0,
    eta_below: Optional[float] = None,
    band_start: Optional[int] = None,
    height: Optional[int] = None,
    width: Optional[int] = None,
    guidance_every: int = DEFAULT_GUIDANCE_EVERY,
) -> torch.Tensor:
    """Sample one image per (prompt id, seed) with the continuous-batching engine and the fused
    guided step. prompt_ids: (N,) int64. Returns (N, C, H, W) in [-1, 1], in request order
    (decoded by the VAE for a latent-space base), H x W = height x width pixels (None: the
    UNet's native size; see `latent_shape`).
    An image depends only on its prompt, seed and settings, not on batch_size.

    guidance_every: G's UNet body runs at every k-th step of each image and its output is reused
    between, G's head at every step (GuidedSchedule.guidance_every; 1: every step).

    band_start / eta_below: DDIM runs with `eta` at t >= band_start (where the attribute is
    decided; default: the band recorded in G's config, 0 without G) and with `eta_below`
    (default STOCHASTIC_BELOW_BAND when there is a band) under it. See `below_band_eta`."""
    if len(seeds) != prompt_ids.numel():
        raise ValueError(f"{len(seeds)} seeds for {prompt_ids.numel()} prompts")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    engine = sampling_engine(denoiser, scheduler, batch_size, device=device, eta=eta, eta_below=eta_below, band_start=band_start,
                             height=height, width=width, guidance_every=guidance_every)
    requests = [Request(int(p), int(s), steps, guidance_scale, request_id=i) for i, (p, s) in enumerate(zip(prompt_ids.tolist(), seeds))]
    images = engine.run(requests, progress=progress)
    return torch.stack([images[i] for i in range(len(requests))])


def guided_output(denoiser: GuidedDenoiser, model_in: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor,
                  uncond: Optional[torch.Tensor] = None, guidance_scale: float = 1.0, reuse: Optional[bool] = None,
                  body: Optional[torch.Tensor] = None):
    """What the scheduler steps on: eps_tilde of each branch (GuidedDenoiser), then classifier-free
    guidance (ops.cfg_combine), the math the engine's fused step does in one op.
    model_in: (B, C, h, w) the scheduler's model input; timestep: 0-dim; cond, uncond: (B, L, D)
    prompt embeddings (uncond None: no classifier-free guidance). Returns (B, C, h, w).

    reuse (for GuidedSchedule.guidance_every): None returns the output alone; False runs G's body
    and True reuses `body` (its output at an earlier step, as this returned it) in its place, and
    both return (output, body: (2B, C, h, w) with uncond, branches [uncond, cond], (B, C, h, w)
    without; see GuidedDenoiser.branches)."""
    b, device = model_in.shape[0], model_in.device
    if uncond is not None:  # one model call on both branches, as the engine batches them
        model_in, cond = torch.cat([model_in, model_in]), torch.cat([uncond, cond])
    t = timestep.expand(model_in.shape[0]).to(device)
    if reuse is None:
        eps, g = denoiser.branches(model_in, t, cond)
    else:
        fresh = torch.full((model_in.shape[0],), not reuse, dtype=torch.bool, device=device)
        eps, g, body = denoiser.branches(model_in, t, cond, fresh=fresh, body=body)
    eps_tilde = eps if g is None else denoiser.guidance.combine(eps, g, denoiser.strength)
    m = eps_tilde if uncond is None else cfg_combine(*eps_tilde.chunk(2), guidance_scale)
    return m if reuse is None else (m, body)


@torch.no_grad()
def guided_loop(denoiser: GuidedDenoiser, scheduler, schedule: GuidedSchedule, steps: int, noise: torch.Tensor, cond: torch.Tensor,
                uncond: Optional[torch.Tensor] = None, guidance_scale: float = 1.0,
                generator: Union[None, torch.Generator, List[torch.Generator]] = None,
                on_step: Optional[Callable[[], None]] = None) -> torch.Tensor:
    """The plain guided loop of `sample_unfused` and InvDiffPipeline: `steps` calls of
    `scheduler.step` (a diffusers scheduler, set up here) on `guided_output`, each with the eta
    `schedule` gives its timestep (deterministic DDIM in G's band, stochastic below it), as the
    engine's fused plans.

    noise: (B, C, h, w) initial noise, not yet scaled by init_noise_sigma, (C, h, w) =
    schedule.shape; cond, uncond: (B, L, D) (uncond None: no classifier-free guidance);
    generator: one torch.Generator or a list of B, for the scheduler's own noise (DDPM, DDIM with
    eta > 0; a list draws per image, as the engine does); on_step: called after each step.
    Returns the final sample (B, C, h, w), undecoded."""
    if tuple(noise.shape[1:]) != tuple(schedule.shape):
        raise ValueError(f"initial noise of shape {tuple(noise.shape)} for samples of shape {tuple(schedule.shape)} "
                         "(the latents' size must be the height and width's)")
    per_step = schedule.steps(scheduler, steps, device=noise.device)  # before init_noise_sigma: Euler's depends on it
    x = noise * scheduler.init_noise_sigma
    # Only schedulers that draw noise take a generator (PNDM, Stable Diffusion 1.5's own, does not).
    extra = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    body = None  # with guidance_every > 1: G's body output (both branches) at its last step that ran it
    reusing = schedule.guidance_every > 1
    for index, (t, eta) in enumerate(per_step):
        if reusing:
            m, body = guided_output(denoiser, scheduler.scale_model_input(x, t), t, cond, uncond, guidance_scale,
                                    reuse=schedule.reuses_guidance(index), body=body)
        else:
            m = guided_output(denoiser, scheduler.scale_model_input(x, t), t, cond, uncond, guidance_scale)
        x = scheduler.step(m, t, x, **extra, **({} if eta is None else {"eta": eta})).prev_sample
        if on_step is not None:
            on_step()
    return x


@torch.no_grad()
def sample_unfused(
    denoiser: GuidedDenoiser,
    prompt_ids: torch.Tensor,
    seeds: Sequence[int],
    steps: int = 50,
    guidance_scale: float = 1.0,
    scheduler: str = "ddim",
    batch_size: int = 256,
    progress: bool = True,
    device: Optional[torch.device] = None,
    eta: float = 0.0,
    eta_below: Optional[float] = None,
    band_start: Optional[int] = None,
    height: Optional[int] = None,
    width: Optional[int] = None,
    guidance_every: int = DEFAULT_GUIDANCE_EVERY,
) -> torch.Tensor:
    """`sample` as a plain loop (`guided_loop`), one static batch at a time (the unfused eager
    chain), with the same schedule (eta, eta_below, band_start, height, width, guidance_every: see
    `sample`).
    prompt_ids: (N,) int64. Returns (N, C, H, W) in [-1, 1]."""
    base = denoiser.base
    if len(seeds) != prompt_ids.numel():
        raise ValueError(f"{len(seeds)} seeds for {prompt_ids.numel()} prompts")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = device or next(base.unet.parameters()).device
    schedule = guided_schedule(denoiser, scheduler, eta=eta, eta_below=eta_below, band_start=band_start, height=height, width=width,
                               guidance_every=guidance_every)
    outputs: List[torch.Tensor] = []
    n = prompt_ids.numel()
    bar = tqdm(total=n * steps, desc="sample", disable=not progress, unit="img-step")
    for start in range(0, n, batch_size):
        ids = prompt_ids[start : start + batch_size].to(device)
        noise, gens = initial_noise(schedule.shape, list(seeds[start : start + batch_size]))
        cond = base.prompt_embeds(ids)
        uncond = base.prompt_embeds(torch.full_like(ids, base.conditioner.null_id)) if guidance_scale != 1.0 else None
        x = guided_loop(denoiser, make_scheduler(scheduler, base.scheduler.config), schedule, steps, noise.to(device), cond, uncond,
                        guidance_scale, gens, on_step=functools.partial(bar.update, ids.numel()))
        outputs.append(base.decode_latents(x) if hasattr(base, "decode_latents") else x.clamp(-1, 1).cpu())
    bar.close()
    return torch.cat(outputs)


def prompts_to_ids(base: FrozenBase, prompts: Sequence[str]) -> torch.Tensor:
    return base.conditioner.prompt_ids(prompts).cpu()
