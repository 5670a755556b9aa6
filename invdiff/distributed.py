"""Data parallelism on PyTorch's own machinery (accelerate / torchrun, DDP, NCCL or gloo).

The one thing InvDiff needs beyond plain DDP is an exact invariant objective: the group risks
R_k and their variance must be those of the *global* batch. Averaging per-rank L_e (what the
official code does per GPU) is a different, noisier objective: each rank's R_k comes from a
fraction of the batch, and the variance of noisier means is larger. Here the per-group weighted
loss sums and weight sums are all-reduced with a differentiable all-reduce, and L_e is formed from
the global sums on every rank. Backward through the all-reduce sums the (identical) upstream
gradients of all ranks, world_size x dL/dS_k, and DDP's gradient averaging divides by world_size:
each parameter gets exactly the gradient of one process on the concatenated batch.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .ops import reference
from .ops.reference import InvariantLossStats


def rank_and_world() -> Tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(tensors: Sequence[Optional[torch.Tensor]], rank: int, world: int):
    """Every tensor's rows rank, rank + world, ...: this rank's part of a global batch drawn
    identically on all ranks (None passes through)."""
    if world == 1:
        return list(tensors)
    return [t[rank::world] if t is not None else None for t in tensors]


def broadcast_from_main(obj):
    """Rank 0's `obj` (any picklable value) on every rank; `obj` itself on one process."""
    if rank_and_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op on one process). Not differentiable: for results, not losses."""
    if rank_and_world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def global_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of `values` over the global batch (every rank's rows), without gradient."""
    if rank_and_world()[1] == 1:
        return values.detach().mean()
    acc = torch.stack([values.detach().double().sum(), torch.tensor(float(values.numel()), dtype=torch.float64, device=values.device)])
    all_reduce_sum_(acc)
    return (acc[0] / acc[1]).to(values.dtype)


def global_invariant_loss_with_stats(
    pred: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
    lam: float = 1.0,
    *,
    g: Optional[torch.Tensor] = None,
    ratio: Optional[float] = None,
) -> InvariantLossStats:
    """L_e of the global batch, from this rank's rows.

    pred, target, g: this rank's (b, C, H, W); weights: this rank's (b, K) environment weights.
    Returns the same L_e and group statistics on every rank (per_sample stays local). On one
    process it equals `invdiff.ops.reference.invariant_loss_with_stats`.
    """
    reference.check_invariant_loss_args(pred, target, weights, lam, g, ratio)
    if g is not None:
        pred = reference.guidance_combine(pred, g, ratio)
    losses = reference.per_sample_mse(pred, target)
    w = weights.to(losses.dtype)
    sums = torch.cat([(w * losses.unsqueeze(1)).sum(0), w.sum(0)])  # (2K,): sum_i W_ik l_i, then sum_i W_ik
    if rank_and_world()[1] > 1:
        from torch.distributed.nn.functional import all_reduce

        sums = all_reduce(sums, op=dist.ReduceOp.SUM)
    k = weights.shape[1]
    weighted, weight_sums = sums[:k], sums[k:]
    present = weight_sums > 0
    risks = torch.where(present, weighted / weight_sums.clamp_min(torch.finfo(losses.dtype).tiny), torch.zeros_like(weighted))
    loss = reference.invariant_objective(risks, present, lam)
    return InvariantLossStats(loss, losses.detach(), risks.detach(), weight_sums.detach())


def init_from_env() -> Tuple[int, int]:
    """Join the process group when launched by torchrun or `accelerate launch` (WORLD_SIZE > 1):
    accelerate's PartialState picks NCCL on GPUs and gloo on the CPU. Returns (rank, world)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (dist.is_available() and dist.is_initialized()):
        from accelerate import PartialState

        PartialState()
    return rank_and_world()


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()
