"""The max step: per-sample losses of the frozen model, and latent environment inference.

1. `collect_losses` evaluates the frozen model's denoising loss for every sample on a fixed,
   stratified t grid with noise seeded by (seed, sample id), so a sample's losses do not depend on
   the batch it landed in and are comparable across samples.
2. `aggregate_losses` turns the (N, T) matrix into one score per sample. Both "zscore" and the
   default, "spread" (DebiasConfig.aggregation), standardise each timestep's losses across the
   samples *of the same prompt*; "zscore" then averages over t, "spread" weights each timestep by
   how much the samples' losses disagree there (`spread_weights`).
   Why: with eps-prediction the raw loss is largest at low t, where it mostly measures how
   unusual a digit's *shape* is, while the spurious attribute (colour) is decided at high t. A
   plain mean is dominated by low t and by which prompt is hard; z-scoring per (t, prompt) gives
   every timestep the same say and compares a sample only with others of its own prompt, and the
   spread weights then give most say to the band where the attribute is decided. The prompt is
   the conditioning, not a bias label, so this stays label-free.
3. The score becomes groups, per prompt or pooled (`MaxStepPolicy`, `groups_from_losses`):
   "otsu" (default) cuts where the winsorized scores' within-group variance is least, every group
   above the lowest at most half of the prompt; "gap" cuts at the widest gaps in the upper half;
   "mixture" takes a Gaussian mixture's responsibilities; "official" (`infer_environments`) is
   the paper's recipe: soft weights W (N, K) on the simplex, Adam (lr 0.01) for 500 full-batch
   steps from a uniform-random init, projected after each step, to *maximise* the spread
   std_k R_k of the group mean losses (optionally + alpha * min l_i W_ik).
4. `guidance_band` picks, from the same losses, the band of t where G_psi acts.

This module holds the max step's whole policy, behind one entry point, `max_step`: the groups
(and JTT's upweighting of them), the attribute band, the min step's t proposal and the label-free
diagnostics. debiasing.debias and the demo call it; config.py only names the settings.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
from tqdm.auto import tqdm

from .data.base import DiffusionDataset
from .config import AGGREGATIONS, MAX_STEP_METHODS, DebiasConfig  # noqa: F401 (re-exported)
from .io import CheckpointError, atomic_save_file, load_safetensors
from .models.base import FrozenBase, training_target
from .distributed import all_reduce_sum_, barrier, broadcast_from_main, rank_and_world
from .outputs import owned_prefix, sweep_stale_temporaries
from .ops import per_sample_mse


class LossError(ValueError):
    pass


def timestep_grid(num_timesteps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """(T,) stratified timesteps: the midpoints of T equal bins over [0, num_train_timesteps)."""
    if num_timesteps < 1:
        raise ValueError("num_timesteps must be >= 1")
    edges = torch.arange(num_timesteps, dtype=torch.float64) + 0.5
    return (edges * num_train_timesteps / num_timesteps).long()


# The on-disk bank's dtype. Its values are noise ~ N(0, 1) and predictions of noise or v of the
# same size, far inside fp16's range (6e-5 to 65504), where fp16 keeps 11 significant bits and
# bf16 only 8: 8x less rounding error for the same 2 bytes. A bf16 or fp16 UNet's output is held
# exactly (bf16 -> fp16 is exact for magnitudes from 6e-5 to 65504).
BANK_DTYPE = torch.float16


@dataclass
class FrozenBank:
    """The frozen model's predictions on the max step's fixed draws, kept for the min step.

    timesteps: (J,) the t of draw j; noise, pred: (N, J, C, H, W), row i = dataset row i.
    The frozen model never changes, so its output on these draws is computed once; the min step
    then trains G on batches of (sample, draw) pairs from this bank with no frozen-UNet forward
    (on 2 CPU cores that forward was ~60% of a min-step step; measured).

    In RAM the bank is fp32. On disk (`collect_losses(bank_dir=...)`, what latent bases use) it is
    BANK_DTYPE, memory-mapped from two files in `directory`: at Stable Diffusion size (4 x 64 x 64
    latents, T = 20) fp32 in RAM was 2.6 MB per image; on disk the page cache holds what is read.
    Readers upcast what they draw (`.float()`).
    """

    timesteps: torch.Tensor
    noise: torch.Tensor
    pred: torch.Tensor
    # Optional (J,) sampling distribution over draws for the min step (importance sampling; the
    # trainer reweights by (1/J)/proposal so the objective's expectation over t is unchanged).
    proposal: Optional[torch.Tensor] = None
    # The on-disk bank's folder (None: in RAM), and on the rank that made it the
    # TemporaryDirectory that removes it once no bank refers to it (dataclasses.replace shares it).
    directory: Optional[str] = None
    owner: Optional[tempfile.TemporaryDirectory] = field(default=None, repr=False)

    @property
    def draws(self) -> int:
        return self.timesteps.numel()


BANK_PREFIX = ".invdiff-frozen-bank-"
BANK_FILES = ("noise.fp16", "pred.fp16")  # raw C-order BANK_DTYPE arrays, (N, J, C, H, W) each


def _bank_on_disk(parent: str, shape: Tuple[int, ...]):
    """(noise, pred, folder, owner): two zero BANK_DTYPE tensors of `shape`, each memory-mapped
    (MAP_SHARED) from a file in a new folder inside `parent`. Rank 0 makes the folder and files,
    every rank maps the same files, so what one rank writes the others read."""
    rank, _ = rank_and_world()
    owner, numel = None, math.prod(shape)
    if rank == 0:
        os.makedirs(parent, exist_ok=True)
        # The name carries host and pid: a bank a SIGKILLed run left (gigabytes on real data) is
        # removed here by the next run, which can prove its maker is dead.
        sweep_stale_temporaries(parent, BANK_PREFIX)
        owner = tempfile.TemporaryDirectory(prefix=owned_prefix(BANK_PREFIX), dir=parent, ignore_cleanup_errors=True)
        for name in BANK_FILES:  # created, zero-filled (sparse) at full size
            torch.from_file(os.path.join(owner.name, name), shared=True, size=numel, dtype=BANK_DTYPE)
    folder = broadcast_from_main(owner.name if owner else None)
    if not all(os.path.isfile(os.path.join(folder, name)) for name in BANK_FILES):
        raise RuntimeError(f"rank {rank} cannot see the frozen-prediction bank {folder!r} that rank 0 made: every "
                           "rank maps the same files, so the folder (--latent-cache, or else the output's parent) "
                           "must be on a file system all ranks share")
    noise, pred = (torch.from_file(os.path.join(folder, name), shared=True, size=numel, dtype=BANK_DTYPE).view(shape)
                   for name in BANK_FILES)
    return noise, pred, folder, owner


@torch.no_grad()
def collect_losses(
    base: FrozenBase,
    dataset: DiffusionDataset,
    num_timesteps: int = 10,
    draws: int = 2,
    seed: int = 0,
    batch_size: int = 512,
    progress: bool = True,
    return_bank: bool = False,
    bank_dir: Optional[str] = None,
):
    """The frozen model's per-sample losses on a fixed t grid.

    Returns (losses, timesteps): losses is (N, T) fp32, the mean over `draws` noise draws at each
    grid timestep; timesteps is (T,). With return_bank=True also a `FrozenBank` of every draw:
    fp32 in RAM, or with `bank_dir` fp16 (BANK_DTYPE) in memory-mapped files in a new folder
    inside bank_dir, removed once the bank is no longer referenced. The losses are the same
    either way (they are computed before the predictions are stored).

    Under accelerate/torchrun the batches of (sample, t, draw) jobs are dealt round-robin to the
    ranks and the results summed across them (each cell is written by exactly one rank, so the
    sum is exact): every rank returns the single-process result. An on-disk bank is not summed:
    every rank writes its cells into the one shared file, and waits for the others. (Each rank
    needs all of it: the min step deals every global batch, of any samples, across the ranks.)
    """
    dataset = dataset.training_view()
    base = base.freeze()
    device = next(base.unet.parameters()).device
    grid = timestep_grid(num_timesteps, base.scheduler.config.num_train_timesteps)
    n, shape = len(dataset), dataset.images.shape[1:]
    # (sample, t, draw) triples, flattened so the UNet always sees full batches.
    jobs = n * num_timesteps * draws
    out = torch.zeros(jobs)  # zeros: ranks fill disjoint cells that are then summed
    noise_per_sample = num_timesteps * draws
    bank_noise = bank_pred = bank_folder = bank_owner = None
    if return_bank and bank_dir is not None:
        bank_noise, bank_pred, bank_folder, bank_owner = _bank_on_disk(bank_dir, (n, noise_per_sample, *shape))
    elif return_bank:
        bank_noise = torch.zeros((n, noise_per_sample, *shape))
        bank_pred = torch.zeros((n, noise_per_sample, *shape))
    rank, world = rank_and_world()
    bar = tqdm(total=jobs, desc="max-step losses", disable=not progress or rank != 0, unit="eval")
    for number, start in enumerate(range(0, jobs, batch_size)):
        if number % world != rank:
            continue
        job = torch.arange(start, min(start + batch_size, jobs))
        sample = job // noise_per_sample
        within = job % noise_per_sample
        t = grid[within // draws]
        # Every sample's noise comes from its own generator, seeded by its id: the same sample
        # gets the same noise whatever batch, order or dataset subset it is evaluated in.
        bank = {
            int(i): torch.randn(
                (noise_per_sample, *shape),
                generator=torch.Generator().manual_seed(seed * 1_000_003 + int(dataset.sample_ids[i])),
            )
            for i in sample.unique().tolist()
        }
        noise = torch.stack([bank[i][w] for i, w in zip(sample.tolist(), within.tolist())])
        clean = dataset.images[sample]
        x_t = base.scheduler.add_noise(clean, noise, t)
        target = training_target(base.scheduler, clean, noise, t)
        embeds = base.prompt_embeds(dataset.prompt_ids[sample].to(device))
        pred = base.eps(x_t.to(device), t.to(device), embeds)
        out[job] = per_sample_mse(pred, target.to(device)).float().cpu()
        if return_bank:
            stored = pred.float().cpu().to(bank_pred.dtype)
            if bank_folder is not None and not bool(torch.isfinite(stored).all()):
                bad = sample[~torch.isfinite(stored).flatten(1).all(1)].unique()[:5].tolist()
                raise LossError(f"frozen predictions for samples {bad} are not finite in {BANK_DTYPE} (at most 65504): "
                                "the base model or data is broken")
            bank_noise[sample, within] = noise.to(bank_noise.dtype)
            bank_pred[sample, within] = stored
        bar.update(job.numel() * world)
    bar.close()
    all_reduce_sum_(out)
    if return_bank and bank_folder is None:
        all_reduce_sum_(bank_noise)
        all_reduce_sum_(bank_pred)
    elif return_bank:
        barrier()  # every rank's cells are in the shared files before any rank reads them
    losses = out.view(n, num_timesteps, draws).mean(2)
    if not torch.isfinite(losses).all():
        bad = (~torch.isfinite(losses)).any(1).nonzero().flatten()[:5].tolist()
        raise LossError(f"non-finite losses for samples {bad}: the base model or data is broken")
    if return_bank:
        return losses, grid, FrozenBank(grid.repeat_interleave(draws), bank_noise, bank_pred,
                                        directory=bank_folder, owner=bank_owner)
    return losses, grid


@dataclass
class ScoreStatistics:
    """What an aggregation needs from a reference set of losses to score any losses on its grid:
    the per-(prompt, t) mean and std (rows: one per prompt, and a last row for the rare prompts
    pooled together), each prompt's row, and the spread weights. `aggregate_losses` scores the
    reference set itself with them; the calibration scores generated samples against the
    training data's (calibration.py), so both are on one scale."""

    method: str
    mean: torch.Tensor  # (P + 1, T) float64
    std: torch.Tensor  # (P + 1, T) float64, clamped above 0
    row_of: torch.Tensor  # (P,) each prompt's row
    weights: Optional[torch.Tensor]  # (T,) spread_weights, for "spread" only
    high_noise_fraction: float = 0.3

    def scores(self, losses: torch.Tensor, prompt_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(N, T) losses, (N,) prompt ids (None: prompt 0) -> (N,) fp32 scores."""
        losses = losses.double()
        if self.method == "mean":
            return losses.mean(1).float()
        rows = self.row_of[torch.zeros(losses.shape[0], dtype=torch.long) if prompt_ids is None else prompt_ids]
        z = (losses - self.mean[rows]) / self.std[rows]
        if self.method == "high-noise":
            z = z[:, -max(1, int(round(self.high_noise_fraction * losses.shape[1]))):]
        if self.method == "spread":
            return (z * self.weights).sum(1).float()
        return z.mean(1).float()


def score_statistics(losses: torch.Tensor, prompt_ids: Optional[torch.Tensor] = None, method: str = "spread",
                     min_per_prompt: int = 8, high_noise_fraction: float = 0.3) -> ScoreStatistics:
    """The reference statistics of (N, T) losses for `method` (see aggregate_losses): prompts with
    fewer than `min_per_prompt` samples are standardised together."""
    if method not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {method!r}; choose from {AGGREGATIONS}")
    if not torch.isfinite(losses).all():
        raise LossError("losses contain NaN or inf")
    losses = losses.double()
    ids = torch.zeros(losses.shape[0], dtype=torch.long) if prompt_ids is None else prompt_ids
    num_prompts = int(ids.max()) + 1
    counts = torch.bincount(ids, minlength=num_prompts)
    pooled_row = num_prompts
    row_of = torch.where(counts >= min_per_prompt, torch.arange(num_prompts), torch.full((num_prompts,), pooled_row))
    if prompt_ids is None:
        row_of = torch.zeros(1, dtype=torch.long)
    mean = torch.zeros(num_prompts + 1, losses.shape[1], dtype=torch.float64)
    std = torch.ones_like(mean)
    sample_rows = row_of[ids]
    for r in sample_rows.unique().tolist():
        block = losses[sample_rows == r]
        mean[r] = block.mean(0)
        if block.shape[0] > 1:
            std[r] = block.std(0, unbiased=False)
    std = std.clamp_min(1e-12)
    weights = None
    if method == "spread":
        groups = torch.where(sample_rows == pooled_row, -1, ids) if prompt_ids is not None else ids
        weights = spread_weights(losses, groups)
    return ScoreStatistics(method, mean, std, row_of, weights, high_noise_fraction)


def aggregate_losses(
    losses: torch.Tensor,
    prompt_ids: Optional[torch.Tensor] = None,
    method: str = "spread",
    min_per_prompt: int = 8,
    high_noise_fraction: float = 0.3,
) -> torch.Tensor:
    """(N, T) losses -> (N,) per-sample score for the max step.

    "mean": plain average over t. "zscore": z-score each timestep within each prompt (prompts with
    fewer than `min_per_prompt` samples are standardised together), then average.
    "spread" (default): the same z-scores, weighted by `spread_weights` (squared coefficient of
    variation per timestep) instead of equally.
    "high-noise": the zscore score restricted to the top `high_noise_fraction` of the t grid.
    """
    return score_statistics(losses, prompt_ids, method, min_per_prompt, high_noise_fraction).scores(losses, prompt_ids)


def spread_weights(losses: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """(T,) timestep weights proportional to the squared coefficient of variation of the losses
    across samples of the same prompt (std / mean), averaged over prompts, summing to 1.

    Label-free: it asks only where samples *disagree* most relative to the typical loss. On the
    v-prediction colored-digits base (p=0.9) the CV rises from 0.15 at t=50 to 1.39 at t=950,
    so the weights concentrate on the high-noise band where colour is decided.
    """
    cv = torch.zeros(losses.shape[1], dtype=losses.dtype)
    labels = groups.unique()
    for g in labels:
        block = losses[groups == g]
        if block.shape[0] > 1:
            cv += block.std(0, unbiased=False) / block.mean(0).abs().clamp_min(1e-12)
    cv = cv / len(labels)
    w = cv.pow(2)
    return w / w.sum().clamp_min(1e-12) if float(w.sum()) > 0 else torch.full_like(w, 1.0 / w.numel())


def draw_proposal(losses: torch.Tensor, prompt_ids: torch.Tensor, draws: int, mix: float = 0.5,
                  band: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(J,) min-step sampling distribution over the bank's draws: `mix` of it uniform, the rest by
    `spread_weights` of the grid timesteps. The attribute signal lives where samples' losses
    disagree (high t for colour); uniform draws spent 80% of min-step samples elsewhere.
    band: optional (J,) bool, the draws where G acts (see guidance_band); the proposal is
    restricted to them, since outside the band G's output is zero and the loss is a constant."""
    if not 0.0 < mix <= 1.0:
        raise ValueError("mix must be in (0, 1]")
    per_t = spread_weights(losses.double(), prompt_ids)
    q = (mix / losses.shape[1] + (1.0 - mix) * per_t).repeat_interleave(draws) / draws
    if band is not None:
        if not bool(band.any()):
            raise ValueError("the guidance band holds none of the bank's draws")
        q = q * band.double()
        q = q / q.sum()
    return q.float()


def project_simplex_rows(w: torch.Tensor) -> torch.Tensor:
    """The official projection: clamp at 0, renormalise each row (uniform if a row is all zero)."""
    w = w.clamp_min(0)
    s = w.sum(1, keepdim=True)
    return torch.where(s > 0, w / s.clamp_min(1e-12), torch.full_like(w, 1.0 / w.shape[1]))


def infer_environments(
    scores: torch.Tensor,
    num_groups: int,
    steps: int = 500,
    lr: float = 0.01,
    alpha: float = 0.0,
    seed: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Maximise std_k R_k (+ alpha * min_{i,k} l_i W_ik) over soft weights. scores: (N,) -> W: (N, K)."""
    n = scores.shape[0]
    if not 2 <= num_groups <= n:
        raise ValueError(f"number of groups K must be in [2, N={n}], got {num_groups}")
    if not torch.isfinite(scores).all():
        raise LossError("per-sample losses contain NaN or inf")
    gen = torch.Generator().manual_seed(seed)
    w = project_simplex_rows(torch.rand(n, num_groups, generator=gen, dtype=torch.float64)).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    l = scores.double()
    for _ in tqdm(range(steps), desc="max-step", disable=not progress):
        risks = (w * l[:, None]).sum(0) / w.sum(0).clamp_min(1e-12)
        objective = risks.std()
        if alpha:
            objective = objective + alpha * (l[:, None] * w).min()
        opt.zero_grad()
        (-objective).backward()
        opt.step()
        with torch.no_grad():
            w.copy_(project_simplex_rows(w))
    return w.detach().float()


def infer_environments_mixture(scores: torch.Tensor, num_groups: int, seed: int = 0) -> torch.Tensor:
    """The sharper max step: soft groups = posterior responsibilities of a K-component Gaussian
    mixture fitted to the per-sample scores (scikit-learn, 5 restarts). scores: (N,) -> W: (N, K).

    Why: the official objective (maximise std_k R_k by projected gradient ascent) behaves like 1-D
    k-means and cuts the score axis near the midpoint of the group means, not at the gap between
    the majority's and the minority's losses. On colored digits (p=0.9) with a score that ranks
    minority samples almost perfectly (AUROC 0.998), its K=2 high-loss group held 34% minority
    samples; the mixture's held 73% (measured; docs/research_notes.md, "What we found" 3).
    """
    from sklearn.mixture import GaussianMixture

    n = scores.shape[0]
    if not 2 <= num_groups <= n:
        raise ValueError(f"number of groups K must be in [2, N={n}], got {num_groups}")
    if not torch.isfinite(scores).all():
        raise LossError("per-sample losses contain NaN or inf")
    x = scores.double().view(-1, 1).numpy()
    gm = GaussianMixture(num_groups, random_state=seed, n_init=5, reg_covar=1e-6).fit(x)
    resp = torch.from_numpy(gm.predict_proba(x)).float()
    order = torch.from_numpy(gm.means_.ravel()).argsort()  # groups sorted by mean score
    return project_simplex_rows(resp[:, order])


def infer_environments_gap(scores: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Hard groups cut at the K-1 widest gaps between neighbouring sorted scores in the upper
    half of the score axis. scores: (N,) -> W: (N, K) one-hot, groups ordered by score.

    Why: a spurious correlation leaves a *small* minority whose loss is high, so the cut that
    matters sits between a large majority and a few outliers. A Gaussian mixture spends its
    high-score component on the majority's upper tail as well (on colored digits, p=0.9, its
    per-prompt high groups held 61-94% minority samples; balanced minority share 0.32-0.36 over
    3 loss seeds), and projected Adam cuts near the midpoint of the group means. The widest gap
    above the median falls between the two populations whenever the score ranks them apart
    (same losses: share 0.515-0.534, perfect groups give 0.5). The search starts at the median
    because a minority is by definition at most half of a prompt's samples, and stops one short
    of the top so no group is a single outlier.
    """
    n = scores.shape[0]
    if not 2 <= num_groups <= n:
        raise ValueError(f"number of groups K must be in [2, N={n}], got {num_groups}")
    if not torch.isfinite(scores).all():
        raise LossError("per-sample losses contain NaN or inf")
    values, order = scores.double().sort()
    # Candidate cuts lie between values[j] and values[j + 1]; the groups above hold at most half.
    low, high = (n + 1) // 2 - 1, n - 2
    if high - low + 1 < num_groups - 1:  # too few samples above the median: use every gap
        low, high = 0, n - 2
    gaps = values[low + 1 : high + 2] - values[low : high + 1]
    cuts = (gaps.topk(num_groups - 1).indices + low).sort().values
    rank_group = torch.zeros(n, dtype=torch.long)
    for c in cuts.tolist():
        rank_group[c + 1 :] += 1
    group = torch.empty(n, dtype=torch.long)
    group[order] = rank_group
    return torch.nn.functional.one_hot(group, num_groups).float()


def winsorize_far_out(values: torch.Tensor) -> torch.Tensor:
    """Clip values above Tukey's far-out fence, Q3 + 3 * IQR, to the fence. (n,) -> (n,).

    A few extreme scores (a blurry or broken image of the majority) would otherwise own a group
    of their own under any variance criterion; clipped, they join the rest of the high tail. The
    fence is a property of the scores' own spread, not a guess at the minority's size."""
    q1, q3 = torch.quantile(values, torch.tensor([0.25, 0.75], dtype=values.dtype))
    return values.clamp(max=float(q3 + 3.0 * (q3 - q1)))


def infer_environments_otsu(scores: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Hard groups at the K-1 cuts that minimise the within-group sum of squares of the
    winsorized scores (Otsu's between-class variance for K = 2; the exact 1-D K-means optimum
    by dynamic programming), with every group above the lowest holding at most half of the
    samples together. scores: (N,) -> W: (N, K) one-hot, groups ordered by score.

    Why (issue 21): the widest gap above the median weighs no group size, so when the minority's
    scores form a smooth tail rather than a separate mode, the widest gap lies between the top
    outlier and the rest, and the high group holds 1-3 samples. A variance criterion weighs each
    group by its size: cutting off a handful of samples buys little between-group variance, a
    whole tail buys much. Winsorizing at the far-out fence keeps a few far outliers from buying
    it alone. The bound of one half is the data's own: a minority is at most half of its prompt.
    """
    n = scores.shape[0]
    if not 2 <= num_groups <= n:
        raise ValueError(f"number of groups K must be in [2, N={n}], got {num_groups}")
    if not torch.isfinite(scores).all():
        raise LossError("per-sample losses contain NaN or inf")
    values, order = winsorize_far_out(scores.double()).sort()
    # cost(i, j): sum of squares of values[i:j] about their mean, from prefix sums.
    s1 = torch.cat([values.new_zeros(1), values.cumsum(0)])
    s2 = torch.cat([values.new_zeros(1), (values * values).cumsum(0)])

    def segment_cost(start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
        count = (end - start).double()
        total = s1[end] - s1[start]
        return (s2[end] - s2[start]) - total * total / count

    # The lowest group, values[:j], holds at least half: j >= ceil(n / 2).
    low_end = (n + 1) // 2
    if n - low_end < num_groups - 1:  # too few samples above the median for K - 1 groups
        low_end = 1
    # best[j]: the least cost of values[:j] cut into the groups so far (inf: not reachable);
    # back[k - 1][j]: where the k-th group above the lowest starts when values[:j] ends with it.
    best = torch.full((n + 1,), float("inf"), dtype=torch.float64)
    ends = torch.arange(low_end, n + 1)
    best[ends] = segment_cost(torch.zeros_like(ends), ends)
    back = []
    for k in range(1, num_groups):
        new = torch.full_like(best, float("inf"))
        arg = torch.zeros(n + 1, dtype=torch.long)
        # the last group ends at n; the ones below leave a sample for each group above them
        for j in ([n] if k == num_groups - 1 else range(low_end + k, n - (num_groups - 1 - k) + 1)):
            starts = torch.arange(low_end + k - 1, j)
            cand = best[starts] + segment_cost(starts, torch.full_like(starts, j))
            i = int(torch.argmin(cand))
            new[j], arg[j] = cand[i], starts[i]
        back.append(arg)
        best = new
    cuts, j = [], n
    for arg in reversed(back):
        j = int(arg[j])
        cuts.append(j)
    rank_group = torch.zeros(n, dtype=torch.long)
    for c in cuts:
        rank_group[c:] += 1
    group = torch.empty(n, dtype=torch.long)
    group[order] = rank_group
    return torch.nn.functional.one_hot(group, num_groups).float()


@dataclass(frozen=True)
class MaxStepPolicy:
    """Everything that turns the frozen model's (N, T) losses into environments W."""

    # The defaults are DebiasConfig's (max_step_policy maps its fields), given once in config.py.
    method: str = DebiasConfig.max_step  # otsu | gap | mixture | official (projected Adam on std_k R_k)
    groups: int = DebiasConfig.groups  # K
    aggregation: str = DebiasConfig.aggregation  # see aggregate_losses
    per_prompt: bool = DebiasConfig.per_prompt_groups  # K environments inside each prompt (see infer_groups)
    min_per_prompt: int = DebiasConfig.min_per_prompt_groups  # ... when every prompt has at least this many samples per group
    steps: int = DebiasConfig.max_step_steps  # official: Adam steps
    lr: float = DebiasConfig.max_step_lr  # official: Adam learning rate
    alpha: float = DebiasConfig.alpha  # official: weight of the min-loss term
    seed: int = DebiasConfig.seed

    def validate(self) -> None:
        if self.method not in MAX_STEP_METHODS:
            raise ValueError(f"max_step must be one of {MAX_STEP_METHODS}, got {self.method!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {self.aggregation!r}; choose from {AGGREGATIONS}")
        if self.groups < 2:
            raise ValueError(f"number of groups K must be >= 2, got {self.groups}")
        if self.steps < 1:
            raise ValueError(f"max-step steps must be >= 1, got {self.steps}")


def _groups_of(scores: torch.Tensor, policy: MaxStepPolicy) -> torch.Tensor:
    if policy.method == "gap":
        return infer_environments_gap(scores, policy.groups)
    if policy.method == "otsu":
        return infer_environments_otsu(scores, policy.groups)
    if policy.method == "mixture":
        return infer_environments_mixture(scores, policy.groups, policy.seed)
    return infer_environments(scores, policy.groups, policy.steps, policy.lr, policy.alpha, policy.seed)


def infer_groups(scores: torch.Tensor, policy: MaxStepPolicy, prompt_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(N,) per-sample scores -> (N, K) environments, or (N, P*K) with per-prompt groups.

    Per prompt (the default when every prompt has at least `min_per_prompt * K` samples): the
    max step runs separately within each prompt's samples and prompt p owns columns
    [p*K, (p+1)*K). A spurious correlation is a dependence between the prompt and an attribute,
    so its environments live inside each prompt; the prompt is the conditioning, not a bias
    label. Pooled groups mix all prompts' minorities into one group, and the min step then cannot
    balance any single prompt (measured: Bias 0.655 pooled vs the oracle's 0.275; the development
    runs' table in docs/research_notes.md).
    """
    policy.validate()
    if prompt_ids is None or not policy.per_prompt:
        return _groups_of(scores, policy)
    counts = torch.bincount(prompt_ids)
    present = torch.nonzero(counts).flatten()
    if int(counts[present].min()) < policy.min_per_prompt * policy.groups:
        return _groups_of(scores, policy)
    k = policy.groups
    weights = torch.zeros(scores.shape[0], len(present) * k)
    for j, p in enumerate(present.tolist()):
        rows = prompt_ids == p
        weights[rows, j * k : (j + 1) * k] = _groups_of(scores[rows], policy)
    return weights


def groups_from_losses(losses: torch.Tensor, prompt_ids: Optional[torch.Tensor], policy: MaxStepPolicy):
    """(N, T) frozen losses -> (W, scores (N,)): the policy's aggregation, then its grouping."""
    policy.validate()
    scores = aggregate_losses(losses, prompt_ids, policy.aggregation)
    return infer_groups(scores, policy, prompt_ids), scores


def guidance_band(losses: torch.Tensor, prompt_ids: Optional[torch.Tensor], num_train_timesteps: int) -> int:
    """The first timestep of the band where G_psi acts: [t_min, num_train_timesteps).

    losses: (N, T) on the grid of `timestep_grid(T, num_train_timesteps)`. The band is the run of grid
    bins, from the noisiest down, whose `spread_weights` are above uniform (1/T), i.e. where the
    samples of a prompt disagree more than on average: that is where an attribute is decided
    (on colored digits, p=0.9, t >= 800: 80% of the weight in 20% of t). Outside the band G's
    correction only has shapes left to change, which is where the quality went (docs/research_notes.md,
    "What we found" 7). Label-free.
    """
    groups = torch.zeros(losses.shape[0], dtype=torch.long) if prompt_ids is None else prompt_ids
    weights = spread_weights(losses.double(), groups)
    above = weights > 1.0 / weights.numel()
    first = weights.numel() - 1
    while first > 0 and bool(above[first - 1]):
        first -= 1
    bin_width = num_train_timesteps / weights.numel()
    return int(round(first * bin_width))


# A user has no labels to check the groups with; these are the warnings they get instead.
SMALL_GROUP_SHARE = 0.03  # a group below 3% of its prompt's samples: a few outliers, not a minority
# The high group's mean bootstrap Jaccard index below this: the cut is partly chance. Measured
# (scripts/dev/cut_study.py, tests/test_max_step_cuts.py): a separate minority mode 0.97-0.98,
# evenly spread scores under the gap cut 0.42-0.68, the design setting's gap groups 0.35 at worst.
UNSTABLE_BELOW = 0.7
STABILITY_BOOTSTRAPS = 20


def _hard_groups(weights: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) index of each sample's strongest group among its K (per-prompt column blocks too)."""
    return weights.view(weights.shape[0], -1, k).sum(1).argmax(1) if weights.shape[1] % k == 0 else weights.argmax(1)


def cut_stability(scores: torch.Tensor, prompt_ids: Optional[torch.Tensor], policy: MaxStepPolicy,
                  boots: int = STABILITY_BOOTSTRAPS) -> Dict[int, float]:
    """How stable each prompt's cut is under resampling, label-free: {prompt id: stability}.

    For each of `boots` bootstrap resamples of a prompt's scores (seeded by the policy's seed),
    the policy's grouping is run again; its groups become score thresholds (where each group
    above the lowest starts), and every original sample is assigned by them. The stability is
    the mean Jaccard index between that high group and the original high group: 1 when every
    resample draws the same cut, near 0 when the high group is a few samples that a resample
    may leave out. scores: (N,); prompt_ids: (N,) or None (one pool)."""
    k = policy.groups
    ids = torch.zeros(scores.shape[0], dtype=torch.long) if prompt_ids is None or not policy.per_prompt else prompt_ids
    gen = torch.Generator().manual_seed(policy.seed + 104729)
    result = {}
    for p in ids.unique().tolist():
        rows = scores[ids == p]
        if rows.numel() < 2 * k:
            continue
        high = _hard_groups(_groups_of(rows, policy), k) == k - 1
        overlap = []
        for _ in range(boots):
            draw = rows[torch.randint(rows.numel(), (rows.numel(),), generator=gen)]
            try:
                groups = _hard_groups(_groups_of(draw, policy), k)
            except ValueError:  # a resample with too few distinct values for K groups
                overlap.append(0.0)
                continue
            top = draw[groups == k - 1]
            again = rows >= float(top.min()) if top.numel() else torch.zeros_like(high)
            union = int((again | high).sum())
            overlap.append(int((again & high).sum()) / union if union else 1.0)
        result[int(p)] = sum(overlap) / len(overlap)
    return result


def environment_diagnostics(weights: torch.Tensor, scores: torch.Tensor, prompt_ids: Optional[torch.Tensor] = None,
                            policy: Optional[MaxStepPolicy] = None, prompts: Optional[list] = None) -> Dict:
    """Label-free summary of the max step's groups, for the run folder and for `debias` to print.

    Always: soft group sizes and soft group mean scores, ordered as in W. With prompt_ids and the
    policy: per prompt, the high-score group's share of the prompt's samples and the cut's
    bootstrap stability (cut_stability), and one warning line per prompt whose high group is
    below SMALL_GROUP_SHARE or whose cut is unstable (below UNSTABLE_BELOW). prompts: the
    prompt texts by id, to name them in the warnings."""
    sizes = weights.sum(0)
    means = (weights * scores[:, None]).sum(0) / sizes.clamp_min(1e-12)
    out = {"group_sizes": sizes.tolist(), "group_mean_scores": means.tolist()}
    if prompt_ids is None or policy is None:
        return out
    k = policy.groups
    high = _hard_groups(weights, k) == k - 1
    pooled = not policy.per_prompt or weights.shape[1] == k
    ids = torch.zeros_like(prompt_ids) if pooled else prompt_ids
    stability = cut_stability(scores, ids, policy)
    shares, warnings = {}, []
    for p in ids.unique().tolist():
        rows = ids == p
        share = float(high[rows].double().mean())
        name = "all prompts" if pooled else (prompts[p] if prompts and p < len(prompts) else f"prompt {p}")
        shares[str(p)] = share
        problems = []  # one line per prompt, however many problems it has
        if share < SMALL_GROUP_SHARE:
            problems.append(f"the high-loss group holds {int(high[rows].sum())} of {int(rows.sum())} samples "
                            f"({share:.1%}, below {SMALL_GROUP_SHARE:.0%}): likely a few outliers, not a minority")
        if p in stability and stability[p] < UNSTABLE_BELOW:
            problems.append(f"the cut is unstable under resampling (the high group's bootstrap Jaccard index is "
                            f"{stability[p]:.2f}, below {UNSTABLE_BELOW}): the groups are partly chance")
        if problems:
            warnings.append(f"{name}: " + "; ".join(problems))
    out.update(high_group_share=shares, cut_stability={str(p): s for p, s in stability.items()}, warnings=warnings)
    return out


def save_environments(path: str, weights: torch.Tensor, sample_ids: torch.Tensor, scores: torch.Tensor, info: Dict) -> None:
    atomic_save_file(
        {"weights": weights.float(), "sample_ids": sample_ids.long(), "scores": scores.float()},
        path,
        metadata={"invdiff": json.dumps(info)},
    )


def load_environments(path: str, sample_ids: Optional[torch.Tensor] = None) -> Dict:
    """Load W and, given a dataset's sample ids, reorder W's rows to match them."""
    data = load_safetensors(path, "environment weights")
    for key in ("weights", "sample_ids"):
        if key not in data:
            raise CheckpointError(f"{path} has no {key!r} tensor: not an invdiff environments file")
    if sample_ids is not None:
        pos = {int(s): i for i, s in enumerate(data["sample_ids"].tolist())}
        missing = [int(s) for s in sample_ids.tolist() if int(s) not in pos]
        if missing:
            raise CheckpointError(f"{path} has no weights for sample ids {missing[:5]} (of {len(missing)})")
        order = torch.tensor([pos[int(s)] for s in sample_ids.tolist()])
        data = {k: (v[order] if v.shape[:1] == data["sample_ids"].shape else v) for k, v in data.items()}
    return data


# ----------------------------------------------------------------------------- the entry point


def max_step_policy(config: DebiasConfig) -> MaxStepPolicy:
    """The MaxStepPolicy a DebiasConfig asks for."""
    return MaxStepPolicy(
        method=config.max_step, groups=config.groups, aggregation=config.aggregation, per_prompt=config.per_prompt_groups,
        min_per_prompt=config.min_per_prompt_groups, steps=config.max_step_steps, lr=config.max_step_lr,
        alpha=config.alpha, seed=config.seed,
    )


def band_start_of(config: DebiasConfig, losses: torch.Tensor, prompt_ids: torch.Tensor, num_train_timesteps: int) -> int:
    """The first timestep of the attribute band (0: none) that `config.t_band` asks for, given
    the frozen (N, T) losses: "off" -> 0, "auto" -> guidance_band, else the timestep given."""
    if config.t_band == "off":
        return 0
    if config.t_band == "auto":
        return guidance_band(losses, prompt_ids, num_train_timesteps)
    return int(config.t_band)


def weights_for_objective(weights: torch.Tensor, config: DebiasConfig) -> torch.Tensor:
    """The environments the min step's objective trains on. (N, K) or (N, P*K) -> as given, or
    for JTT (N, 1): one environment with each prompt's high-loss ("error") group upweighted, so
    that the invariant loss is the weighted mean sum_i w_i l_i / sum_i w_i."""
    if config.objective != "jtt":
        return weights
    k = config.groups
    high = weights[:, -1] if weights.shape[1] == k else weights.view(weights.shape[0], -1, k)[:, :, -1].sum(1)
    return (1.0 + (config.jtt_upweight - 1.0) * high)[:, None]


@dataclass
class MaxStepResult:
    """What the max step hands the min step. weights: (N, K) or (N, P*K) environments (for JTT,
    (N, 1)); scores: (N,) per-sample scores (zeros when the groups were given); band_start: the
    attribute band's first timestep; t_min: where G acts from (band_start when gated, else 0);
    proposal: (J,) the min step's distribution over the bank's draws, or None for uniform;
    diagnostics: environment_diagnostics, {} when the groups were given."""

    weights: torch.Tensor
    scores: torch.Tensor
    band_start: int
    t_min: int
    proposal: Optional[torch.Tensor]
    diagnostics: Dict


def max_step(losses: torch.Tensor, prompt_ids: torch.Tensor, config: DebiasConfig, num_train_timesteps: int,
             bank_timesteps: Optional[torch.Tensor] = None, weights: Optional[torch.Tensor] = None,
             prompts: Optional[list] = None) -> MaxStepResult:
    """The max step's whole policy, from the frozen model's (N, T) losses on the grid.

    bank_timesteps: (J,) the timestep of each of the bank's draws, for the proposal (None: no
    proposal). weights: given environments (the oracle, ERM's single all-ones column): the groups
    are not inferred, but the band and the proposal are the same as InvDiff's, so every row
    trains on identical (t, noise) draws. prompts: the prompt texts by id, for the warnings."""
    band_start = band_start_of(config, losses, prompt_ids, num_train_timesteps)
    t_min = band_start if config.gate_to_band else 0
    proposal = None
    if bank_timesteps is not None and (config.importance_mix < 1.0 or t_min > 0):
        proposal = draw_proposal(losses, prompt_ids, config.loss_draws, config.importance_mix, band=bank_timesteps >= t_min)
    if weights is not None:
        return MaxStepResult(weights, torch.zeros(losses.shape[0]), band_start, t_min, proposal, {})
    policy = max_step_policy(config)
    groups, scores = groups_from_losses(losses, prompt_ids, policy)
    # Group shares and cut stability per prompt, with warnings; JTT judges the same cut.
    diagnostics = environment_diagnostics(groups, scores, prompt_ids, policy, prompts)
    return MaxStepResult(weights_for_objective(groups, config), scores, band_start, t_min, proposal, diagnostics)


def weights_from_losses(losses: torch.Tensor, prompt_ids: torch.Tensor, config: DebiasConfig):
    """(N, T) frozen losses, (N,) prompt ids -> (W, scores): W the environments of `config`'s max
    step ((N, K) or (N, P*K); (N, 1) for JTT), scores (N,) the per-sample scores they were cut from."""
    weights, scores = groups_from_losses(losses, prompt_ids, max_step_policy(config))
    return weights_for_objective(weights, config), scores


def environment_weights(
    base: FrozenBase, dataset: DiffusionDataset, config: DebiasConfig, progress: bool = True, return_bank: bool = False
):
    """The max step. Returns (W (N, K), scores (N,), losses (N, T), timesteps (T,)) and, with
    return_bank, the `FrozenBank` of the frozen model's predictions it was computed from."""
    dataset = dataset.training_view()
    losses, grid, bank = collect_losses(
        base, dataset, config.loss_timesteps, config.loss_draws, config.seed, progress=progress, return_bank=True
    )
    weights, scores = weights_from_losses(losses, dataset.prompt_ids, config)
    if return_bank:
        return weights, scores, losses, grid, bank
    return weights, scores, losses, grid


def bank_parent(config: DebiasConfig, out: str) -> str:
    """Where a latent base's frozen-prediction bank goes on disk (in a temporary folder, removed
    after the run): beside the latent cache when there is one, else beside the output folder,
    both on disks the user chose. Not the system temp dir, which is often a RAM-backed tmpfs."""
    return config.latent_cache or os.path.dirname(os.path.abspath(out))


def frozen_losses(base: FrozenBase, dataset: DiffusionDataset, config: DebiasConfig, out: str, progress: bool = True) -> Dict:
    """The max step's pass over the frozen model, for the run writing to `out`: {"losses": (N, T),
    "timesteps": (T,), "bank": FrozenBank} on `config`'s grid, draws and seed (collect_losses).

    A latent base (Stable Diffusion: it has decode_latents) keeps its bank on disk (bank_parent),
    and its UNet sees the min step's batch size in this pass too: the default 512 (sample, t) jobs
    per forward would hold tens of GB of SD-1.5 activations at 512 px."""
    latent = hasattr(base, "decode_latents")
    return dict(zip(
        ("losses", "timesteps", "bank"),
        collect_losses(base, dataset, config.loss_timesteps, config.loss_draws, config.seed, progress=progress, return_bank=True,
                       bank_dir=bank_parent(config, out) if latent else None,
                       **({"batch_size": config.batch_size} if latent else {})),
    ))


# ----------------------------------------------------------------------------- the alternation

# A round that moves at most this share of the samples to another group has converged: with
# scores that are real numbers, a handful of samples at a cut can flip back and forth forever.
ALTERNATION_TOLERANCE = 0.01


@torch.no_grad()
def guided_losses(base: FrozenBase, guidance, dataset: DiffusionDataset, bank: FrozenBank, draws: int,
                  batch_size: int = 256) -> torch.Tensor:
    """The guided model's per-sample losses on the bank's fixed draws, for re-inferring the groups
    (the paper's alternation). Returns (N, T): per sample, the mean over each grid timestep's
    `draws` draws of mean((combine(eps_frozen, G) - target)^2), on the same (t, noise) as the
    frozen losses, so the two are comparable. Only G runs: the frozen predictions come from the bank."""
    from . import ops

    dataset = dataset.training_view()
    n, jobs = len(dataset), len(dataset) * bank.draws
    device = next(guidance.parameters()).device
    out = torch.empty(jobs)
    for start in range(0, jobs, batch_size):
        job = torch.arange(start, min(start + batch_size, jobs))
        sample, pick = job // bank.draws, job % bank.draws
        t = bank.timesteps[pick]
        noise, eps = bank.noise[sample, pick].float(), bank.pred[sample, pick].float()
        clean = dataset.images[sample]
        x_t = base.scheduler.add_noise(clean, noise, t)
        target = training_target(base.scheduler, clean, noise, t)
        embeds = base.prompt_embeds(dataset.prompt_ids[sample].to(device))
        g = guidance(x_t.to(device), t.to(device), embeds, eps.to(device))
        eps_tilde = ops.guidance_combine(eps.to(device), g, guidance.ratio)
        out[job] = per_sample_mse(eps_tilde, target.to(device)).float().cpu()
    return out.view(n, -1, draws).mean(2)


def hard_assignment(weights: torch.Tensor) -> torch.Tensor:
    """(N,) the strongest environment of each sample (a column of W)."""
    return weights.argmax(1)


def alternate(losses_of_guided, train_more, first: MaxStepResult, prompt_ids: torch.Tensor, config: DebiasConfig,
              num_train_timesteps: int, rounds: int, prompts: Optional[list] = None) -> Tuple[MaxStepResult, Dict]:
    """The paper's alternation, capped: re-infer the groups from the guided model's losses, train
    G further on them, and repeat, at most `rounds` times.

    losses_of_guided(): (N, T) losses of the guided model as it is now (guided_losses);
    train_more(weights): continue the min step on these environments. Stops early once a round
    moves at most ALTERNATION_TOLERANCE of the samples to another group. Returns (the groups G
    was last trained on, with their band, proposal and diagnostics; a record {"rounds": [...],
    "converged": bool}). One that does not converge says so in a warning line among the
    diagnostics, and keeps the last groups G was trained on."""
    current, record = first, {"rounds": [], "converged": rounds == 0}
    for r in range(1, rounds + 1):
        losses = losses_of_guided()
        found = max_step(losses, prompt_ids, config, num_train_timesteps, weights=None, prompts=prompts)
        moved = float((hard_assignment(found.weights) != hard_assignment(current.weights)).double().mean())
        record["rounds"].append({"round": r, "moved": moved, "mean_loss": float(losses.mean())})
        if moved <= ALTERNATION_TOLERANCE:
            record["converged"] = True
            break
        current = MaxStepResult(found.weights, found.scores, current.band_start, current.t_min, current.proposal,
                                found.diagnostics)
        train_more(current.weights)
    if not record["converged"]:
        last = record["rounds"][-1]["moved"]
        current.diagnostics.setdefault("warnings", []).append(
            f"the alternation did not converge in {rounds} round{'s' if rounds != 1 else ''} (the last moved "
            f"{last:.1%} of the samples to another group); G was trained on the last groups")
    current.diagnostics["alternation"] = record
    return current, record
