"""Training loops: the biased base model and the min step (G_psi under the invariant objective).

Both run through `accelerate`, so the same code runs on one CPU, one GPU or under
`accelerate launch`. Both optimise through `invdiff.ops.invariant_loss`: the base model and ERM
are the single-environment case of the same objective.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import torch
from accelerate import Accelerator
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from . import ops
from .config import LAM_MODES, BaseTrainConfig, DebiasConfig
from .distributed import all_reduce_sum_, global_invariant_loss_with_stats, global_mean, shard
from .data.base import DiffusionDataset
from .io import atomic_write_json, read_json
from .models.base import FrozenBase, base_unet_config, default_scheduler, training_target
from .models.conditioner import PromptEmbedding
from .models.guidance import GuidanceModule


_DEBIAS = DebiasConfig  # the min step's defaults shared with `invdiff debias`, given once there


@dataclass
class MinStepConfig:
    """The min step's settings. Those `invdiff debias` sets from its DebiasConfig default to
    DebiasConfig's values (relative lambda, lr 1e-2, 1000 steps); pass lam_mode="absolute" for
    the official L_e."""

    steps: int = _DEBIAS.steps
    batch_size: int = _DEBIAS.batch_size
    lr: float = _DEBIAS.lr
    lam: float = _DEBIAS.lam
    lam_warmup: int = _DEBIAS.lam_warmup  # steps over which lambda ramps linearly from 0 (V-REx penalty annealing)
    # "relative": lambda is divided by the batch's mean loss, so lambda * Var is measured in
    # units of the loss itself and a group's effective weight is 1/K + 2*lam*(R_k - R)/((K-1)*R).
    # "absolute" is the official L_e with lambda as given.
    lam_mode: str = _DEBIAS.lam_mode
    cfg_dropout: float = 0.1
    seed: int = _DEBIAS.seed
    # "invariant": L_e. "groupdro": GroupDRO (Sagawa et al. 2020) on the same groups, sum_k q_k R_k
    # with q updated online by exponentiated gradient (step `groupdro_eta`) towards the worst group.
    objective: str = _DEBIAS.objective
    groupdro_eta: float = 0.01
    ema_decay: Optional[float] = _DEBIAS.ema_decay  # EMA of G's weights, copied into G at the end (None: off)
    # Gradient accumulation: the global batch is cut into this many micro-batches, each forms its
    # OWN group statistics (R_k, Var_k) and L_e, and their gradients are averaged before one
    # optimiser step. So the objective is the mean of per-micro-batch L_e, not L_e of the whole
    # accumulated batch (the variance of means over smaller batches is larger).
    grad_accum: int = _DEBIAS.grad_accum
    # Checkpoints (accelerate save_state), written atomically every `checkpoint_every` steps into
    # checkpoint_dir/checkpoint-STEP, keeping the newest `keep_checkpoints`; resume="latest" or a path.
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    resume: Optional[str] = None


CHECKPOINT_PREFIX = "checkpoint-"


def latest_checkpoint(directory: Optional[str]) -> Optional[str]:
    """The newest complete checkpoint folder in `directory` (None if there is none)."""
    if not directory or not os.path.isdir(directory):
        return None
    steps = sorted(int(n[len(CHECKPOINT_PREFIX):]) for n in os.listdir(directory)
                   if n.startswith(CHECKPOINT_PREFIX) and n[len(CHECKPOINT_PREFIX):].isdigit())
    return os.path.join(directory, f"{CHECKPOINT_PREFIX}{steps[-1]:07d}") if steps else None


def claim_checkpoint_dir(checkpoint_dir: str, identity: Dict, resume: Optional[str] = None) -> None:
    """Tie `checkpoint_dir` to one debias run: a checkpoint only continues the run that made it
    (the same base, data and config, `identity`, kept in its run.json). A folder that belongs to
    another run, or `resume` with no checkpoints of this run, is a ValueError; a new folder is
    made and claimed. Called by the main process only."""
    marker = os.path.join(checkpoint_dir, "run.json")
    if os.path.isfile(marker):
        stored = read_json(marker, what="checkpoint run description")
        if stored != json.loads(json.dumps(identity)):
            raise ValueError(f"the checkpoints in {checkpoint_dir!r} belong to a run with other settings; "
                             "use another --checkpoint-dir or remove them")
    elif resume:
        raise ValueError(f"--resume {resume}: no checkpoints of this run in {checkpoint_dir!r}")
    else:
        os.makedirs(checkpoint_dir, exist_ok=True)
        atomic_write_json(marker, identity)


class _LoopState:
    """The loop's own progress, checkpointed beside the model, optimiser and LR schedule."""

    def __init__(self):
        self.step = 0
        self.log: List[Dict] = []

    def state_dict(self):
        return {"step": self.step, "log": json.dumps(self.log)}

    def load_state_dict(self, state):
        self.step = int(state["step"])
        self.log = json.loads(state["log"])


