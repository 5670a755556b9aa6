"""The in-memory dataset every invdiff stage consumes.

A `DiffusionDataset` is deliberately plain: images, the prompt index of each image (the
conditioning, which training *is* allowed to see), stable sample ids, and an optional table of
attribute labels that exists **for evaluation only**. Training and inference code receive the
dataset through `training_view()`, which drops the attributes, so no code path that learns
anything can read them.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch


from ..errors import DataError  # noqa: F401 (torch-free home; re-exported)


@dataclasses.dataclass
class DiffusionDataset:
    """images: (N, C, H, W) float32 in [-1, 1]; prompt_ids: (N,) int64 index into `prompts`;
    sample_ids: (N,) int64, stable across runs (environment weights are keyed by them);
    attributes: optional {name: (N,) int64} evaluation-only labels;
    random_flip: asks the training loop to flip drawn images horizontally at random, like
    diffusers' --random_flip (the stored images are never flipped)."""

    images: torch.Tensor
    prompt_ids: torch.Tensor
    prompts: List[str]
    sample_ids: torch.Tensor
    name: str
    attributes: Optional[Dict[str, torch.Tensor]] = None
    info: Dict = dataclasses.field(default_factory=dict)
    random_flip: bool = False

    def __post_init__(self):
        shape = self.image_shape
        n = shape[0]
        if n == 0:
            raise DataError(f"dataset {self.name!r} is empty")
        if len(shape) != 4:
            raise DataError(f"images must be (N, C, H, W), got {shape}")
        for label, t in (("prompt_ids", self.prompt_ids), ("sample_ids", self.sample_ids)):
            if t.shape != (n,):
                raise DataError(f"{label} must have shape ({n},), got {tuple(t.shape)}")
        if int(self.prompt_ids.min()) < 0 or int(self.prompt_ids.max()) >= len(self.prompts):
            raise DataError("prompt_ids index outside the prompt list")
        if torch.unique(self.sample_ids).numel() != n:
            raise DataError("sample_ids must be unique")

    @property
    def image_shape(self) -> Tuple[int, ...]:
        """(N, C, H, W) of `images`. A subclass may know it without reading the images (an
        imagefolder decodes its files only when asked: data/imagefolder.py)."""
        return tuple(self.images.shape)

    def __len__(self) -> int:
        return self.image_shape[0]

    @property
    def resolution(self) -> int:
        return self.image_shape[-1]

    @property
    def channels(self) -> int:
        return self.image_shape[1]

    def load_images(self, rows: torch.Tensor) -> torch.Tensor:
        """rows: (B,) int64 -> (B, C, H, W) images of those rows. Consumers that go through the
        data in batches use it, so that a dataset that reads its images from files on demand
        never holds all of them."""
        return self.images[rows]

    def with_images(self, images: torch.Tensor, info: Dict) -> "DiffusionDataset":
        """A plain DiffusionDataset of the same rows (prompts, ids, attributes) with other
        images, e.g. their VAE latents (N, C', h, w), and `info`."""
        same = {f.name: getattr(self, f.name) for f in dataclasses.fields(DiffusionDataset) if f.name not in ("images", "info")}
        return DiffusionDataset(images=images, info=info, **same)

    def training_view(self) -> "DiffusionDataset":
        """The same data without the attribute labels: what every learning stage gets."""
        return dataclasses.replace(self, attributes=None)

    def subset(self, index: torch.Tensor) -> "DiffusionDataset":
        attrs = None if self.attributes is None else {k: v[index] for k, v in self.attributes.items()}
        return dataclasses.replace(
            self,
            images=self.images[index],
            prompt_ids=self.prompt_ids[index],
            sample_ids=self.sample_ids[index],
            attributes=attrs,
        )
