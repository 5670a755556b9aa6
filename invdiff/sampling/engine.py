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
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

import numpy as np
import torch

from .. import ops
from .schedule import EtaRule, GuidedSchedule, check_guidance_reuse
from .spec import latent_shape, make_scheduler
from .step_coeffs import NUM_COEFFS, Col, StepPlan, UnsupportedScheduler, plan_steps, strength_coefficients


@dataclass
class Request:
    """One image to sample. prompt_id: the base model's prompt index; steps >= 1; strength: G_psi's
    strength s for this image (None: the denoiser's), so that images at any strength share a batch."""

    prompt_id: int
    seed: int
    steps: int = 50
    guidance_scale: float = 2.0
    request_id: Optional[int] = None
    strength: Optional[float] = None


@dataclass
class _Slot:
    request: Request
    generator: torch.Generator
    plan: Optional[StepPlan]  # None: the per-slot scheduler path
    scheduler: object = None  # that path's own scheduler (it may keep state between steps)
    etas: Optional[List[Optional[float]]] = None  # that path's eta per step (None: no eta, not DDIM)


# The fused path's per-plan table is the guided step's coefficient table, (rows, NUM_COEFFS)
# float32, with two of its padding columns (which the op never reads) holding what the model
# needs at that step, so that one gather on the device gives every slot its timestep, input scale
# and coefficient row.
_SCALE_COL, _T_COL = 13, 14
assert len(Col) <= _SCALE_COL < _T_COL < NUM_COEFFS, "the engine's columns must stay in the table's padding"


