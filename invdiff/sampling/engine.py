"""Continuous-batching sampler: one batch on the device, requests join and leave at any step.

Each request (prompt, seed, steps, guidance scale) owns a slot while it is sampled. Every engine
step runs the frozen UNet (and G_psi) once on all occupied slots, each at its own timestep, then
one fused `invdiff.ops.guided_step` with per-sample coefficients moves every slot one step along
its own schedule. A request that finishes frees its slot at once and a waiting one takes it, so
the batch stays full under uneven arrivals and mixed step counts.

An image depends only on its request: initial noise and every noise draw come from the request's
own generator (seeded by its seed, drawn as diffusers draws them), so the engine reproduces the
plain one-request sampler (`sampling.sample_unfused`) up to float rounding whatever the arrival
order or batch size. Schedulers the fused step cannot express (e.g. DPM-Solver multistep) still
batch the model calls; their update runs per slot through `scheduler.step` on the combined output.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

import torch

from .. import ops
from .spec import latent_shape, make_scheduler
from .step_coeffs import NUM_COEFFS, StepPlan, UnsupportedScheduler, guidance_columns, plan_steps


@dataclass
class Request:
    """One image to sample. prompt_id: the base model's prompt index; steps >= 1."""

    prompt_id: int
    seed: int
    steps: int = 50
    guidance_scale: float = 2.0
    request_id: Optional[int] = None


@dataclass
class _Slot:
    request: Request
    generator: torch.Generator
    plan: Optional[StepPlan]  # None: the per-slot scheduler path
    scheduler: object = None  # that path's own scheduler (it may keep state between steps)
    step: int = 0
    extra: Dict = field(default_factory=dict)


