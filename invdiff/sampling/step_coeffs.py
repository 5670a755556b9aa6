"""Per-sample coefficient tables for the fused guided sampling step (`invdiff.ops.guided_step`).

Every scheduler the fused step supports is, per sample, a linear update in the current sample x,
the guided model output m, the predicted clean sample x0 and the predicted noise eps:

    m_branch = C_EPS * eps_frozen + C_G * g                    (combine rule r, strength s)
    m        = m_uncond + CFG_SCALE * (m_cond - m_uncond)       (classifier-free guidance)
    x0       = clamp(X0_FROM_X * x + X0_FROM_M * m, +-CLIP)     (clamp only when CLIP > 0)
    eps      = EPS_FROM_X * x + EPS_FROM_M * m + EPS_FROM_X0 * x0
    x_prev   = PREV_FROM_X0 * x0 + PREV_FROM_EPS * eps + PREV_FROM_X * x + NOISE_SCALE * z

`plan_steps` reads a diffusers scheduler after `set_timesteps` and writes, for each of its steps,
the numbers diffusers' own `step` would use (DDIM with any eta, DDPM ancestral, Euler without
churn), so a fused step reproduces `scheduler.step` up to float rounding; the tests check this
against diffusers directly. The column layout mirrors csrc/guided_step.h.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

# The coefficient table's layout belongs to the guided-step op (its reference and csrc/guided_step.h).
from ..ops.reference import NUM_COEFFS, Col, combine_coefficients  # noqa: F401 (re-exported)
from .schedule import EtaRule, scheduled_steps

# Prediction types diffusers' schedulers accept, with what they call the clean-sample one.
_SAMPLE_TYPES = ("sample", "original_sample")


class UnsupportedScheduler(ValueError):
    """The fused step cannot express this scheduler's update; use scheduler.step instead."""


@dataclass
class StepPlan:
    """One sampling schedule, as the fused step needs it (S = number of steps).

    timesteps: (S,) the model's timestep at each step; input_scale: (S,) the factor
    `scheduler.scale_model_input` applies to x before the model; coeffs: (S, NUM_COEFFS) float64
    scheduler columns (guidance columns left at 0); draws_noise: (S,) whether diffusers draws
    noise from the generator at that step; init_noise_sigma: the initial-noise scale.
    """

    timesteps: torch.Tensor
    input_scale: torch.Tensor
    coeffs: torch.Tensor
    draws_noise: torch.Tensor
    init_noise_sigma: float

    @property
    def steps(self) -> int:
        return int(self.timesteps.numel())


def unsupported_reason(scheduler, eta: float = 0.0, eta_below: Optional[float] = None) -> Optional[str]:
    """Why the fused step cannot run `scheduler` (None if it can)."""
    # Imported here: the coefficient layout above is read at import by invdiff._ext and
    # `python -m invdiff.info`, which should not pay for importing diffusers.
    from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

    cfg = scheduler.config
    if not isinstance(scheduler, (DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler)):
        return f"{type(scheduler).__name__} is not a DDIM, DDPM or Euler scheduler"
    if getattr(cfg, "thresholding", False):
        return "dynamic thresholding needs a per-sample quantile, not an elementwise step"
    if cfg.prediction_type not in ("epsilon", "v_prediction") + _SAMPLE_TYPES:
        return f"prediction_type {cfg.prediction_type!r}"
    if isinstance(scheduler, DDPMScheduler) and cfg.variance_type not in ("fixed_small", "fixed_small_log", "fixed_large"):
        return f"DDPM variance_type {cfg.variance_type!r} (learned or log-large variances)"
    if not isinstance(scheduler, DDIMScheduler) and (eta != 0.0 or eta_below not in (None, 0.0)):
        return "eta applies to DDIM only"
    return None


def _x0_eps_columns(row, prediction_type, alpha_prod, need_eps):
    """Fill X0_* (and EPS_*) for a DDIM/DDPM step at cumulative alpha `alpha_prod`."""
    a, b = math.sqrt(alpha_prod), math.sqrt(1.0 - alpha_prod)
    if prediction_type == "epsilon":
        row[Col.X0_FROM_X], row[Col.X0_FROM_M] = 1.0 / a, -b / a
        if need_eps:
            row[Col.EPS_FROM_M] = 1.0
    elif prediction_type == "v_prediction":
        row[Col.X0_FROM_X], row[Col.X0_FROM_M] = a, -b
        if need_eps:
            row[Col.EPS_FROM_X], row[Col.EPS_FROM_M] = b, a
    else:  # the model predicts x0; diffusers derives eps from the unclipped prediction
        row[Col.X0_FROM_M] = 1.0
        if need_eps:
            row[Col.EPS_FROM_X], row[Col.EPS_FROM_M] = 1.0 / b, -a / b


def _clip_column(row, cfg):
    if getattr(cfg, "clip_sample", False):
        row[Col.CLIP] = float(cfg.clip_sample_range)


