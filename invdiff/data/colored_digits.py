"""The embedded benchmark: scikit-learn's handwritten digits (UCI, 1797 images) in colour.

The spurious attribute is the stroke colour. Digit d's majority colour is `d mod A`; in the
train split exactly round(p * n_d) of digit d's images use it and the rest are spread evenly over
the other colours. The eval split holds other images of the same digits with balanced colours and
is only a quality reference. Everything is a pure function of (seed, p, A, resolution).
"""
from __future__ import annotations

import numbers
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..limits import check_fits_in_memory, check_image_side
from .base import DataError, DiffusionDataset

# Saturated, well-separated stroke colours; the colour predictor in metrics.py measures against
# this same palette, so both sides agree on what "colour a" means.
PALETTE = torch.tensor(
    [
        [1.0, 0.0, 0.0],  # red
        [0.0, 1.0, 0.0],  # green
        [0.0, 0.0, 1.0],  # blue
        [1.0, 1.0, 0.0],  # yellow
        [1.0, 0.0, 1.0],  # magenta
        [0.0, 1.0, 1.0],  # cyan
    ]
)
COLOR_NAMES = ["red", "green", "blue", "yellow", "magenta", "cyan"]
NUM_DIGITS = 10
EVAL_FRACTION = 0.2
MIN_RESOLUTION = 8


def digit_prompts() -> list:
    return [f"digit {d}" for d in range(NUM_DIGITS)]


def check_bias(p: float, num_colors: int) -> None:
    if not 2 <= num_colors <= len(PALETTE):
        raise DataError(f"num_colors must be in [2, {len(PALETTE)}], got {num_colors}")
    if not (1.0 / num_colors - 1e-9 <= p <= 1.0):
        raise DataError(
            f"bias p={p} is outside [1/A, 1] = [{1.0 / num_colors:.3f}, 1]: the majority colour "
            "must be at least as common as under no bias"
        )


def check_resolution(resolution) -> int:
    """`resolution` (the side the digits are rendered at) as an int: an integer from
    MIN_RESOLUTION to limits.MAX_IMAGE_SIDE, else a one-line DataError / ValueError. Checked
    before anything is rendered: a side of 60000 pixels would allocate until a MemoryError."""
    if isinstance(resolution, bool) or not isinstance(resolution, numbers.Integral):
        raise DataError(f"resolution must be an integer >= {MIN_RESOLUTION}, got {resolution!r}")
    if resolution < MIN_RESOLUTION:
        raise DataError(f"resolution must be >= {MIN_RESOLUTION}, got {resolution}")
    check_image_side(int(resolution), "--resolution")
    return int(resolution)


def _digit_intensity(resolution: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(N, 1, R, R) stroke intensity in [0, 1] and (N,) digit labels, from sklearn's 8x8 digits.
    A resolution whose data this machine cannot hold is a ValueError before any is rendered."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    n = len(digits.images)
    # fp32: the strokes of every digit (N, 1, R, R), and the images a split renders from them
    # (at most N, 3 channels): about the peak of either benchmark's build.
    check_fits_in_memory(n * (1 + 3) * resolution * resolution * 4,
                         f"the digits at --resolution {resolution} ({n} images of {resolution}x{resolution})",
                         hint="lower --resolution")
    raw = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    if resolution != 8:
        raw = F.interpolate(raw, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return raw.clamp(0.0, 1.0), torch.from_numpy(digits.target.astype(np.int64))


def _split(labels: torch.Tensor, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-digit stratified train/eval split of the sklearn indices."""
    gen = torch.Generator().manual_seed(seed)
    train, evaluation = [], []
    for d in range(NUM_DIGITS):
        idx = torch.nonzero(labels == d).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_eval = int(round(EVAL_FRACTION * idx.numel()))
        evaluation.append(idx[:n_eval])
        train.append(idx[n_eval:])
    return torch.cat(train).sort().values, torch.cat(evaluation).sort().values


def _assign_colors(labels: torch.Tensor, p: float, num_colors: int, seed: int) -> torch.Tensor:
    """Colour per image: exactly round(p * n_d) majority, minority colours round-robin."""
    gen = torch.Generator().manual_seed(seed + 7919)
    colors = torch.empty_like(labels)
    for d in range(NUM_DIGITS):
        idx = torch.nonzero(labels == d).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        majority = d % num_colors
        n_major = int(round(p * idx.numel()))
        others = [c for c in range(num_colors) if c != majority]
        col = torch.full((idx.numel(),), majority, dtype=torch.long)
        for j in range(idx.numel() - n_major):
            col[n_major + j] = others[j % len(others)]
        colors[idx] = col
    return colors


def render(intensity: torch.Tensor, colors: torch.Tensor) -> torch.Tensor:
    """(N,1,R,R) intensity x (N,) colour index -> (N,3,R,R) images in [-1, 1], black background."""
    rgb = PALETTE[colors].view(-1, 3, 1, 1)
    return intensity * rgb * 2.0 - 1.0


def colored_digits(
    split: str = "train",
    p: float = 0.9,
    num_colors: int = 2,
    resolution: int = 16,
    seed: int = 0,
) -> DiffusionDataset:
    """The colored-digits benchmark. split: "train" (biased at p) or "eval" (balanced colours)."""
    check_bias(p, num_colors)
    if split not in ("train", "eval"):
        raise DataError(f"split must be 'train' or 'eval', got {split!r}")
    resolution = check_resolution(resolution)
    intensity, labels = _digit_intensity(resolution)
    train_idx, eval_idx = _split(labels, seed)
    idx = train_idx if split == "train" else eval_idx
    bias = p if split == "train" else 1.0 / num_colors
    colors = _assign_colors(labels[idx], bias, num_colors, seed)
    return DiffusionDataset(
        images=render(intensity[idx], colors),
        prompt_ids=labels[idx].clone(),
        prompts=digit_prompts(),
        sample_ids=idx.clone(),
        name="colored-digits",
        attributes={"color": colors, "digit": labels[idx].clone()},
        info={"split": split, "p": p, "num_colors": num_colors, "resolution": resolution, "seed": seed},
    )


def majority_color(digit: int, num_colors: int) -> int:
    return digit % num_colors