class SamplingEngine:
    """Continuous batching around a `sampling.GuidedDenoiser`.

    denoiser: the frozen base (and optional G_psi with its strength); scheduler: a name from
    `sampling.SCHEDULERS` or a diffusers scheduler instance; max_batch: slots on the device;
    eta: DDIM's eta; postprocess: final samples (n, C, H, W) -> images, by default the VAE decode
    of a latent base and a clamp to [-1, 1] otherwise; height, width: the images' size in pixels
    (None: the UNet's native size; `sampling.latent_shape`); eta_below, t_switch: DDIM's eta under
    t_switch (schedule.EtaRule, taken as given: no default band). schedule: a
    schedule.GuidedSchedule, in place of eta, eta_below, t_switch, height and width; what
    `sampling_engine` passes, from the `guided_schedule` the plain loop samples with too, so that
    the two draw the same images. `submit` queues requests, `step` advances
    every occupied slot by one step and returns the finished images, `run` does both until the
    queue is empty; `cancel` drops one request, `abort_active` every active one (after `step`
    raised); `queued_ids` / `active_ids` list them.

    State. Occupied slots are packed at the front: slot i of n holds x[i]. The sample x is fp32
    whatever the model's dtype (rounding it to bf16 every step would add up over the schedule);
    the model's outputs go to the fused step in their own dtype. Per-slot numbers the device
    needs every step live on the device, written once at admission: the slot's row in the
    concatenated per-plan table (plan offset + step, advanced on the device), its guidance scale,
    its combine coefficients (C_EPS, C_G of its strength) and its prompt embedding. The host keeps
    only what its control flow needs, as numpy mirrors known without a sync: steps done and total
    (which slots finish), rows (which draw noise), guidance scales (whether any slot needs the
    unconditional branch) and strengths (whether any slot needs G).
    """

    def __init__(self, denoiser, scheduler="ddim", max_batch: int = 64, device=None, eta: float = 0.0, dtype=None, postprocess=None,
                 eta_below: Optional[float] = None, t_switch: int = 0, height: Optional[int] = None, width: Optional[int] = None,
                 schedule: Optional[GuidedSchedule] = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.denoiser = denoiser
        base = denoiser.base
        self.device = torch.device(device) if device is not None else next(base.unet.parameters()).device
        self.scheduler = make_scheduler(scheduler, base.scheduler.config) if isinstance(scheduler, str) else scheduler
        if schedule is None:
            schedule = GuidedSchedule(EtaRule(eta, eta_below, t_switch), latent_shape(base, height, width))
        check_guidance_reuse(denoiser, schedule.guidance_every)
        self.schedule = schedule
        self.max_batch = max_batch
        self.shape = schedule.shape
        self.dtype = dtype or next(base.unet.parameters()).dtype
        self._queue: List[Request] = []
        self._slots: List[_Slot] = []
        self._x = torch.empty((max_batch, *self.shape), device=self.device, dtype=torch.float32)
        self._ids = itertools.count()
        self.fused_reason = None
        try:
            plan_steps(self.scheduler, 1, *self._rule_args())
        except UnsupportedScheduler as err:
            self.fused_reason = str(err)  # why the per-slot scheduler path is used
        if postprocess is None:
            postprocess = base.decode_latents if hasattr(base, "decode_latents") else (lambda x: x.clamp(-1, 1).cpu())
        self.postprocess = postprocess
        self.model_evaluations = 0  # UNet batches run, for throughput accounting
        self.slot_steps = 0  # image-steps done

        # Plans, one per step count, concatenated into one device table (see _SCALE_COL).
        self._plans: Dict[int, StepPlan] = {}
        self._plan_offset: Dict[int, int] = {}
        self._table = torch.zeros((0, NUM_COEFFS), device=self.device, dtype=torch.float32)
        self._table_draws = np.zeros(0, dtype=bool)  # host: whether row r draws noise
        self._t_dtype: Optional[torch.dtype] = None
        # Per-slot device state (rows [0, n) are the occupied slots).
        self._row = torch.zeros(max_batch, device=self.device, dtype=torch.long)
        self._cfg = torch.ones(max_batch, device=self.device, dtype=torch.float32)
        self._c_eps = torch.ones(max_batch, device=self.device, dtype=torch.float32)
        self._c_g = torch.zeros(max_batch, device=self.device, dtype=torch.float32)
        self._embeds: Optional[torch.Tensor] = None  # (max_batch, L, D), allocated at the first admission
        # G's body output at each slot's last step that ran it, [uncond, cond] (schedule.guidance_every
        # > 1 only; allocated at the first G step, in G's dtype). Zeros at first: whatever a slot
        # reads there is finite, and a slot whose strength is 0 multiplies it by C_G = 0.
        self._body: Optional[torch.Tensor] = None  # (2, max_batch, C, h, w)
        self._null_embeds: Optional[torch.Tensor] = None  # (1, L, D): the unconditional prompt
        # Host mirrors.
        self._h_row = np.zeros(max_batch, dtype=np.int64)
        self._h_step = np.zeros(max_batch, dtype=np.int64)
        self._h_total = np.zeros(max_batch, dtype=np.int64)
        self._h_cfg = np.ones(max_batch, dtype=np.float64)
        self._h_strength = np.ones(max_batch, dtype=np.float64)

    # ------------------------------------------------------------------ requests
    def submit(self, request: Request) -> int:
        """Queue a request; returns its id (request.request_id if set)."""
        if request.steps < 1:
            raise ValueError(f"steps must be >= 1, got {request.steps}")
        known = self.denoiser.base.conditioner.null_id  # ids 0..null_id-1 are prompts
        if not 0 <= int(request.prompt_id) < known:
            raise ValueError(f"prompt id {request.prompt_id} is not one of the model's {known} prompts")
        if request.strength is not None and not np.isfinite(request.strength):
            raise ValueError(f"strength must be a finite number, got {request.strength}")
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

    def queued_ids(self) -> List[int]:
        """Ids of the requests waiting for a slot, in admission order."""
        return [r.request_id for r in self._queue]

    def active_ids(self) -> List[int]:
        """Ids of the requests being sampled, in slot order."""
        return [s.request.request_id for s in self._slots]

    def cancel(self, request_id) -> bool:
        """Drop a request: remove it from the queue, or free its slot (the slots behind it are
        packed as when a request finishes). Returns whether it was found. The other requests'
        images do not change: each depends on its own request only."""
        for i, request in enumerate(self._queue):
            if request.request_id == request_id:
                del self._queue[i]
                return True
        for i, slot in enumerate(self._slots):
            if slot.request.request_id == request_id:
                self._remove([i])
                return True
        return False

    def abort_active(self) -> List[Request]:
        """Drop every active slot and return their requests (queued ones stay queued). For use
        after `step` raised: the slots' state may be half-updated, so those requests failed;
        the engine is usable afterwards."""
        dropped = [slot.request for slot in self._slots]
        self._slots = []
        return dropped

    def _rule_args(self):
        rule = self.schedule.rule
        return rule.eta, rule.eta_below, rule.t_switch

    def _plan(self, steps: int) -> StepPlan:
        """The plan of `steps` steps, its rows appended to the device table the first time."""
        if steps not in self._plans:
            plan = plan_steps(self.scheduler, steps, *self._rule_args())
            rows = plan.coeffs.to(torch.float32)  # the op's coefficients are float32 (as guided_step takes them)
            rows[:, _SCALE_COL] = plan.input_scale.to(torch.float32)
            stored = plan.timesteps.to(torch.float32)
            if not torch.equal(stored.to(plan.timesteps.dtype), plan.timesteps):
                # diffusers' timesteps are integers < 1000 (DDIM, DDPM) or fp32 (Euler): exact in fp32.
                raise ValueError(f"the scheduler's timesteps ({plan.timesteps.dtype}) are not exact in float32")
            rows[:, _T_COL] = stored
            self._t_dtype = plan.timesteps.dtype
            self._plan_offset[steps] = self._table.shape[0]
            self._table = torch.cat([self._table, rows.to(self.device)])
            self._table_draws = np.concatenate([self._table_draws, plan.draws_noise.numpy().astype(bool)])
            self._plans[steps] = plan
        return self._plans[steps]

    def _admit(self) -> None:
        first = len(self._slots)
        while self._queue and len(self._slots) < self.max_batch:
            request = self._queue.pop(0)
            i = len(self._slots)
            gen = torch.Generator().manual_seed(int(request.seed))
            noise = torch.randn(self.shape, generator=gen)  # as sampling.initial_noise draws it
            if self.fused_reason is None:
                plan, sched, etas = self._plan(request.steps), None, None
                sigma, total = plan.init_noise_sigma, plan.steps
                self._h_row[i] = self._plan_offset[request.steps]
            else:
                plan, sched = None, copy.deepcopy(self.scheduler)
                etas = [eta for _, eta in self.schedule.steps(sched, request.steps, self.device)]
                sigma, total = sched.init_noise_sigma, len(sched.timesteps)
            self._x[i] = noise.to(self.device) * sigma
            self._h_step[i], self._h_total[i] = 0, total
            self._h_cfg[i] = float(request.guidance_scale)
            self._h_strength[i] = float(self.denoiser.strength if request.strength is None else request.strength)
            self._slots.append(_Slot(request, gen, plan, sched, etas))
        new = slice(first, len(self._slots))
        if new.start == new.stop:
            return
        # One host-to-device copy per field for everything admitted in this step.
        base = self.denoiser.base
        ids = torch.tensor([int(s.request.prompt_id) for s in self._slots[new]], device=self.device)
        embeds = base.prompt_embeds(ids)
        if self._embeds is None:
            self._embeds = torch.empty((self.max_batch, *embeds.shape[1:]), device=embeds.device, dtype=embeds.dtype)
            self._null_embeds = base.prompt_embeds(torch.full_like(ids[:1], base.conditioner.null_id))
        self._embeds[new] = embeds
        self._row[new] = torch.from_numpy(self._h_row[new]).to(self.device)
        # fp32, as the fused step's CFG_SCALE column and cfg_combine's per-sample scale take it.
        # float64 on the host rounded once to fp32: the values a scalar strength's table held.
        self._cfg[new] = torch.from_numpy(self._h_cfg[new]).to(device=self.device, dtype=torch.float32)
        ratio = self.denoiser.guidance.ratio if self.denoiser.guidance is not None else None
        columns = np.array([strength_coefficients(ratio, s) for s in self._h_strength[new]], dtype=np.float64)  # (k, 2)
        self._c_eps[new] = torch.from_numpy(columns[:, 0].copy()).to(device=self.device, dtype=torch.float32)
        self._c_g[new] = torch.from_numpy(columns[:, 1].copy()).to(device=self.device, dtype=torch.float32)

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
        expand = (slice(None),) + (None,) * len(self.shape)
        if self.fused_reason is None:
            coeffs = self._table[self._row[:n]]  # (n, NUM_COEFFS): the one gather of this step
            timesteps = coeffs[:, _T_COL].to(self._t_dtype)
            model_in = x * coeffs[:, _SCALE_COL][expand]
        else:
            coeffs = None
            timesteps = torch.stack([s.scheduler.timesteps[int(self._h_step[i])] for i, s in enumerate(self._slots)]).to(self.device)
            model_in = torch.cat([s.scheduler.scale_model_input(x[i : i + 1], timesteps[i]) for i, s in enumerate(self._slots)])
        use_cfg = bool((self._h_cfg[:n] != 1.0).any())
        use_g = bool((self._h_strength[:n] != 0.0).any())
        cond = self._embeds[:n]
        model_in = model_in.to(self.dtype)
        # schedule.guidance_every > 1: the rows whose G body runs at this step (host), the others
        # reuse their slot's stored body output (G's head, gains and gate run on every row).
        fresh = None
        if use_g and self.schedule.guidance_every > 1:
            fresh = torch.from_numpy(~self.schedule.reuses_guidance(self._h_step[:n])).to(self.device)
            if self._body is None:
                dtype = next(self.denoiser.guidance.parameters()).dtype
                self._body = torch.zeros((2, self.max_batch, *self.shape), device=self.device, dtype=dtype)
        if use_cfg:
            uncond = self._null_embeds.expand(n, *self._null_embeds.shape[1:])
            extra = {} if fresh is None else {"fresh": fresh.repeat(2), "body": torch.cat([self._body[0, :n], self._body[1, :n]])}
            eps, g, *body = self.denoiser.branches(torch.cat([model_in, model_in]), torch.cat([timesteps, timesteps]),
                                                   torch.cat([uncond, cond]), native=True, run_guidance=use_g, **extra)
            if fresh is not None:
                self._body[0, :n], self._body[1, :n] = body[0].chunk(2)
            eps, g = self._step_inputs(eps, g)
            eps_u, eps_c = eps.chunk(2)
            g_u, g_c = g.chunk(2) if g is not None else (None, None)
        else:
            extra = {} if fresh is None else {"fresh": fresh, "body": self._body[1, :n]}  # a view: updated in place
            eps_c, g_c, *_ = self.denoiser.branches(model_in, timesteps, cond, native=True, run_guidance=use_g, **extra)
            eps_c, g_c = self._step_inputs(eps_c, g_c)
            eps_u = g_u = None
        self.model_evaluations += 1
        self.slot_steps += n
        if self.fused_reason is None:
            self._fused_update(x, eps_u, eps_c, g_u, g_c, coeffs)
        else:
            self._scheduler_update(x, eps_u, eps_c, g_u, g_c, timesteps)
        self._h_step[:n] += 1
        return self._retire()

    def _step_inputs(self, eps, g):
        """The model outputs as the fused step takes them next to the fp32 state: in their own
        dtype when it is fp32, bf16 or fp16 (no upcast copy: half the bytes the step reads for a
        16-bit model), otherwise fp32; eps and G's output in one dtype (the wider of the two)."""
        dtype = eps.dtype if g is None else torch.promote_types(eps.dtype, g.dtype)
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            dtype = torch.float32
        return eps.to(dtype), (g.to(dtype) if g is not None else None)

    def _fused_update(self, x, eps_u, eps_c, g_u, g_c, coeffs) -> None:
        n = x.shape[0]
        # The per-slot columns of the table, on the device, in place. Without G's output (no G,
        # every strength 0, or outside G's band) every slot takes the frozen eps alone.
        if g_c is None:
            coeffs[:, Col.C_EPS], coeffs[:, Col.C_G] = 1.0, 0.0
        else:
            coeffs[:, Col.C_EPS], coeffs[:, Col.C_G] = self._c_eps[:n], self._c_g[:n]
        coeffs[:, Col.CFG_SCALE] = self._cfg[:n]
        draws = self._table_draws[self._h_row[:n]]
        noise = None
        if draws.any():
            # One (1, C, H, W) draw per drawing slot from its own generator, exactly as diffusers'
            # randn_tensor draws for a list of generators; slots that do not draw get zeros.
            noise = torch.zeros((n, *self.shape))
            for i in np.flatnonzero(draws):
                noise[i] = torch.randn((1, *self.shape), generator=self._slots[i].generator)[0]
            noise = noise.to(self.device)
        ops.guided_step(x, eps_u, eps_c, g_u, g_c, coeffs, noise, out=x)
        self._row[:n] += 1
        self._h_row[:n] += 1

    def _scheduler_update(self, x, eps_u, eps_c, g_u, g_c, timesteps) -> None:
        if g_c is not None:
            eps_c = self._combine_per_strength(eps_c, g_c)
            eps_u = self._combine_per_strength(eps_u, g_u) if eps_u is not None else None
        scales = self._cfg[: x.shape[0]]
        m = ops.cfg_combine(eps_u, eps_c, scales.to(eps_c)) if eps_u is not None else eps_c
        for i, slot in enumerate(self._slots):
            eta = slot.etas[int(self._h_step[i])]  # a DDIM the fused step cannot take (thresholding) still follows the rule
            extra = {} if eta is None else {"eta": eta}
            x[i : i + 1] = slot.scheduler.step(m[i : i + 1], timesteps[i], x[i : i + 1], generator=[slot.generator], **extra).prev_sample

    def _combine_per_strength(self, eps: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """G's combine at each slot's strength (eps, g: (n, C, H, W)), one call per distinct
        strength with the strength as a Python float: the same arithmetic (and rounding) as a
        whole batch at that strength."""
        strengths = self._h_strength[: eps.shape[0]]
        values = np.unique(strengths)
        if len(values) == 1:
            return self.denoiser.guidance.combine(eps, g, float(values[0]))
        out = None
        for value in values:
            rows = torch.from_numpy(np.flatnonzero(strengths == value)).to(eps.device)
            part = self.denoiser.guidance.combine(eps[rows], g[rows], float(value))
            out = torch.empty(eps.shape, dtype=part.dtype, device=eps.device) if out is None else out
            out[rows] = part
        return out

    def _retire(self) -> Dict[int, torch.Tensor]:
        n = len(self._slots)
        finished = np.flatnonzero(self._h_step[:n] >= self._h_total[:n]).tolist()
        if not finished:
            return {}
        images = self.postprocess(self._x[finished].clone())  # one batched decode for all that finished
        done = {self._slots[i].request.request_id: images[j].cpu() for j, i in enumerate(finished)}
        self._remove(finished)
        return done

    def _remove(self, indices: List[int]) -> None:
        """Free the slots `indices`, moving the last occupied slots into the holes so that the
        occupied ones stay packed at the front (x[:n] stays a view): every per-slot row moves
        with its slot, on the device and in the host mirrors."""
        order = list(range(len(self._slots)))
        for i in sorted(indices, reverse=True):
            last = order.pop()
            if i < len(order):
                order[i] = last
        moved = [(dst, src) for dst, src in enumerate(order) if dst != src]
        self._slots = [self._slots[src] for src in order]
        if not moved:
            return
        dst, src = (list(v) for v in zip(*moved))
        for host in (self._h_row, self._h_step, self._h_total, self._h_cfg, self._h_strength):
            host[dst] = host[src]
        dst_d, src_d = torch.tensor(dst, device=self.device), torch.tensor(src, device=self.device)
        # Every source sits behind the packed front and every destination in it: no overlap.
        for dev in (self._x, self._row, self._cfg, self._c_eps, self._c_g, self._embeds):
            dev[dst_d] = dev[src_d]
        if self._body is not None:
            self._body[:, dst_d] = self._body[:, src_d]

    # ------------------------------------------------------------------ driving
    def run(self, requests: Iterable[Request] = (), progress: bool = False) -> Dict[int, torch.Tensor]:
        """Submit `requests`, step until every queued and active request is done, return images."""
        from tqdm.auto import tqdm

        for r in requests:
            self.submit(r)
        n = len(self._slots)
        total = sum(r.steps for r in self._queue) + int((self._h_total[:n] - self._h_step[:n]).sum())
        results: Dict[int, torch.Tensor] = {}
        with tqdm(total=total, desc="sample", disable=not progress, unit="img-step") as bar:
            while self._queue or self._slots:
                before = self.slot_steps
                results.update(self.step())
                bar.update(self.slot_steps - before)
        return results