def plan_steps(scheduler, steps: int, eta: float = 0.0, eta_below: Optional[float] = None, t_switch: int = 0) -> StepPlan:
    """The StepPlan of `steps` sampling steps. `scheduler` is not modified (a copy is set up).

    DDIM: `eta` at timesteps >= t_switch and `eta_below` (default: eta) under it, so a sampler
    can stay deterministic where an attribute is decided and turn stochastic below (the
    schedule.EtaRule the plain loop steps with too).
    Raises UnsupportedScheduler (with the reason) for what the fused step cannot express.
    """
    reason = unsupported_reason(scheduler, eta, eta_below)
    if reason:
        raise UnsupportedScheduler(reason)
    from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

    sched = copy.deepcopy(scheduler)
    etas = [eta_here for _, eta_here in scheduled_steps(sched, steps, EtaRule(eta, eta_below, t_switch))]
    cfg = sched.config
    timesteps = sched.timesteps.clone()
    count = timesteps.numel()
    coeffs = torch.zeros(count, NUM_COEFFS, dtype=torch.float64)
    input_scale = torch.ones(count, dtype=torch.float64)
    draws = torch.zeros(count, dtype=torch.bool)
    alphas = sched.alphas_cumprod.double() if hasattr(sched, "alphas_cumprod") else None
    for k in range(count):
        row = coeffs[k]
        t = int(timesteps[k]) if not isinstance(sched, EulerDiscreteScheduler) else None
        if isinstance(sched, DDIMScheduler):
            prev = t - cfg.num_train_timesteps // sched.num_inference_steps
            a_t = float(alphas[t])
            a_prev = float(alphas[prev]) if prev >= 0 else float(sched.final_alpha_cumprod)
            variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
            eta_here = etas[k]
            std = eta_here * math.sqrt(variance)
            _x0_eps_columns(row, cfg.prediction_type, a_t, need_eps=True)
            _clip_column(row, cfg)
            row[Col.PREV_FROM_X0] = math.sqrt(a_prev)
            row[Col.PREV_FROM_EPS] = math.sqrt(max(0.0, 1 - a_prev - std**2))
            row[Col.NOISE_SCALE] = std
            draws[k] = eta_here > 0
        elif isinstance(sched, DDPMScheduler):
            prev = int(timesteps[k + 1]) if k + 1 < count else -1
            a_t = float(alphas[t])
            a_prev = float(alphas[prev]) if prev >= 0 else 1.0
            current_alpha = a_t / a_prev
            current_beta = 1 - current_alpha
            _x0_eps_columns(row, cfg.prediction_type, a_t, need_eps=False)
            _clip_column(row, cfg)
            row[Col.PREV_FROM_X0] = math.sqrt(a_prev) * current_beta / (1 - a_t)
            row[Col.PREV_FROM_X] = math.sqrt(current_alpha) * (1 - a_prev) / (1 - a_t)
            if t > 0:
                if cfg.variance_type == "fixed_large":
                    row[Col.NOISE_SCALE] = math.sqrt(current_beta)
                else:
                    row[Col.NOISE_SCALE] = math.sqrt(max((1 - a_prev) / (1 - a_t) * current_beta, 1e-20))
                draws[k] = True
        else:  # Euler, no churn: x_prev = x + (x - x0) / sigma * (sigma_next - sigma)
            sigma, sigma_next = float(sched.sigmas[k]), float(sched.sigmas[k + 1])
            if cfg.prediction_type == "epsilon":
                row[Col.X0_FROM_X], row[Col.X0_FROM_M] = 1.0, -sigma
            elif cfg.prediction_type == "v_prediction":
                row[Col.X0_FROM_X], row[Col.X0_FROM_M] = 1.0 / (sigma**2 + 1), -sigma / math.sqrt(sigma**2 + 1)
            else:
                row[Col.X0_FROM_M] = 1.0
            dt_over_sigma = (sigma_next - sigma) / sigma
            row[Col.PREV_FROM_X] = 1.0 + dt_over_sigma
            row[Col.PREV_FROM_X0] = -dt_over_sigma
            input_scale[k] = 1.0 / math.sqrt(sigma**2 + 1)
    return StepPlan(timesteps, input_scale, coeffs, draws, float(sched.init_noise_sigma))


def strength_coefficients(ratio: Optional[float], strength: float) -> Tuple[float, float]:
    """(C_EPS, C_G) of one sample, as Python floats (the engine keeps one pair per slot, so that
    requests at different strengths share a batch): m = C_EPS*eps + C_G*g is
    eps + s*((a*eps + b*g) - eps) with (a, b) = combine_coefficients(r); (1, 0) without G or at s = 0."""
    if ratio is None or strength == 0.0:
        return 1.0, 0.0
    a, b = combine_coefficients(ratio)
    return 1.0 + strength * (a - 1.0), strength * b


def guidance_columns(coeffs: torch.Tensor, ratio: Optional[float], strength: float, guidance_scale) -> torch.Tensor:
    """Fill C_EPS, C_G and CFG_SCALE of a (B, NUM_COEFFS) table in place and return it.

    ratio: G's combine ratio r (None without a guidance module); strength: s, moving from the
    frozen model (0) to the trained combination (1) and beyond; guidance_scale: float or (B,).
    With (a, b) = combine_coefficients(r): m = eps + s*((a*eps + b*g) - eps).
    """
    coeffs[:, Col.C_EPS], coeffs[:, Col.C_G] = strength_coefficients(ratio, strength)
    coeffs[:, Col.CFG_SCALE] = guidance_scale if not torch.is_tensor(guidance_scale) else guidance_scale.to(coeffs)
    return coeffs
