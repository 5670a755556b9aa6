"""The per-step schedule every guided sampler follows: which timesteps, DDIM's eta at each, and
the latent's shape.

Three loops sample with G_psi: the continuous-batching engine (engine.py, the fused step), the
plain loop over `scheduler.step` (sampler.guided_loop: `sample_unfused` and InvDiffPipeline).
They give the same images only if they agree on these, so `guided_schedule` decides them once
and each loop reads them from its GuidedSchedule; the tests compare the three image for image.

No diffusers import at module level: step_coeffs.py reads EtaRule, and the coefficient layout it
re-exports is read by `python -m invdiff.info`, which should not pay for importing diffusers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

# DDIM's eta under the attribute band. Why: a guided G shifts which attribute a trajectory takes
# in the band, and a deterministic sampler then carries the in-between state of that decision
# down to t = 0: on colored digits (p = 0.9) the samples that kept the majority colour came out
# with dimmer strokes (95th-percentile intensity 0.79 against the base's 0.84) and the Frechet
# distance rose by 45-60%. Stochastic steps below the band let the frozen model repair the strokes
# (InvDiff's Frechet distance 389 -> 246 against the base's 239 under the same sampler), and
# deterministic steps in the band keep the base's own attribute shares faithful (10% minority,
# as in the data; fully stochastic DDIM drew 4.7%). Measured with 30 samples per digit, seed 0.
STOCHASTIC_BELOW_BAND = 1.0


def takes_eta(scheduler) -> bool:
    """Whether `scheduler` (a name from sampling.SCHEDULERS, or a diffusers scheduler) is DDIM,
    the one kind whose `step` takes an eta."""
    if isinstance(scheduler, str):
        return scheduler == "ddim"
    from diffusers import DDIMScheduler

    return isinstance(scheduler, DDIMScheduler)


@dataclass(frozen=True)
class EtaRule:
    """DDIM's eta per timestep: `eta` at t >= t_switch (the attribute band, where G decides the
    attribute) and `eta_below` under it; eta_below None: `eta` at every t."""

    eta: float = 0.0
    eta_below: Optional[float] = None
    t_switch: int = 0

    def at(self, t) -> float:
        """The eta of the step at timestep t (an int, or a 0-dim tensor)."""
        return self.eta if self.eta_below is None or int(t) >= self.t_switch else self.eta_below


def attribute_band_start(denoiser) -> int:
    """The first timestep of the band where the attribute is decided, as recorded in G's config
    by the max step (environments.guidance_band); 0 when unknown (no G, or an older G).
    denoiser: a sampling.GuidedDenoiser (anything with a `guidance` attribute)."""
    guidance = getattr(denoiser, "guidance", None)
    return int(guidance.config.get("band_start", 0)) if guidance is not None else 0


def below_band_eta(denoiser, scheduler, eta_below: Optional[float], band_start: Optional[int]):
    """(eta_below, t_switch): the band is `band_start` (None: G's, attribute_band_start), and DDIM
    turns stochastic under it (eta_below None: STOCHASTIC_BELOW_BAND) when there is one."""
    band_start = attribute_band_start(denoiser) if band_start is None else int(band_start)
    if band_start < 0:
        raise ValueError(f"band_start must be >= 0, got {band_start}")
    if eta_below is not None and eta_below < 0:
        raise ValueError(f"eta below the band must be >= 0, got {eta_below}")
    if band_start == 0:
        return eta_below, 0
    if eta_below is None and takes_eta(scheduler):
        eta_below = STOCHASTIC_BELOW_BAND
    return eta_below, band_start


def scheduled_steps(scheduler, num_steps: int, rule: EtaRule, device=None) -> List[Tuple[torch.Tensor, Optional[float]]]:
    """Set `scheduler` (a diffusers scheduler) to `num_steps` steps with its `set_timesteps`, as
    a diffusers loop does before it reads init_noise_sigma, and return [(t, eta)] per step: t the
    0-dim timestep from `scheduler.timesteps`, eta `rule.at(t)` for DDIM and None for a scheduler
    whose `step` takes no eta. The engine's coefficient plans (step_coeffs.plan_steps) and the
    plain loop (sampler.guided_loop) both step by this list."""
    scheduler.set_timesteps(num_steps, device=device)
    ddim = takes_eta(scheduler)
    return [(t, rule.at(t) if ddim else None) for t in scheduler.timesteps]


@dataclass(frozen=True)
class GuidedSchedule:
    """What a guided sampler fixes before its first step. rule: DDIM's eta per timestep;
    shape: (C, h, w), one sample's latent (pixels for a pixel-space base); guidance_every: G_psi's
    UNet body (GuidanceModule.body_output, nearly all of G's cost, the largest that sampling adds
    to the frozen model) runs at a sample's steps 0, k, 2k, ... and its output is reused at the
    steps between (1: every step); G's head, gains and band gate, cheap maps of each step's frozen
    prediction, run at every step (see `reuses_guidance`)."""

    rule: EtaRule
    shape: Tuple[int, int, int]
    guidance_every: int = 1

    def __post_init__(self):
        if int(self.guidance_every) != self.guidance_every or self.guidance_every < 1:
            raise ValueError(f"guidance_every must be an integer >= 1, got {self.guidance_every}")

    def reuses_guidance(self, step_index):
        """Whether a sample at step `step_index` (an int or a numpy array of them, counted from 0)
        reuses G's body output from an earlier step instead of running the body."""
        return step_index % self.guidance_every != 0

    def steps(self, scheduler, num_steps: int, device=None) -> List[Tuple[torch.Tensor, Optional[float]]]:
        """[(t, eta)] per step of `scheduler` set to `num_steps` steps: scheduled_steps."""
        return scheduled_steps(scheduler, num_steps, self.rule, device)


def check_guidance_reuse(denoiser, guidance_every: int) -> None:
    """Refuse, with the reason, a G that GuidedSchedule.guidance_every > 1 cannot reuse: one
    without a separate body (LoRA adapters on the frozen UNet, models/lora.py), whose output is
    the adapted UNet's whole prediction at this step, with nothing cheap to keep per step."""
    guidance = getattr(denoiser, "guidance", None)
    if guidance_every > 1 and guidance is not None and not hasattr(guidance, "body_output"):
        raise ValueError(f"guidance_every = {guidance_every} reuses G's body output between steps, and this G "
                         f"({type(guidance).__name__}) has no body apart from its output: use guidance_every = 1")


def guided_schedule(denoiser, scheduler="ddim", *, eta: float = 0.0, eta_below: Optional[float] = None,
                    band_start: Optional[int] = None, height: Optional[int] = None, width: Optional[int] = None,
                    guidance_every: int = 1) -> GuidedSchedule:
    """The schedule `sample`, `sample_unfused`, `invdiff sample`, the service and InvDiffPipeline
    sample with.

    denoiser: a sampling.GuidedDenoiser (its base gives the latent shape, its G the band);
    scheduler: a name from sampling.SCHEDULERS or a diffusers scheduler; eta: DDIM's eta in the
    band; band_start / eta_below: see below_band_eta; height, width: the images' size in pixels
    (None: the UNet's native size; spec.latent_shape); guidance_every: see GuidedSchedule."""
    from .spec import latent_shape

    check_guidance_reuse(denoiser, guidance_every)
    eta_below, t_switch = below_band_eta(denoiser, scheduler, eta_below, band_start)
    return GuidedSchedule(EtaRule(eta, eta_below, t_switch), latent_shape(denoiser.base, height, width), guidance_every)