def _save_checkpoint(accelerator, directory: str, step: int, keep: int) -> None:
    """accelerate.save_state into a temporary folder, then one rename: a kill during the write
    leaves the previous checkpoints intact and no half-written one under a checkpoint name."""
    final = os.path.join(directory, f"{CHECKPOINT_PREFIX}{step:07d}")
    tmp = os.path.join(directory, f".tmp-{CHECKPOINT_PREFIX}{step:07d}")
    if accelerator.is_main_process:
        os.makedirs(directory, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        done = sorted(n for n in os.listdir(directory) if n.startswith(CHECKPOINT_PREFIX))
        for old in done[: max(0, len(done) - keep)]:
            shutil.rmtree(os.path.join(directory, old), ignore_errors=True)
    accelerator.wait_for_everyone()


def adamw(params, lr: float) -> torch.optim.AdamW:
    """AdamW with PyTorch's fused implementation where it exists. G_psi has ~170 small tensors;
    the default per-tensor loop spent 11.8 ms per step on them on the CPU machine, the fused
    kernel 1.9 ms (measured; the whole batch-32 min step was 45 ms)."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    except (RuntimeError, TypeError, ValueError):  # an older torch, or a device without the fused kernel
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """Index batches drawn from reshuffled epochs, `steps` of them."""
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        while order.numel() < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        yield order[:batch_size]
        order = order[batch_size:]


def _noised(scheduler, images: torch.Tensor, generator: torch.Generator, t_min: int = 0):
    """(x_t, t, target) with t uniform on [t_min, T)."""
    b = images.shape[0]
    noise = torch.randn(images.shape, generator=generator)
    t = torch.randint(t_min, scheduler.config.num_train_timesteps, (b,), generator=generator)
    return scheduler.add_noise(images, noise, t), t, training_target(scheduler, images, noise, t)


def _drop_prompts(prompt_ids: torch.Tensor, null_id: int, p: float, generator: torch.Generator) -> torch.Tensor:
    drop = torch.rand(prompt_ids.shape, generator=generator) < p
    return torch.where(drop, torch.full_like(prompt_ids, null_id), prompt_ids)


class NonFiniteLossError(ValueError):
    """Training produced a NaN or infinite loss; the run stops and nothing is saved."""


def check_finite_loss(value: float, step: int, what: str) -> float:
    """Stop at the first non-finite loss: the weights after it are garbage, and saving them would
    hand the user a model that samples black images."""
    if not math.isfinite(value):
        raise NonFiniteLossError(f"{what}: the loss became {value} at step {step}; nothing was saved "
                                 "(try a lower learning rate, or check the data for NaNs)")
    return value


def train_base(dataset: DiffusionDataset, config: BaseTrainConfig = BaseTrainConfig(), progress: bool = True) -> FrozenBase:
    """Train the (biased) base UNet and its prompt conditioner with CFG dropout; returns it, EMA weights."""
    dataset = dataset.training_view()
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    unet = UNet2DConditionModel(
        **base_unet_config(dataset.resolution, dataset.channels, config.widths, config.embedding_dim)
    )
    conditioner = PromptEmbedding(prompts=list(dataset.prompts), embedding_dim=config.embedding_dim)
    noise_scheduler = default_scheduler()
    model = FrozenBase(unet, conditioner, noise_scheduler)
    params = list(model.unet.parameters()) + list(model.conditioner.parameters())
    ema = EMAModel(params, decay=config.ema_decay)
    # The default (unfused) AdamW: the shipped base checkpoints are rebuilt bit for bit by
    # scripts/make_assets.py with this optimiser.
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config.warmup, config.steps))
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model, opt = accelerator.prepare(model, opt)
    ones = torch.ones(config.batch_size, 1)
    bar = tqdm(total=config.steps, desc="train-base", disable=not progress)
    log = []
    for step, idx in enumerate(_batches(len(dataset), config.batch_size, config.steps, gen)):
        clean = dataset.images[idx]
        if getattr(dataset, "random_flip", False):  # horizontal flip of a random half, as diffusers' scripts do
            flip = torch.rand(len(idx), generator=gen) < 0.5
            clean = torch.where(flip.view(-1, 1, 1, 1), clean.flip(-1), clean)
        x_t, t, target = _noised(noise_scheduler, clean, gen)
        pid = _drop_prompts(dataset.prompt_ids[idx], conditioner.null_id, config.cfg_dropout, gen)
        # Data parallel: every rank drew the same global batch and trains on its rows of it. The
        # local mean is scaled so that DDP's average over ranks is the global batch's mean.
        x_t, t, target, pid = shard((x_t, t, target, pid), accelerator.process_index, accelerator.num_processes)
        share = len(pid) * accelerator.num_processes / len(idx)
        dev = accelerator.device
        inner = accelerator.unwrap_model(model)
        pred = inner.eps(x_t.to(dev), t.to(dev), inner.prompt_embeds(pid.to(dev)))
        loss = share * ops.invariant_loss(pred, target.to(dev), ones[: len(pid)].to(dev), lam=0.0)
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(params)
        log.append(check_finite_loss(float(loss.detach()), step, "train-base"))
        # Every step (refresh=False: tqdm redraws at its own rate), so the bar never shows a
        # stale loss; the float above is already on the host.
        bar.set_postfix(loss=f"{sum(log[-50:]) / len(log[-50:]):.4f}", refresh=False)
        bar.update(1)
    bar.close()
    inner = accelerator.unwrap_model(model)
    ema.copy_to(params)
    inner.meta = {
        "kind": "invdiff-base",
        "dataset": dataset.name,
        "dataset_info": dataset.info,
        "train": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "final_loss": sum(log[-100:]) / max(1, len(log[-100:])),
    }
    return inner.to("cpu").freeze()


def new_guidance(base: FrozenBase, config: DebiasConfig, t_min: int = 0, band_start: int = 0):
    """A fresh G_psi for `base`, of the kind `config` asks: LoRA adapters on the frozen UNet
    (models/lora.py) or a narrow zero-initialised UNet of its own (GuidanceModule), acting from
    t_min, with the attribute band from band_start. Its initial weights depend on config.seed
    only, not on what ran before: the global torch seed is set to it first."""
    torch.manual_seed(config.seed)
    if config.guidance_kind == "lora":
        from .models.lora import LoraGuidance

        guidance = LoraGuidance.from_frozen(base.unet, config.ratio, config.lora_rank, t_min=t_min, band_start=band_start)
    else:
        guidance = GuidanceModule.from_frozen(base.unet.config, config.preset, config.ratio, t_min=t_min,
                                              head_kind=config.head, body=config.body,
                                              head_sees_sample=config.head_sees_sample, band_start=band_start)
    if config.grad_checkpointing and getattr(guidance, "unet", None) is not None:
        guidance.unet.enable_gradient_checkpointing()
    return guidance


def min_step_config(config: DebiasConfig, checkpoint_dir: Optional[str] = None, checkpoint_every: int = 0,
                    keep_checkpoints: int = 2, resume: Optional[str] = None) -> MinStepConfig:
    """The MinStepConfig of a debias run with `config`, with its checkpoints (see MinStepConfig).
    Every objective but GroupDRO trains on the invariant loss (JTT through its upweighted environment)."""
    return MinStepConfig(
        steps=config.steps,
        batch_size=config.batch_size,
        lr=config.lr,
        lam=config.lam,
        lam_warmup=config.lam_warmup,
        lam_mode=config.lam_mode,
        seed=config.seed,
        objective="groupdro" if config.objective == "groupdro" else "invariant",
        ema_decay=config.ema_decay,
        grad_accum=config.grad_accum,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints,
        resume=resume,
    )


def train_guidance(
    base: FrozenBase,
    guidance: GuidanceModule,
    dataset: DiffusionDataset,
    weights: torch.Tensor,
    config: MinStepConfig = MinStepConfig(),
    progress: bool = True,
    desc: str = "min-step",
    bank=None,
) -> List[Dict]:
    """The min step: train only G_psi on L_e = mean_k R_k + lam * Var_k R_k.

    weights: (N, K) environment weights aligned with `dataset` rows. Returns the per-step log
    (loss, group risks, variance term, lambda in force).

    bank: optional `environments.FrozenBank` for `dataset`. With it, each step draws one of the
    bank's fixed (t, noise) draws per sample and reuses the frozen prediction, so the frozen UNet
    only runs for the prompt-dropped (unconditional) rows; the expectation over t and noise in
    L_e becomes an average over the bank's draws. Without it, t and noise are fresh every step.
    """
    dataset = dataset.training_view()
    if weights.shape[0] != len(dataset):
        raise ValueError(f"weights have {weights.shape[0]} rows for {len(dataset)} samples")
    if config.lam < 0:
        raise ValueError(f"lambda must be >= 0, got {config.lam}")
    if config.lam_mode not in LAM_MODES:
        raise ValueError(f"lam_mode must be 'absolute' or 'relative', got {config.lam_mode!r}")
    if config.objective not in ("invariant", "groupdro"):
        raise ValueError(f"objective must be 'invariant' or 'groupdro', got {config.objective!r}")
    if config.grad_accum < 1 or config.batch_size % config.grad_accum:
        raise ValueError(f"grad_accum must be >= 1 and divide batch_size {config.batch_size}, got {config.grad_accum}")
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    base = base.freeze()
    trained = [p for p in guidance.parameters() if p.requires_grad]
    opt = adamw(trained, config.lr)
    ema = EMAModel(trained, decay=config.ema_decay) if config.ema_decay else None
    group_q = torch.full((weights.shape[1],), 1.0 / weights.shape[1])  # GroupDRO's group weights
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(min(50, config.steps // 10), config.steps))
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    guidance, opt = accelerator.prepare(guidance, opt)
    state = _LoopState()
    accelerator.register_for_checkpointing(sched, state)
    rank, world = accelerator.process_index, accelerator.num_processes
    dev = accelerator.device
    base.to(dev)
    inner = accelerator.unwrap_model(guidance)
    resume_from = latest_checkpoint(config.checkpoint_dir) if config.resume == "latest" else config.resume
    if resume_from:
        accelerator.load_state(resume_from)
    bar = tqdm(total=config.steps, initial=state.step, desc=desc, disable=not progress or not accelerator.is_main_process)
    t0 = time.time()

    def draw(idx):
        """All of one step's randomness, for the global batch, from `gen` (identical on every
        rank, so each rank takes its own rows of the same global batch)."""
        pid = _drop_prompts(dataset.prompt_ids[idx], base.conditioner.null_id, config.cfg_dropout, gen)
        if bank is None:
            x_t, t, target = _noised(base.scheduler, dataset.images[idx], gen, getattr(inner, "t_min", 0))
            return pid, x_t, t, target, None, None
        if bank.proposal is None:
            pick = torch.randint(0, bank.draws, (len(idx),), generator=gen)
            importance = None
        else:
            pick = torch.multinomial(bank.proposal, len(idx), replacement=True, generator=gen)
            importance = (1.0 / bank.draws) / bank.proposal[pick]
        # An on-disk bank is fp16 (environments.BANK_DTYPE): upcast the drawn rows (a no-op in RAM).
        t, noise, cached = bank.timesteps[pick], bank.noise[idx, pick].float(), bank.pred[idx, pick].float()
        clean = dataset.images[idx]
        return pid, base.scheduler.add_noise(clean, noise, t), t, training_target(base.scheduler, clean, noise, t), cached, importance

    for step, idx in enumerate(_batches(len(dataset), config.batch_size, config.steps, gen)):
        drawn = draw(idx)
        if step < state.step:
            continue  # resuming: replay the random stream up to the checkpoint, without training
        lam = config.lam * min(1.0, (step + 1) / config.lam_warmup) if config.lam_warmup else config.lam
        opt.zero_grad(set_to_none=True)
        stats_of_step = []
        for micro in range(config.grad_accum):
            rows = torch.arange(micro, len(idx), config.grad_accum)  # micro-batch of the global batch
            part = [t[rows] if t is not None else None for t in (idx,) + drawn]
            # This rank's share of the micro-batch.
            m_idx, pid, x_t, t, target, cached, importance = shard(part, rank, world)
            x_t, t, target, pid = x_t.to(dev), t.to(dev), target.to(dev), pid.to(dev)
            with torch.no_grad():
                embeds = base.prompt_embeds(pid)
                if cached is None:
                    eps = base.eps(x_t, t, embeds)
                else:
                    eps = cached.to(dev)
                    dropped = pid == base.conditioner.null_id
                    if dropped.any():  # the bank holds conditional predictions only
                        eps[dropped] = base.eps(x_t[dropped], t[dropped], embeds[dropped]).to(eps.dtype)
            lam_used = lam
            if config.lam_mode == "relative":
                lam_used = lam / float(global_mean(ops.per_sample_mse(eps, target)).clamp_min(1e-12))
            g = guidance(x_t, t, embeds, eps)
            w = weights[m_idx]
            if importance is not None:
                # Self-normalised importance weights: R_k = sum w_ik iw_i l_i / sum w_ik iw_i.
                w = w * importance[:, None]
            w = w.to(dev)
            if config.objective == "groupdro":
                # q moves towards the groups with the highest risk, measured relative to the batch
                # mean: raw risks here are ~0.03, so the usual eta on them would leave q uniform.
                # Under DDP the group sums are all-reduced, so every rank moves q identically.
                with torch.no_grad():
                    l_i = ops.per_sample_mse(ops.guidance_combine(eps, g, inner.ratio), target).float()
                    sums, weighted = w.sum(0), (w * l_i[:, None]).sum(0)
                    if world > 1:
                        all_reduce_sum_(sums)
                        all_reduce_sum_(weighted)
                    risks = weighted / sums.clamp_min(1e-12)
                    present = sums > 0
                    rel = risks / risks[present].mean().clamp_min(1e-12)
                    group_q = torch.where(present.cpu(), group_q * torch.exp(config.groupdro_eta * rel.cpu()), group_q)
                    group_q = group_q / group_q.sum()
                w = _groupdro_weights(w, group_q.to(dev))
                lam_used = 0.0
            if world > 1:
                # Exact global group statistics (see invdiff.distributed).
                stats = global_invariant_loss_with_stats(eps, target, w, lam_used, g=g, ratio=inner.ratio)
            else:
                # One fused op gives L_e and the group risks it formed, so the log costs no second pass.
                stats = ops.invariant_loss_with_stats(eps, target, w, lam_used, g=g, ratio=inner.ratio)
            accelerator.backward(stats.loss / config.grad_accum)
            stats_of_step.append((stats, lam_used))
        accelerator.clip_grad_norm_(guidance.parameters(), 1.0)
        opt.step()
        sched.step()
        if ema is not None:
            ema.step(trained)
        stats, lam_used = stats_of_step[-1]
        r = stats.risks[stats.weight_sums > 0]
        var = float(r.var()) if r.numel() > 1 else 0.0
        loss_value = check_finite_loss(sum(float(s.loss.detach()) for s, _ in stats_of_step) / len(stats_of_step),
                                       step, "min step")
        state.log.append({"step": step, "loss": loss_value, "mean_risk": float(r.mean()), "var_risk": var, "lam": lam_used})
        state.step = step + 1
        bar.set_postfix(loss=f"{loss_value:.4f}", var=f"{var:.2e}", refresh=False)
        bar.update(1)
        if config.checkpoint_every and config.checkpoint_dir and state.step % config.checkpoint_every == 0:
            _save_checkpoint(accelerator, config.checkpoint_dir, state.step, config.keep_checkpoints)
    bar.close()
    if ema is not None:
        ema.copy_to(trained)
    log = list(state.log)
    log.append({"seconds": time.time() - t0, "resumed_from": resume_from, "processes": world})
    return log


def _groupdro_weights(w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(B, K) group weights -> (B, 1) per-sample weights v_i = sum_k q_k W_ik / S_k (S_k the
    group's weight in the batch; empty groups dropped), so that the one-environment loss
    sum_i v_i l_i / sum_i v_i is GroupDRO's sum_k q_k R_k over the present groups."""
    sums = w.sum(0)
    scale = torch.where(sums > 0, q / sums.clamp_min(1e-12), torch.zeros_like(q))
    return (w * scale).sum(1, keepdim=True)
