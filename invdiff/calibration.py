"""A push of a predictable size: the label-free calibration of G_psi's strength per prompt (issue 21).

The min step alone pushes by an amount set by how extreme the inferred groups are, not by the
bias in the data (docs/dev_runs section 7: one config took a fixed 0.21-0.25 off the majority
share from p = 0.7 to 0.95). So after the min step the run measures its own push and sets it:

1. **A label-free readout of the attribute.** The frozen model's loss score ranks the minority
   of the training data (AUROC 0.99 on colored digits), and it ranks *generated* samples as well
   (AUROC 0.98-0.99 at every strength; scripts/dev/calibration_probe.py). A generated sample
   "reads high" when its score, standardised with the training data's per-(prompt, t) statistics,
   is at or above its prompt's Otsu cut of the training scores (environments.infer_environments_otsu).
   Measured against the colour probe the readout share tracks the true minority share:
   0.110 / 0.343 / 0.590 / 0.760 against 0.100 / 0.350 / 0.605 / 0.770 at s = 0 / 1 / 1.5 / 2.
   (The gap cut's threshold read 0.02-0.20: it holds only the most extreme samples.)
2. **The strength that reaches balance.** Per prompt, G samples CALIBRATION_SAMPLES images at
   each of CALIBRATION_STRENGTHS (the same seeds at every strength, so the curve is smooth), the
   readout share is made monotone in s (pool-adjacent-violators), anchored at s = 0 by the
   training data's own share, and interpolated to the strength where it reaches the target
   1 - 1/K: with K = 2 groups, half the samples read like the high-loss group.
3. That strength becomes the prompt's gain on G's correction (models/prompt_gains.py), stored
   in G's config, so strength s = 1 at sampling is the calibrated push everywhere.

No label is read: the readout is the max step's own score, the target is the groups' balance.
The target assumes the K inferred groups stand for the attribute's values: with an attribute
of A > K values (3 colours, K = 2) balance of the groups is not balance of the values.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from .data.base import DiffusionDataset
from .environments import ScoreStatistics, collect_losses, infer_environments_otsu, score_statistics

CALIBRATION_STRENGTHS = (0.5, 1.0, 1.5, 2.0, 2.5)
CALIBRATION_SAMPLES = 32  # per prompt and strength
MAX_CALIBRATED_PROMPTS = 64  # more prompts: one pooled gain from a seeded subset of this many
CALIBRATION_STEPS = 25  # `invdiff sample`'s default
# Seeds far from any a user or the demo draws (they count up from 0 or seed * 1e6), so the
# calibration never sees the images it is judged on.
CALIBRATION_SEED_OFFSET = 1 << 40
CALIBRATION_SAMPLE_IDS = 1 << 41  # sample ids of generated images: their loss noise is their own
# How far the high group stands from the rest: the median of the Otsu high group above the low
# group's median, in the low group's robust standard deviations (1.4826 x MAD). A normal or
# Student-t(5) majority alone, cut the same way, gives 2.2-2.3 (99th percentile 3.1-3.2 at 140
# samples per prompt; tests/test_calibration.py). The readout is trusted only when the prompts'
# median is above SEPARATION_TRUST. Measured on colored digits (scripts/dev/calibration_probe.py,
# docs/dev_runs section 8): p = 0.95 / 0.9 read 4.3 / 5.3, and there the readout tracked the true
# minority share within 0.02; p = 0.8 / 0.7 read 3.2 / 2.8, where the score ranks the minority with
# AUROC 0.91 / 0.73 and the readout lagged the truth (0.50 against 0.80 at p = 0.7, s = 2), so
# calibrating on it flipped prompts past balance.
SEPARATION_TRUST = 3.5
# A prompt whose readout rises by less than this over the whole grid is not pushed by G at all
# (ERM, or a prompt without a minority): its gain stays 1 rather than the grid's largest strength.
NO_PUSH = 0.05


@dataclass
class ReadoutReference:
    """The training data's statistics the readout scores new samples against.
    statistics: the max step's aggregation of the training losses (environments.ScoreStatistics);
    thresholds: (P,) each prompt's Otsu cut of the training scores; base_share: (P,) the share of
    training samples at or above it; separation: (P,) how far each prompt's high group stands out
    (see SEPARATION_TRUST; nan: no samples)."""

    statistics: ScoreStatistics
    thresholds: torch.Tensor
    base_share: torch.Tensor
    separation: torch.Tensor

    def scores(self, losses: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
        """(M, T) losses of new samples on the same grid, (M,) prompt ids -> (M,) scores on the
        training scores' scale."""
        return self.statistics.scores(losses, prompt_ids)

    def reads_high(self, losses: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
        """(M,) bool: the samples whose score is at or above their prompt's cut."""
        return self.scores(losses, prompt_ids) >= self.thresholds[prompt_ids]


def readout_reference(losses: torch.Tensor, prompt_ids: torch.Tensor, aggregation: str, groups: int,
                      min_per_prompt: int = 8) -> ReadoutReference:
    """The readout's reference from the frozen (N, T) training losses and (N,) prompt ids: the
    max step's own score statistics, and each prompt's Otsu cut of the scores they give."""
    statistics = score_statistics(losses, prompt_ids, aggregation, min_per_prompt)
    scores = statistics.scores(losses, prompt_ids)
    num_prompts = int(prompt_ids.max()) + 1
    counts = torch.bincount(prompt_ids, minlength=num_prompts)
    thresholds = torch.full((num_prompts,), float("inf"))
    base_share = torch.zeros(num_prompts)
    separation = torch.full((num_prompts,), float("nan"))
    pooled = scores[counts[prompt_ids] < groups * min_per_prompt]
    for p in range(num_prompts):
        own = scores[prompt_ids == p]
        values = own if own.numel() >= groups * min_per_prompt else pooled
        if values.numel() < groups:
            continue  # a prompt with no training samples: never reads high
        lowest = infer_environments_otsu(values, groups)[:, 0] > 0.5
        thresholds[p] = float(values[~lowest].min())
        low = values[lowest].double()
        spread = 1.4826 * float((low - low.median()).abs().median())
        gap = float(values[~lowest].double().median() - low.median())
        separation[p] = gap / spread if spread > 0 else (float("inf") if gap > 0 else 0.0)
        base_share[p] = float((own >= thresholds[p]).float().mean()) if own.numel() else 0.0
    return ReadoutReference(statistics, thresholds, base_share, separation)


def _monotone(values: List[float]) -> List[float]:
    """Pool-adjacent-violators: the nearest non-decreasing sequence (equal weights)."""
    blocks: List[List[float]] = []  # [sum, count]
    for v in values:
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += c
    out: List[float] = []
    for s, c in blocks:
        out += [s / c] * int(c)
    return out


def balance_strength(strengths: Sequence[float], shares: Sequence[float], base_share: float, target: float):
    """The strength at which a prompt's readout share reaches `target`, from its shares at
    `strengths` (ascending) and the training data's share at s = 0. Returns (strength, status):
    "reached" (interpolated), "short" (the largest strength reads below target: that strength),
    "no push" (the share hardly moves: 1.0), or "already" (the data reads at or above target: 0)."""
    xs = [0.0] + list(strengths)
    ys = _monotone([base_share] + list(shares))
    if ys[0] >= target:
        return 0.0, "already"
    if max(shares) - base_share < NO_PUSH:
        return 1.0, "no push"
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if y1 >= target:
            return x0 + (x1 - x0) * (target - y0) / (y1 - y0) if y1 > y0 else x1, "reached"
    return xs[-1], "short"


def _draw(base, guidance, strength: float, prompt_ids: torch.Tensor, seeds: List[int], band_start: int,
          gain_from: int = 0) -> torch.Tensor:
    """One sample per (prompt id, seed) with G's correction scaled by `strength` at t >= gain_from
    (0: at every t), as the model's own output: latents for a latent base (the readout scores
    latents, as the max step did), [-1, 1] pixels otherwise."""
    from .sampling import GuidedDenoiser
    from .sampling.engine import Request
    from .sampling.sampler import sampling_engine

    if gain_from > 0:  # the calibrated gains will act in the band only: so does the trial strength
        guidance.set_prompt_gains({"keys": [], "gains": [], "default": strength, "band_start": gain_from})
        strength = 1.0
    engine = sampling_engine(GuidedDenoiser(base, guidance, strength), "ddim", 256, band_start=band_start)
    if hasattr(base, "decode_latents"):
        engine.postprocess = lambda x: x.cpu()
    requests = [Request(int(p), int(s), CALIBRATION_STEPS, 1.0, request_id=i) for i, (p, s) in enumerate(zip(prompt_ids.tolist(), seeds))]
    out = engine.run(requests, progress=False)
    return torch.stack([out[i] for i in range(len(requests))]).float()


@torch.no_grad()
def calibrate(base, guidance, dataset: DiffusionDataset, losses: torch.Tensor, config, band_start: int,
              progress: bool = True, strengths: Optional[Sequence[float]] = None, per_prompt: Optional[int] = None) -> Dict:
    """Measure G's push label-free and set each prompt's gain so that it reaches balance.

    dataset: the training view G was trained on (latents for a latent base); losses: its frozen
    (N, T) losses on the max step's grid; config: the run's DebiasConfig (groups, aggregation,
    loss grid, seed). Sets G's prompt gains (models/prompt_gains.py) and returns the record for
    the run folder: target, strengths, per prompt its readout shares, gain and status, and one
    warning line per prompt that cannot reach the target."""
    from .models.prompt_gains import prompt_keys

    # Read at call time, not bound as defaults: the test suite shrinks them for its tiny models.
    strengths = tuple(strengths or CALIBRATION_STRENGTHS)
    per_prompt = per_prompt or CALIBRATION_SAMPLES
    k = config.groups
    target = 1.0 - 1.0 / k
    # Where the gains act: in the attribute band only, or at every t (see DebiasConfig.calibrate_in_band).
    gain_from = band_start if config.calibrate_in_band else 0
    ref = readout_reference(losses, dataset.prompt_ids, config.aggregation, k, config.min_per_prompt_groups)
    present = dataset.prompt_ids.unique()
    separation = float(ref.separation[present].nanmedian())
    if not separation >= SEPARATION_TRUST:
        # No clear high-loss group: the readout would not see the attribute (see SEPARATION_TRUST).
        guidance.set_prompt_gains(None)
        return {"target": target, "mode": "untrusted", "separation": separation, "prompts": {}, "default_gain": 1.0,
                "warnings": [f"the push was not calibrated: the loss scores show no separate high-loss group (it stands "
                             f"{separation:.1f} robust standard deviations above the rest, below {SEPARATION_TRUST}; a "
                             "single normal population gives about 2.3), so a readout of the output cannot be trusted; "
                             "G pushes as trained"]}
    counts = torch.bincount(dataset.prompt_ids)
    per_prompt_mode = len(present) <= MAX_CALIBRATED_PROMPTS and bool((counts[present] >= k * config.min_per_prompt_groups).all())
    chosen = present
    if len(present) > MAX_CALIBRATED_PROMPTS:
        pick = torch.randperm(len(present), generator=torch.Generator().manual_seed(config.seed))[:MAX_CALIBRATED_PROMPTS]
        chosen = present[pick.sort().values]
    ids = chosen.repeat_interleave(per_prompt)
    seeds = [CALIBRATION_SEED_OFFSET + config.seed * 1_000_003 + i for i in range(ids.numel())]
    shares = {int(p): [] for p in chosen.tolist()}
    pooled_shares = []
    bar = tqdm(total=len(strengths), desc="calibration", disable=not progress, unit="strength")
    for s in strengths:
        drawn = _draw(base, guidance, s, ids, seeds, band_start, gain_from)
        generated = DiffusionDataset(drawn, ids.clone(), list(dataset.prompts), torch.arange(ids.numel()) + CALIBRATION_SAMPLE_IDS,
                                     "calibration samples")
        new_losses, _ = collect_losses(base, generated, config.loss_timesteps, config.loss_draws, config.seed, progress=False)
        high = ref.reads_high(new_losses, ids).double()
        for p in shares:
            shares[p].append(float(high[ids == p].mean()))
        pooled_shares.append(float(high.mean()))
        bar.update(1)
    bar.close()
    names = list(dataset.prompts)
    record: Dict = {"target": target, "separation": separation, "strengths": list(strengths), "samples_per_prompt": per_prompt,
                    "mode": "per-prompt" if per_prompt_mode else "pooled", "prompts": {}, "warnings": []}
    gains: Dict[int, float] = {}
    if per_prompt_mode:
        for p, row in shares.items():
            gain, status = balance_strength(strengths, row, float(ref.base_share[p]), target)
            gains[p] = gain
            record["prompts"][names[p]] = {"gain": gain, "status": status, "base_share": float(ref.base_share[p]),
                                           "readout_shares": row}
    else:
        base_share = float(ref.base_share[chosen].mean())
        gain, status = balance_strength(strengths, pooled_shares, base_share, target)
        gains = {int(p): gain for p in present.tolist()}
        record["pooled"] = {"gain": gain, "status": status, "base_share": base_share, "readout_shares": pooled_shares,
                            "prompts_sampled": len(chosen)}
    for name, entry in (record["prompts"].items() if per_prompt_mode else [("all prompts", record["pooled"])]):
        if entry["status"] == "short":
            record["warnings"].append(f"{name}: the push reads {max(entry['readout_shares']):.2f} at strength "
                                      f"{strengths[-1]:g}, short of the target {target:.2f}; its gain is {strengths[-1]:g}")
        elif entry["status"] == "no push":
            record["warnings"].append(f"{name}: G does not move the readout (from {entry['base_share']:.2f} to at most "
                                      f"{max(entry['readout_shares']):.2f}); its gain stays 1")
    default = statistics.median(gains.values()) if gains else 1.0
    record["default_gain"] = default
    order = sorted(gains) if per_prompt_mode else []  # pooled: one gain, the default, for every prompt
    keys = prompt_keys(base.prompt_embeds(torch.tensor(order, dtype=torch.long, device=next(base.unet.parameters()).device))).cpu() if order else []
    guidance.set_prompt_gains({"keys": [list(map(float, k)) for k in keys], "gains": [gains[p] for p in order],
                               "default": default, "band_start": gain_from})
    record["gains_from_t"] = gain_from
    return record
