"""Training loops: the biased base model and the min step (G_psi under the invariant objective).

Both run through `accelerate`, so the same code runs on one CPU, one GPU or under
`accelerate launch`. Both optimise through `invdiff.ops.invariant_loss`: the base model and ERM
are the single-environment case of the same objective.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import torch
from accelerate import Accelerator
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from . import ops
from .data.base import DiffusionDataset
from .models.base import FrozenBase, base_unet_config, default_scheduler, training_target
from .models.conditioner import PromptEmbedding
from .models.guidance import GuidanceModule


@dataclass
class BaseTrainConfig:
    steps: int = 4000
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 100
    cfg_dropout: float = 0.1
    ema_decay: float = 0.999
    widths: tuple = (16, 32, 64)
    embedding_dim: int = 64
    seed: int = 0


@dataclass
class MinStepConfig:
    steps: int = 600
    batch_size: int = 128
    lr: float = 1e-3
    lam: float = 1.0
    lam_warmup: int = 0  # steps over which lambda ramps linearly from 0 (V-REx penalty annealing)
    # "relative": lambda is divided by the batch's mean loss, so lambda * Var is measured in
    # units of the loss itself and a group's effective weight is 1/K + 2*lam*(R_k - R)/((K-1)*R).
    # "absolute" is the official L_e with lambda as given.
    lam_mode: str = "absolute"
    cfg_dropout: float = 0.1
    seed: int = 0


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


def _noised(scheduler, images: torch.Tensor, generator: torch.Generator):
    b = images.shape[0]
    noise = torch.randn(images.shape, generator=generator)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator)
    return scheduler.add_noise(images, noise, t), t, training_target(scheduler, images, noise, t)


def _drop_prompts(prompt_ids: torch.Tensor, null_id: int, p: float, generator: torch.Generator) -> torch.Tensor:
    drop = torch.rand(prompt_ids.shape, generator=generator) < p
    return torch.where(drop, torch.full_like(prompt_ids, null_id), prompt_ids)


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
        dev = accelerator.device
        inner = accelerator.unwrap_model(model)
        pred = inner.eps(x_t.to(dev), t.to(dev), inner.prompt_embeds(pid.to(dev)))
        loss = ops.invariant_loss(pred, target.to(dev), ones[: len(idx)].to(dev), lam=0.0)
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(params)
        log.append(float(loss.detach()))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(log[-50:]) / len(log[-50:]):.4f}")
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
    if config.lam_mode not in ("absolute", "relative"):
        raise ValueError(f"lam_mode must be 'absolute' or 'relative', got {config.lam_mode!r}")
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    base = base.freeze()
    opt = torch.optim.AdamW(guidance.parameters(), lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(min(50, config.steps // 10), config.steps))
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    guidance, opt = accelerator.prepare(guidance, opt)
    dev = accelerator.device
    base.to(dev)
    inner = accelerator.unwrap_model(guidance)
    log: List[Dict] = []
    bar = tqdm(total=config.steps, desc=desc, disable=not progress)
    t0 = time.time()
    for step, idx in enumerate(_batches(len(dataset), config.batch_size, config.steps, gen)):
        pid = _drop_prompts(dataset.prompt_ids[idx], base.conditioner.null_id, config.cfg_dropout, gen)
        if bank is None:
            x_t, t, target = _noised(base.scheduler, dataset.images[idx], gen)
            cached, importance = None, None
        else:
            if bank.proposal is None:
                draw = torch.randint(0, bank.draws, (len(idx),), generator=gen)
                importance = None
            else:
                draw = torch.multinomial(bank.proposal, len(idx), replacement=True, generator=gen)
                importance = (1.0 / bank.draws) / bank.proposal[draw]
            t, noise, cached = bank.timesteps[draw], bank.noise[idx, draw], bank.pred[idx, draw]
            clean = dataset.images[idx]
            x_t = base.scheduler.add_noise(clean, noise, t)
            target = training_target(base.scheduler, clean, noise, t)
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
        lam = config.lam * min(1.0, (step + 1) / config.lam_warmup) if config.lam_warmup else config.lam
        if config.lam_mode == "relative":
            lam = lam / float(ops.per_sample_mse(eps, target).mean().clamp_min(1e-12))
        g = guidance(x_t, t, embeds, eps)
        w = weights[idx]
        if importance is not None:
            # Self-normalised importance weights: R_k = sum w_ik iw_i l_i / sum w_ik iw_i.
            w = w * importance[:, None]
        w = w.to(dev)
        # One fused op gives L_e and the group risks it formed, so the log costs no second pass.
        stats = ops.invariant_loss_with_stats(eps, target, w, lam, g=g, ratio=inner.ratio)
        loss = stats.loss
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(guidance.parameters(), 1.0)
        opt.step()
        sched.step()
        r = stats.risks[stats.weight_sums > 0]
        var = float(r.var()) if r.numel() > 1 else 0.0
        log.append({"step": step, "loss": float(loss.detach()), "mean_risk": float(r.mean()), "var_risk": var, "lam": lam})
        if step % 10 == 0:
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}", var=f"{var:.2e}")
        bar.update(1)
    bar.close()
    log.append({"seconds": time.time() - t0})
    return log
