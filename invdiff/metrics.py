"""Evaluation: the paper's Bias, the attribute predictor, and quality (digit accuracy, Frechet distance).

The quality side uses a *colour-invariant* digit classifier: it sees only the stroke intensity
(max over RGB), so it cannot reward or punish a colour change, only the loss of a recognisable
digit. Its small weights ship in `invdiff/assets/digit_classifier/` and
`scripts/make_assets.py` retrains them.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .data.colored_digits import PALETTE
from .quality import FID_MIN_IMAGES, too_few_images

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
CLASSIFIER_DIR = os.path.join(ASSETS, "digit_classifier")


def bias_per_prompt(counts: torch.Tensor) -> torch.Tensor:
    """The paper's Bias. counts: (P, K) attribute counts per prompt -> (P,) Bias_p in [0, 1].

    Bias_p = (sum_{i<j} |n_i - n_j| / sum_k n_k) / (K (K-1) / 2).
    """
    if counts.ndim != 2:
        raise ValueError(f"counts must be (P, K), got shape {tuple(counts.shape)}")
    counts = counts.to(torch.float64)
    k = counts.shape[1]
    if k < 2:
        raise ValueError("Bias needs at least two attribute values")
    diffs = (counts.unsqueeze(2) - counts.unsqueeze(1)).abs().sum((1, 2)) / 2  # each pair once
    total = counts.sum(1)
    if (total == 0).any():
        raise ValueError("every prompt needs at least one sample")
    return diffs / total / (k * (k - 1) / 2)


def bias_summary(counts: torch.Tensor) -> Dict[str, float]:
    per = bias_per_prompt(counts)
    return {"bias": float(per.mean()), "bias_std": float(per.std(unbiased=False)) if per.numel() > 1 else 0.0}


def attribute_counts(prompt_ids: torch.Tensor, attributes: torch.Tensor, num_prompts: int, num_values: int) -> torch.Tensor:
    """(N,) prompt ids and (N,) attribute values -> (P, K) counts."""
    # Out-of-range values must not wrap into a neighbouring prompt's row of the flat bincount.
    if prompt_ids.numel() and not 0 <= int(prompt_ids.min()) <= int(prompt_ids.max()) < num_prompts:
        raise ValueError(f"prompt ids must lie in [0, {num_prompts}), got [{int(prompt_ids.min())}, {int(prompt_ids.max())}]")
    if attributes.numel() and not 0 <= int(attributes.min()) <= int(attributes.max()) < num_values:
        raise ValueError(f"attribute values must lie in [0, {num_values}), got [{int(attributes.min())}, {int(attributes.max())}]")
    flat = prompt_ids.long() * num_values + attributes.long()
    return torch.bincount(flat, minlength=num_prompts * num_values).view(num_prompts, num_values)


def predict_color(images: torch.Tensor, num_colors: int) -> torch.Tensor:
    """The stroke colour measured from pixels. images: (N, 3, H, W) in [-1, 1] -> (N,) colour index.

    Ink is weighted by its brightness, so the background and faint pixels barely count; the mean
    ink colour is matched to the palette by cosine similarity.
    """
    rgb = (images.float().clamp(-1, 1) + 1) / 2
    ink = rgb.amax(1, keepdim=True)
    mean = (rgb * ink).flatten(2).sum(2) / ink.flatten(2).sum(2).clamp_min(1e-6)
    pal = PALETTE[:num_colors]
    sim = nn.functional.normalize(mean, dim=1) @ nn.functional.normalize(pal, dim=1).T
    return sim.argmax(1)


def intensity(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, 1, H, W) colour-free stroke intensity in [0, 1]."""
    return ((images.float().clamp(-1, 1) + 1) / 2).amax(1, keepdim=True)


class DigitClassifier(ModelMixin, ConfigMixin):
    """A small CNN on stroke intensity. forward: (N, 3, H, W) in [-1, 1] -> (N, 10) logits."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, resolution: int = 16, num_classes: int = 10, feature_dim: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64 * (resolution // 4) ** 2, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)
        self.num_features = feature_dim

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, feature_dim) penultimate features (the Frechet space).
        Images at another resolution are resampled to the classifier's (bilinear)."""
        x = intensity(images)
        res = self.config.resolution
        if x.shape[-1] != res or x.shape[-2] != res:
            x = nn.functional.interpolate(x, size=(res, res), mode="bilinear", align_corners=False)
        return self.body(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class _FeaturesIn01(nn.Module):
    """Adapter for torchmetrics' FID: it feeds images in [0, 1]; our classifier takes [-1, 1]."""

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images01 * 2 - 1).double()