class SamplingEngine:
    """Continuous batching around a `sampling.GuidedDenoiser`.

    denoiser: the frozen base (and optional G_psi with its strength); scheduler: a name from
    `sampling.SCHEDULERS` or a diffusers scheduler instance; max_batch: slots on the device;
    eta: DDIM's eta; postprocess: final samples (n, C, H, W) -> images, by default the VAE decode
    of a latent base and a clamp to [-1, 1] otherwise; height, width: the images' size in pixels
    (None: the UNet's native size; `sampling.latent_shape`). `submit` queues requests, `step` advances
    every occupied slot by one step and returns the finished images, `run` does both until the
    queue is empty.
    """

    def __init__(self, denoiser, scheduler="ddim", max_batch: int = 64, device=None, eta: float = 0.0, dtype=None, postprocess=None,
                 eta_below: Optional[float] = None, t_switch: int = 0, height: Optional[int] = None, width: Optional[int] = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.denoiser = denoiser
        base = denoiser.base
        self.device = torch.device(device) if device is not None else next(base.unet.parameters()).device
        self.scheduler = make_scheduler(scheduler, base.scheduler.config) if isinstance(scheduler, str) else scheduler
        self.eta, self.eta_below, self.t_switch = eta, eta_below, t_switch
        self.max_batch = max_batch
        self.shape = latent_shape(base, height, width)
        self.dtype = dtype or next(base.unet.parameters()).dtype
        self._plans: Dict[int, StepPlan] = {}
        self._queue: List[Request] = []
        self._slots: List[_Slot] = []
        self._x = torch.empty((max_batch, *self.shape), device=self.device, dtype=torch.float32)
        self._ids = itertools.count()
        self.fused_reason = None
        try:
            plan_steps(self.scheduler, 1, eta, eta_below, t_switch)
        except UnsupportedScheduler as err:
            self.fused_reason = str(err)  # why the per-slot scheduler path is used
        if postprocess is None:
            postprocess = base.decode_latents if hasattr(base, "decode_latents") else (lambda x: x.clamp(-1, 1).cpu())
        self.postprocess = postprocess
        self.model_evaluations = 0  # UNet batches run, for throughput accounting
        self.slot_steps = 0  # image-steps done

    # ------------------------------------------------------------------ requests
    def submit(self, request: Request) -> int:
        """Queue a request; returns its id (request.request_id if set)."""
        if request.steps < 1:
            raise ValueError(f"steps must be >= 1, got {request.steps}")
        known = self.denoiser.base.conditioner.null_id  # ids 0..null_id-1 are prompts
        if not 0 <= int(request.prompt_id) < known:
            raise ValueError(f"prompt id {request.prompt_id} is not one of the model's {known} prompts")
        if request.request_id is None:
            request = copy.copy(request)
            request.request_id = next(self._ids)
        self._queue.append(request)
        return request.request_id

    @property
    def pending(self) -> int:
        return len(self._queue)

    @property
    def active(self) -> int:
        return len(self._slots)

    def _plan(self, steps: int) -> StepPlan:
        if steps not in self._plans:
            self._plans[steps] = plan_steps(self.scheduler, steps, self.eta, self.eta_below, self.t_switch)
        return self._plans[steps]

    def _admit(self) -> None:
        while self._queue and len(self._slots) < self.max_batch:
            request = self._queue.pop(0)
            gen = torch.Generator().manual_seed(int(request.seed))
            noise = torch.randn(self.shape, generator=gen)  # as sampling.initial_noise draws it
            if self.fused_reason is None:
                plan, sched = self._plan(request.steps), None
                sigma = plan.init_noise_sigma
            else:
                plan, sched = None, copy.deepcopy(self.scheduler)
                sched.set_timesteps(request.steps, device=self.device)
                sigma = sched.init_noise_sigma
            self._x[len(self._slots)] = noise.to(self.device) * sigma
            self._slots.append(_Slot(request, gen, plan, sched))

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def step(self) -> Dict[int, torch.Tensor]:
        """Admit what fits, advance every occupied slot by one step, and return the images that
        finished ({request_id: (C, H, W) in [-1, 1], on the CPU})."""
        self._admit()
        n = len(self._slots)
        if n == 0:
            return {}
        x = self._x[:n]
        base = self.denoiser.base
        if self.fused_reason is None:
            timesteps = torch.stack([s.plan.timesteps[s.step] for s in self._slots]).to(self.device)
            scale = torch.tensor([float(s.plan.input_scale[s.step]) for s in self._slots], device=self.device)
            model_in = x * scale.view(-1, 1, 1, 1)
        else:
            timesteps = torch.stack([s.scheduler.timesteps[s.step] for s in self._slots]).to(self.device)
            model_in = torch.cat([s.scheduler.scale_model_input(x[i : i + 1], timesteps[i]) for i, s in enumerate(self._slots)])
        scales = torch.tensor([float(s.request.guidance_scale) for s in self._slots], dtype=torch.float64)
        use_cfg = bool((scales != 1.0).any())
        ids = torch.tensor([int(s.request.prompt_id) for s in self._slots], device=self.device)
        cond = base.prompt_embeds(ids)
        model_in = model_in.to(self.dtype)
        if use_cfg:
            uncond = base.prompt_embeds(torch.full_like(ids, base.conditioner.null_id))
            eps, g = self.denoiser.branches(torch.cat([model_in, model_in]), torch.cat([timesteps, timesteps]), torch.cat([uncond, cond]))
            eps_u, eps_c = eps.float().chunk(2)
            g_u, g_c = g.float().chunk(2) if g is not None else (None, None)
        else:
            eps_c, g_c = self.denoiser.branches(model_in, timesteps, cond)
            eps_c, g_c = eps_c.float(), (g_c.float() if g_c is not None else None)
            eps_u = g_u = None
        self.model_evaluations += 1
        self.slot_steps += n
        if self.fused_reason is None:
            self._fused_update(x, eps_u, eps_c, g_u, g_c, scales)
        else:
            self._scheduler_update(x, eps_u, eps_c, g_u, g_c, scales, timesteps)
        return self._retire()

    def _fused_update(self, x, eps_u, eps_c, g_u, g_c, scales) -> None:
        n = x.shape[0]
        coeffs = torch.stack([s.plan.coeffs[s.step] for s in self._slots])
        guidance = self.denoiser.guidance
        ratio = guidance.ratio if guidance is not None and g_c is not None else None
        guidance_columns(coeffs, ratio, self.denoiser.strength, scales)
        draws = [s.plan.draws_noise[s.step] for s in self._slots]
        noise = None
        if any(draws):
            # One (1, C, H, W) draw per drawing slot from its own generator, exactly as diffusers'
            # randn_tensor draws for a list of generators; slots that do not draw get zeros.
            noise = torch.zeros((n, *self.shape))
            for i, (slot, drawn) in enumerate(zip(self._slots, draws)):
                if drawn:
                    noise[i] = torch.randn((1, *self.shape), generator=slot.generator)[0]
            noise = noise.to(self.device)
        coeffs = coeffs.to(device=self.device, dtype=torch.float32)
        ops.guided_step(x, eps_u, eps_c, g_u, g_c, coeffs, noise, out=x)
        for slot in self._slots:
            slot.step += 1

    def _scheduler_update(self, x, eps_u, eps_c, g_u, g_c, scales, timesteps) -> None:
        guidance = self.denoiser.guidance
        if g_c is not None:
            eps_c = guidance.combine(eps_c, g_c, self.denoiser.strength)
            eps_u = guidance.combine(eps_u, g_u, self.denoiser.strength) if eps_u is not None else None
        m = ops.cfg_combine(eps_u, eps_c, scales.to(eps_c)) if eps_u is not None else eps_c
        for i, slot in enumerate(self._slots):
            x[i : i + 1] = slot.scheduler.step(m[i : i + 1], timesteps[i], x[i : i + 1], generator=[slot.generator]).prev_sample
            slot.step += 1

    def _retire(self) -> Dict[int, torch.Tensor]:
        finished = [i for i, slot in enumerate(self._slots) if slot.step >= (slot.plan.steps if slot.plan is not None else len(slot.scheduler.timesteps))]
        if not finished:
            return {}
        images = self.postprocess(self._x[finished].clone())  # one batched decode for all that finished
        done = {self._slots[i].request.request_id: images[j].cpu() for j, i in enumerate(finished)}
        for i in sorted(finished, reverse=True):
            last = len(self._slots) - 1
            if i != last:  # keep the occupied slots packed at the front: x[:n] stays a view
                self._x[i] = self._x[last]
                self._slots[i] = self._slots[last]
            self._slots.pop()
        return done

    # ------------------------------------------------------------------ driving
    def run(self, requests: Iterable[Request] = (), progress: bool = False) -> Dict[int, torch.Tensor]:
        """Submit `requests`, step until every queued and active request is done, return images."""
        from tqdm.auto import tqdm

        for r in requests:
            self.submit(r)
        total = sum(r.steps for r in self._queue) + sum(
            (s.plan.steps if s.plan is not None else len(s.scheduler.timesteps)) - s.step for s in self._slots
        )
        results: Dict[int, torch.Tensor] = {}
        with tqdm(total=total, desc="sample", disable=not progress, unit="img-step") as bar:
            while self._queue or self._slots:
                before = self.slot_steps
                results.update(self.step())
                bar.update(self.slot_steps - before)
        return results
