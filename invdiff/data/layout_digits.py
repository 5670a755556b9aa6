"""Two held-out benchmarks whose spurious attribute is where or how big the digit is (issue 21).

The same scikit-learn digits, white on black like stroke thickness (all channels equal, so no
channel-space map can express the attribute), on an R x R canvas:
- "position": the digit, drawn at 3/4 of the canvas, sits against the left or the right edge
  (vertically centred). Digit d is on side `d mod 2` (0 left, 1 right) with probability p.
- "size": the digit fills the canvas, or is drawn at half of it in the centre. Digit d has size
  `d mod 2` (0 small, 1 large) with probability p.
The eval split is balanced. The bases are trained through the generic imagefolder path
(stroke_digits.write_imagefolder), the way a user's own data would be. Probes measure the
attribute from pixels for evaluation only.
"""
from __future__ import annotations

import torch

from .base import DataError, DiffusionDataset
from .colored_digits import NUM_DIGITS, _assign_colors, _digit_intensity, _split, check_bias, check_resolution, digit_prompts

LAYOUT_ATTRIBUTES = {"position": ["left", "right"], "size": ["small", "large"]}


def _paste(strokes: torch.Tensor, resolution: int, top: int, left: int) -> torch.Tensor:
    """(N, 1, s, s) strokes -> (N, 1, R, R) black canvases with the strokes at (top, left)."""
    canvas = strokes.new_zeros(strokes.shape[0], 1, resolution, resolution)
    size = strokes.shape[-1]
    canvas[:, :, top:top + size, left:left + size] = strokes
    return canvas


def layout_digits(split: str = "train", attribute: str = "position", p: float = 0.9, resolution: int = 16,
                  seed: int = 0) -> DiffusionDataset:
    """White digits whose position (left/right) or size (small/large) is biased towards
    `d mod 2` with probability p (train), or balanced (eval). Images (N, 3, R, R) in [-1, 1];
    attributes {attribute, "digit"}. R must be at least 16, so that the small and the placed
    digits keep 8 pixels a side."""
    if attribute not in LAYOUT_ATTRIBUTES:
        raise DataError(f"attribute must be one of {sorted(LAYOUT_ATTRIBUTES)}, got {attribute!r}")
    check_bias(p, 2)
    if split not in ("train", "eval"):
        raise DataError(f"split must be 'train' or 'eval', got {split!r}")
    resolution = check_resolution(resolution)
    if resolution < 16:
        raise DataError(f"layout digits need a resolution of at least 16, got {resolution}")
    _, labels = _digit_intensity(8)
    train_idx, eval_idx = _split(labels, seed)
    idx = train_idx if split == "train" else eval_idx
    value = _assign_colors(labels[idx], p if split == "train" else 0.5, 2, seed)
    if attribute == "position":
        side = resolution * 3 // 4
        strokes = _digit_intensity(side)[0][idx]
        top = (resolution - side) // 2
        left, right = _paste(strokes, resolution, top, 0), _paste(strokes, resolution, top, resolution - side)
        images = torch.where(value.view(-1, 1, 1, 1).bool(), right, left)
    else:
        small = _digit_intensity(resolution // 2)[0][idx]
        offset = (resolution - resolution // 2) // 2
        images = torch.where(value.view(-1, 1, 1, 1).bool(), _digit_intensity(resolution)[0][idx],
                             _paste(small, resolution, offset, offset))
    return DiffusionDataset(
        images=images.expand(-1, 3, -1, -1) * 2.0 - 1.0,
        prompt_ids=labels[idx].clone(),
        prompts=digit_prompts(),
        sample_ids=idx.clone(),
        name=f"{attribute}-digits",
        attributes={attribute: value, "digit": labels[idx].clone()},
        info={"split": split, "attribute": attribute, "p": p, "resolution": resolution, "seed": seed},
    )


# Ink below this level is background: a sampled image's faint haze, spread over the whole canvas,
# would otherwise weigh in the radius of gyration and read a small digit as a large one.
INK_FLOOR = 0.25


def _ink_geometry(images: torch.Tensor):
    """(N, 3, H, W) in [-1, 1] -> ((N,) ink-weighted mean column in [0, 1], (N,) ink-weighted
    radius of gyration in units of the canvas side), counting ink above INK_FLOOR only."""
    ink = ((images.float().clamp(-1, 1) + 1) / 2).amax(1)  # (N, H, W)
    ink = ((ink - INK_FLOOR) / (1 - INK_FLOOR)).clamp_min(0)
    h, w = ink.shape[-2:]
    total = ink.flatten(1).sum(1).clamp_min(1e-6)
    ys = (torch.arange(h, dtype=ink.dtype) + 0.5) / h
    xs = (torch.arange(w, dtype=ink.dtype) + 0.5) / w
    cx = (ink.sum(1) * xs).sum(1) / total
    cy = (ink.sum(2) * ys).sum(1) / total
    r2 = (ink * ((xs[None, None, :] - cx[:, None, None]) ** 2 + (ys[None, :, None] - cy[:, None, None]) ** 2)).flatten(1).sum(1)
    return cx, (r2 / total).sqrt()


class LayoutProbe:
    """Left/right or small/large, measured from pixels: a digit's ink centre column (position) or
    its ink's radius of gyration (size) against a per-digit threshold halfway between the means
    of its two kinds of real images (fit on labelled real images; evaluation only)."""

    def __init__(self, real: DiffusionDataset, attribute: str):
        if attribute not in LAYOUT_ATTRIBUTES:
            raise DataError(f"attribute must be one of {sorted(LAYOUT_ATTRIBUTES)}, got {attribute!r}")
        self.attribute = attribute
        measure, digit, value = self._measure(real.images), real.attributes["digit"], real.attributes[attribute]
        self.thresholds = torch.stack([
            0.5 * (measure[(digit == d) & (value == 0)].mean() + measure[(digit == d) & (value == 1)].mean())
            for d in range(NUM_DIGITS)
        ])

    def _measure(self, images: torch.Tensor) -> torch.Tensor:
        cx, radius = _ink_geometry(images)
        return cx if self.attribute == "position" else radius

    def __call__(self, images: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W), (N,) prompted digit -> (N,) 0 (left / small) or 1 (right / large)."""
        return (self._measure(images) > self.thresholds[prompt_ids]).long()