def train_digit_classifier(train, eval_split, steps: int = 1500, seed: int = 0, progress: bool = True) -> Dict:
    """Train the colour-invariant classifier on real digits (random shifts and colours as augmentation)."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DigitClassifier(resolution=train.resolution)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    labels = train.attributes["digit"]
    for _ in tqdm(range(steps), desc="digit-classifier", disable=not progress):
        idx = torch.randint(0, len(train), (128,), generator=gen)
        x = train.images[idx]
        shift = torch.randint(-1, 2, (2,), generator=gen).tolist()
        x = torch.roll(x, shifts=shift, dims=(2, 3))
        # random brightness so the classifier does not key on stroke intensity levels either
        x = ((x + 1) * (0.6 + 0.4 * torch.rand(x.shape[0], 1, 1, 1, generator=gen))) - 1
        loss = nn.functional.cross_entropy(model(x), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(eval_split.images).argmax(1) == eval_split.attributes["digit"]).float().mean()
    return {"model": model, "eval_accuracy": float(acc)}


def load_digit_classifier(path: Optional[str] = None) -> DigitClassifier:
    from .io import CheckpointError, require_safetensors

    path = path or CLASSIFIER_DIR
    require_safetensors(path, "the digit classifier's")
    try:
        model = DigitClassifier.from_pretrained(path, use_safetensors=True)
    except Exception as exc:
        raise CheckpointError(f"could not load the digit classifier from {path!r}: {exc}") from exc
    return model.eval().requires_grad_(False)


@torch.no_grad()
def frechet_distance(classifier: DigitClassifier, real: torch.Tensor, fake: torch.Tensor) -> float:
    """Frechet distance between (N, 3, H, W) image sets in the classifier's feature space."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=_FeaturesIn01(classifier), normalize=True, reset_real_features=True)
    fid.update((real.clamp(-1, 1) + 1) / 2, real=True)
    fid.update((fake.clamp(-1, 1) + 1) / 2, real=False)
    return float(fid.compute())


@torch.no_grad()
def evaluate_samples(
    images: torch.Tensor,
    prompt_ids: torch.Tensor,
    num_prompts: int,
    num_colors: int,
    classifier: DigitClassifier,
    reference: Optional[torch.Tensor] = None,
    majority: Optional[torch.Tensor] = None,
    attributes: Optional[torch.Tensor] = None,
) -> Dict:
    """Bias, digit accuracy and Frechet distance of colored-digit samples.

    images: (N, 3, H, W); prompt_ids: (N,) (= the prompted digit); reference: (M, 3, H, W) real
    eval images for the Frechet distance; majority: optional (P,) majority colour per prompt, to
    report each prompt's majority-colour share. attributes: optional (N,) attribute index per
    image, measured by the caller (a non-colour attribute); num_colors is then its number of values.
    "skipped" lists, one line each, what could not run: the Frechet distance needs 2 images per set.
    """
    colors = predict_color(images, num_colors) if attributes is None else attributes
    counts = attribute_counts(prompt_ids, colors, num_prompts, num_colors)
    out = bias_summary(counts[counts.sum(1) > 0])  # over the prompts that were sampled
    out["counts"] = counts.tolist()
    pred = classifier(images).argmax(1)
    out["digit_accuracy"] = float((pred == prompt_ids).float().mean())
    out["skipped"] = []
    if reference is not None:
        too_few = too_few_images("Frechet distance", FID_MIN_IMAGES, reference.shape[0], images.shape[0], "a covariance")
        if too_few is None:
            out["frechet_distance"] = frechet_distance(classifier, reference, images)
        else:
            out["skipped"].append(too_few)
    if majority is not None:
        share = counts[torch.arange(num_prompts), majority].double() / counts.sum(1).clamp_min(1)
        out["majority_share"] = share.tolist()
    return out


def group_alignment(weights: torch.Tensor, scores: torch.Tensor, minority: torch.Tensor, true_groups: torch.Tensor,
                    groups: int = 2) -> Dict:
    """Evaluation-only diagnostic: how inferred environments line up with the true groups.

    weights: (N, K) inferred soft environments; scores: (N,) the max step's per-sample scores;
    minority: (N,) bool, the sample carries a minority attribute for its prompt;
    true_groups: (N,) int (prompt, attribute) group id; groups: K, the groups per prompt (columns
    come in blocks of K, the highest-score group last). Reports, per inferred group, its soft size
    and soft minority fraction, the AUROC of the scores for spotting minority samples, and the
    minority recall: the share of minority samples whose strongest group is their block's highest.
    """
    from sklearn.metrics import roc_auc_score

    w = weights.double()
    sizes = w.sum(0)
    minority_frac = (w * minority.double()[:, None]).sum(0) / sizes.clamp_min(1e-12)
    hard = w.argmax(1)
    table = torch.zeros(w.shape[1], int(true_groups.max()) + 1, dtype=torch.long)
    table.index_put_((hard, true_groups.long()), torch.ones_like(hard), accumulate=True)
    auroc = float(roc_auc_score(minority.numpy(), scores.numpy())) if 0 < int(minority.sum()) < minority.numel() else float("nan")
    used = sizes > 1e-6
    high = (hard % groups == groups - 1) if w.shape[1] % groups == 0 else hard == w.shape[1] - 1
    recall = float(high[minority.bool()].double().mean()) if bool(minority.any()) else float("nan")
    return {
        "minority_recall": recall,
        "group_sizes": sizes.tolist(),
        "group_minority_fraction": minority_frac.tolist(),
        # The minority share that equal weight per group (the mean_k R_k term alone) would give.
        "balanced_minority_share": float(minority_frac[used].mean()),
        "base_minority_fraction": float(minority.double().mean()),
        "score_auroc_minority": auroc,
        "hard_assignment_vs_true_groups": table.tolist(),
    }
