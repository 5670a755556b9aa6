"""Development study (issue 21): how each label-free cut turns max-step scores into groups.

    python scripts/dev/cut_study.py --json docs/dev_runs/cut_study.json

Two kinds of score sets, each cut per prompt by every method of environments.CUT_METHODS:
- the design setting's real scores (colored digits, 2 colours, p = 0.9, the shipped base), from
  the frozen losses at three loss seeds: the only real data defaults may be chosen on;
- planted scores that mimic what issue 21 saw on data nobody tuned on: a majority, a 10% minority
  whose scores form a smooth tail (not a separate mode), and a few far outliers, with a normal
  and a heavy-tailed (Student t, 3 dof) majority. Planted data carries no dataset: choosing on it
  chooses nothing about the held-out settings.
Labels are read for evaluation only: minority recall and precision of the high-score group, the
balanced minority share (the mean minority fraction of the groups), the smallest group's share,
and the bootstrap stability of the cut (label-free, what `debias` reports).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from invdiff.config import MAX_STEP_METHODS as CUT_METHODS  # noqa: E402
from invdiff.environments import MaxStepPolicy, aggregate_losses, collect_losses, cut_stability, infer_groups  # noqa: E402


def evaluate_cut(scores, prompt_ids, minority, method: str) -> dict:
    policy = MaxStepPolicy(method=method, groups=2)
    weights = infer_groups(scores, policy, prompt_ids)
    k = policy.groups
    high = weights.view(weights.shape[0], -1, k)[:, :, -1].sum(1) > 0.5
    recall = float((high & minority).sum() / minority.sum().clamp_min(1))
    precision = float((high & minority).sum() / high.sum().clamp_min(1))
    fractions, shares = [], []
    for p in prompt_ids.unique():
        rows = prompt_ids == p
        for member in (high[rows], ~high[rows]):
            if member.any():
                fractions.append(float(minority[rows][member].double().mean()))
        shares.append(float(high[rows].double().mean()))
    stability = cut_stability(scores, prompt_ids, policy, boots=20)
    return {"method": method, "minority_recall": recall, "minority_precision": precision,
            "balanced_minority_share": sum(fractions) / len(fractions), "smallest_high_share": min(shares),
            "largest_high_share": max(shares), "stability_min": min(stability.values())}


def planted(kind: str, seed: int, prompts: int = 3, per_prompt: int = 180, minority_share: float = 0.1, outliers: int = 2):
    gen = torch.Generator().manual_seed(seed)
    scores, ids, minority = [], [], []
    for p in range(prompts):
        n_min = int(round(minority_share * per_prompt))
        n_maj = per_prompt - n_min - outliers
        if kind == "heavy":
            chi = torch.distributions.Chi2(torch.tensor(3.0)).sample((n_maj,))
            maj = torch.randn(n_maj, generator=gen) / (chi / 3).sqrt()
        else:
            maj = torch.randn(n_maj, generator=gen)
        # a smooth tail: shifted by 1.5-4 sd, spread out, no separate mode
        tail = 1.5 + 2.5 * torch.rand(n_min, generator=gen) + 0.5 * torch.randn(n_min, generator=gen)
        far = 12.0 + 4.0 * torch.rand(outliers, generator=gen)  # far outliers of the majority (blurry shots)
        scores += [maj, tail, far]
        ids.append(torch.full((per_prompt,), p))
        minority += [torch.zeros(n_maj, dtype=torch.bool), torch.ones(n_min, dtype=torch.bool),
                     torch.zeros(outliers, dtype=torch.bool)]
    return torch.cat(scores), torch.cat(ids), torch.cat(minority)


def design_scores(seed: int):
    from invdiff.data import colored_digits
    from invdiff.demo import shipped_base
    from invdiff.models.base import FrozenBase

    train = colored_digits("train", p=0.9, num_colors=2, resolution=16)
    base = FrozenBase.from_pretrained(shipped_base(0.9)).freeze()
    losses, _ = collect_losses(base, train, 20, 1, seed, progress=False)
    scores = aggregate_losses(losses, train.prompt_ids, "spread")
    minority = train.attributes["color"] != train.attributes["digit"] % 2
    return scores, train.prompt_ids, minority


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--skip-design", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    sources = [(f"planted-{kind}", seed, lambda kind=kind, seed=seed: planted(kind, seed))
               for kind in ("normal", "heavy") for seed in args.seeds]
    if not args.skip_design:
        sources += [("design colors2_p0.9", seed, lambda seed=seed: design_scores(seed)) for seed in args.seeds]
    for name, seed, make in sources:
        t0 = time.time()
        scores, ids, minority = make()
        for method in CUT_METHODS:
            row = {"scores": name, "seed": seed, **evaluate_cut(scores, ids, minority, method)}
            rows.append(row)
            print(f"{name:22s} seed {seed} {method:8s} recall {row['minority_recall']:.2f} precision "
                  f"{row['minority_precision']:.2f} balanced share {row['balanced_minority_share']:.3f} high share "
                  f"{row['smallest_high_share']:.3f}-{row['largest_high_share']:.3f} stability {row['stability_min']:.2f}",
                  flush=True)
        print(f"  ({time.time() - t0:.0f} s)")
    if args.json:
        from invdiff.io import atomic_write_json

        atomic_write_json(args.json, {"rows": rows, "command": "python scripts/dev/cut_study.py " + " ".join(argv or sys.argv[1:])})


if __name__ == "__main__":
    main()
