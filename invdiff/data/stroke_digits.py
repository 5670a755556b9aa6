"""A held-out benchmark whose spurious attribute is not a colour: stroke thickness.

The same scikit-learn digits, drawn white on black (all channels equal, so no channel-space map
can express the attribute). Digit d is drawn with thickness `d mod 2` (0 thin: the digit as it is;
1 thick: dilated by a 3x3 maximum) with probability p, otherwise with the other thickness. The
eval split is balanced. `write_imagefolder` writes a split as an imagefolder (PNG files and
metadata.jsonl with a `thickness` column), so that the model is trained through the generic
imagefolder path, the way a user's own data would be.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
import torch.nn.functional as F

from .base import DataError, DiffusionDataset
from .colored_digits import NUM_DIGITS, _assign_colors, _digit_intensity, _split, check_bias, check_resolution, digit_prompts

THICKNESS_NAMES = ["thin", "thick"]


def thicken(intensity: torch.Tensor) -> torch.Tensor:
    """(N, 1, R, R) stroke intensity -> the same strokes dilated by one pixel (3x3 max)."""
    return F.max_pool2d(intensity, 3, stride=1, padding=1)


def stroke_digits(split: str = "train", p: float = 0.9, resolution: int = 16, seed: int = 0) -> DiffusionDataset:
    """White digits whose thickness is biased towards `d mod 2` with probability p (train), or
    balanced (eval). Images (N, 3, R, R) in [-1, 1]; attributes {"thickness", "digit"}."""
    check_bias(p, 2)
    if split not in ("train", "eval"):
        raise DataError(f"split must be 'train' or 'eval', got {split!r}")
    resolution = check_resolution(resolution)
    intensity, labels = _digit_intensity(resolution)
    train_idx, eval_idx = _split(labels, seed)
    idx = train_idx if split == "train" else eval_idx
    thickness = _assign_colors(labels[idx], p if split == "train" else 0.5, 2, seed)
    strokes = torch.where(thickness.view(-1, 1, 1, 1).bool(), thicken(intensity[idx]), intensity[idx])
    return DiffusionDataset(
        images=strokes.expand(-1, 3, -1, -1) * 2.0 - 1.0,
        prompt_ids=labels[idx].clone(),
        prompts=digit_prompts(),
        sample_ids=idx.clone(),
        name="stroke-digits",
        attributes={"thickness": thickness, "digit": labels[idx].clone()},
        info={"split": split, "p": p, "resolution": resolution, "seed": seed},
    )


def write_imagefolder(dataset: DiffusionDataset, root: str) -> str:
    """Write `dataset` as PNGs plus metadata.jsonl ({"file_name", "text", attribute columns})."""
    from PIL import Image

    os.makedirs(root, exist_ok=True)
    pixels = ((dataset.images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    with open(os.path.join(root, "metadata.jsonl"), "w") as f:
        for i in range(len(dataset)):
            name = f"{int(dataset.sample_ids[i]):05d}.png"
            Image.fromarray(np.ascontiguousarray(pixels[i])).save(os.path.join(root, name))
            row = {"file_name": name, "text": dataset.prompts[int(dataset.prompt_ids[i])]}
            row.update({k: int(v[i]) for k, v in (dataset.attributes or {}).items()})
            f.write(json.dumps(row) + "\n")
    return root


def ink(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N,) mean stroke intensity (the amount of ink)."""
    return ((images.float().clamp(-1, 1) + 1) / 2).amax(1).flatten(1).mean(1)


class ThicknessProbe:
    """Thin or thick, measured from pixels: a digit's ink against a per-digit threshold halfway
    between the mean ink of its thin and its thick real images (fit on labelled real images;
    evaluation only)."""

    def __init__(self, real: DiffusionDataset):
        amount, digit, thick = ink(real.images), real.attributes["digit"], real.attributes["thickness"]
        self.thresholds = torch.stack([
            0.5 * (amount[(digit == d) & (thick == 0)].mean() + amount[(digit == d) & (thick == 1)].mean())
            for d in range(NUM_DIGITS)
        ])

    def __call__(self, images: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W), (N,) prompted digit -> (N,) 0 thin / 1 thick."""
        return (ink(images) > self.thresholds[prompt_ids]).long()
