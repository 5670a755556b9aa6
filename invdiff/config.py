"""The settings of a debiasing run (DebiasConfig, its named recipes, and the choices its flags
take) and of the base model's training (BaseTrainConfig), each default given once here. Kept
free of torch and diffusers so that `invdiff --help` and argument checks start in well under a
second (issue 12); the heavy modules are imported by the methods that need them."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional

# The vocabulary every command, config check and serving request shares, written once here.
FROZEN_DTYPES = ("fp32", "bf16", "fp16")  # how the frozen UNet, VAE and text encoder run; G stays fp32
ATTENTION_BACKENDS = ("sdpa", "xformers")  # the frozen UNet's attention (models/sd.py)
SCHEDULER_NAMES = ("ddim", "ddpm", "euler", "dpm")  # sampling schedulers (sampling/spec.py maps them)
# G_psi at every sampling step by default (sampling.GuidedSchedule.guidance_every; docs/results.md
# has what reusing its output between steps does to the effect and the speed).
DEFAULT_GUIDANCE_EVERY = 1
GUIDANCE_KINDS = ("unet", "lora")  # G_psi: a narrow zero-initialised UNet, or peft LoRA on the frozen UNet
LAM_MODES = ("absolute", "relative")  # lambda as given (the official L_e), or in units of the batch's mean loss
# torch.Generator.manual_seed takes [0, 2**64): a negative seed would wrap onto a positive one.
SEED_LIMIT = 2**64

# How the max step aggregates a sample's (T,) losses into one score (environments.aggregate).
AGGREGATIONS = ("spread", "zscore", "mean", "high-noise")
# How the max step turns scores into groups (environments.MaxStepPolicy).
MAX_STEP_METHODS = ("gap", "otsu", "mixture", "official")


@dataclass
class BaseTrainConfig:
    """`invdiff train-base` (its flags' defaults read these) and scripts/make_assets.py, which
    trains the shipped bases at these defaults; training.train_base runs it."""

    steps: int = 2500
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 100
    cfg_dropout: float = 0.1
    ema_decay: float = 0.999
    widths: tuple = (16, 32, 64)
    embedding_dim: int = 64
    seed: int = 0


@dataclass
class DebiasConfig:
    """Defaults measured on colored digits (p=0.9, 2 CPU cores); see docs/research_notes.md ("What
    we found"). The min step's own defaults (training.MinStepConfig) are read from these."""

    groups: int = 2
    lam: float = 1.0
    # relative: lambda is in units of the batch's mean loss. The official absolute lambda=1 is a
    # no-op at this loss scale (Var_k R_k ~ 1e-4 against R ~ 0.03).
    lam_mode: str = "relative"
    ratio: float = 2.0
    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-2
    lam_warmup: int = 0
    preset: str = "small"
    aggregation: str = "spread"
    loss_timesteps: int = 20
    loss_draws: int = 1
    # "otsu" | "gap" | "mixture" | "official" (projected Adam on std_k R_k); see environments.py. otsu
    # recovers the minority tail (recall 0.98-1.0) where gap keeps a few extreme samples (0.22-0.30);
    # with the calibrated push the size of the push no longer rests on how extreme the groups are.
    max_step: str = "otsu"
    per_prompt_groups: bool = True  # K environments inside each prompt (see max_step)
    min_per_prompt_groups: int = 8  # ... when every prompt has at least this many samples per group
    max_step_steps: int = 500
    max_step_lr: float = 0.01
    alpha: float = 0.0
    use_bank: bool = True  # min step reuses the max step's frozen predictions (environments.FrozenBank)
    importance_mix: float = 0.5  # share of uniform draws in the min step's t proposal; 1 = uniform
    seed: int = 0
    # Real (Stable Diffusion class) bases: how the frozen parts run, and where cached latents go.
    frozen_dtype: str = "fp32"  # fp32 | bf16 | fp16 for the frozen UNet, VAE and text encoder; G stays fp32
    attention: str = "sdpa"  # sdpa | xformers
    channels_last: bool = False
    compile_frozen: bool = False  # torch.compile the frozen UNet
    grad_checkpointing: bool = False  # for G_psi's UNet
    latent_cache: Optional[str] = None  # folder for memory-mapped VAE latents (None: in memory)
    grad_accum: int = 1  # micro-batches per min step; group statistics are per micro-batch
    guidance_kind: str = "unet"  # "unet": a narrow zero-initialised UNet (preset); "lora": peft LoRA on the frozen UNet
    lora_rank: int = 4
    # The band of t where the attribute is decided: "auto" (environments.guidance_band), "off" (no
    # band), or its first timestep as an integer string. It is recorded in G's config: sampling
    # turns stochastic below it (sampling.STOCHASTIC_BELOW_BAND), and with gate_to_band G acts
    # only inside it.
    t_band: str = "auto"
    # G acts at every t by default: gated to the band (t >= 800 on colored digits) it cut Bias
    # less (0.39 against 0.26, seed 0) for a 10% lower Frechet distance (221 against 246).
    gate_to_band: bool = False
    ema_decay: Optional[float] = None  # EMA of G's weights (None: off); the EMA weights are saved
    head: str = "affine"  # G's recalibration head: affine | zero-sum | none (models/guidance.py HEADS)
    body: bool = True  # G's UNet body (False: the recalibration head alone)
    head_sees_sample: bool = False  # the head also reads per-channel statistics of x_t and the frozen prediction
    # The min step's objective: "invariant" (L_e), "groupdro" (online max_k R_k) or "jtt"
    # (plain loss, high-loss group upweighted by jtt_upweight). See training.MinStepConfig.
    objective: str = "invariant"
    jtt_upweight: float = 5.0
    # The paper's alternation (environments.alternate): after the min step, re-infer the groups
    # from the guided model's losses and train G further on them, at most this many times (0: off;
    # given groups, as the oracle's, are never re-inferred).
    alternations: int = 0
    # The label-free calibration of the push (calibration.py): after the min step, G's strength
    # per prompt is set so that its samples read balanced between the groups; strength 1 at
    # sampling is then the calibrated push. Off: G pushes as trained.
    calibrate: bool = True
    calibrate_in_band: bool = False  # the calibrated gains act at t >= the attribute band's start only

    def validate(self, n: int) -> None:
        if self.groups < 2:
            raise ValueError(f"number of groups K must be >= 2, got {self.groups}")
        if n < self.groups:
            raise ValueError(f"the dataset has {n} sample{'s' if n != 1 else ''}: too few for K={self.groups} groups")
        if self.lam < 0:
            raise ValueError(f"lambda must be >= 0, got {self.lam}")
        if not self.ratio > 0:
            raise ValueError(f"guidance ratio r must be > 0, got {self.ratio}")
        # The max step's policy (environments.max_step_policy) takes these; checked here, torch-free.
        if self.max_step not in MAX_STEP_METHODS:
            raise ValueError(f"max_step must be one of {MAX_STEP_METHODS}, got {self.max_step!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {self.aggregation!r}; choose from {AGGREGATIONS}")
        if self.max_step_steps < 1:
            raise ValueError(f"max-step steps must be >= 1, got {self.max_step_steps}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.frozen_dtype not in FROZEN_DTYPES:
            raise ValueError(f"frozen_dtype must be fp32, bf16 or fp16, got {self.frozen_dtype!r}")
        if self.guidance_kind not in GUIDANCE_KINDS:
            raise ValueError(f"guidance_kind must be 'unet' or 'lora', got {self.guidance_kind!r}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be sdpa or xformers, got {self.attention!r}")
        if self.t_band not in ("auto", "off") and not self.t_band.isdigit():
            raise ValueError(f"t band must be 'auto', 'off' or a timestep >= 0, got {self.t_band!r}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {self.ema_decay}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if not self.jtt_upweight >= 1.0:
            raise ValueError(f"JTT upweight must be >= 1, got {self.jtt_upweight}")
        if not 0 <= self.alternations <= MAX_ALTERNATIONS:
            raise ValueError(f"alternations must be in [0, {MAX_ALTERNATIONS}], got {self.alternations}")
        if not 0.0 < self.importance_mix <= 1.0:
            raise ValueError(f"importance mix must be in (0, 1], got {self.importance_mix}")

    def validate_for_base(self, num_train_timesteps: int) -> None:
        """Checks that need the base: the band must start inside [0, T)."""
        if self.t_band not in ("auto", "off") and not 0 <= int(self.t_band) < num_train_timesteps:
            raise ValueError(f"t band start {self.t_band} is outside [0, {num_train_timesteps})")


OBJECTIVES = ("invariant", "groupdro", "jtt")
MAX_ALTERNATIONS = 10  # each round is a whole min step more: a cap, so that it never loops unbounded

# Named presets over DebiasConfig. "official" is the paper's recipe as published: projected Adam
# on the plain mean loss, pooled groups, absolute lambda = 1, its training ratio 0.5, fresh (t,
# noise) every step (no bank, no importance sampling) and G at every t; G_psi's architecture and
# the step budget stay ours, so the comparison isolates the recipe.
RECIPES = {
    "invdiff": {},
    "official": dict(max_step="official", aggregation="mean", per_prompt_groups=False, lam=1.0, lam_mode="absolute",
                     ratio=0.5, use_bank=False, importance_mix=1.0, t_band="off", calibrate=False),
    # Label-free baselines on the same G_psi, budget and inferred groups.
    "jtt": dict(objective="jtt", per_prompt_groups=False, lam=0.0),
    "groupdro": dict(objective="groupdro", lam=0.0),
}


def recipe_config(name: str, **overrides) -> DebiasConfig:
    """DebiasConfig for a named recipe (RECIPES), with overrides on top."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose from {sorted(RECIPES)}")
    return dataclasses.replace(DebiasConfig(), **{**RECIPES[name], **overrides})


def describe_changes(old: Dict, new: Dict, limit: int = 6) -> str:
    """'key: old -> new' for only the settings that differ between two (nested) dicts, so that a
    refusal to reuse an output folder names what changed rather than printing whole configs."""
    def flat(d, prefix=""):
        out = {}
        for key, value in (d or {}).items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    a, b = flat(old), flat(new)
    missing = "(unset)"
    changes = [f"{k}: {a.get(k, missing)!r} -> {b.get(k, missing)!r}"
               for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)]
    if len(changes) > limit:
        changes = changes[:limit] + [f"and {len(changes) - limit} more"]
    return "; ".join(changes)
