import dataclasses
from typing import Optional

from .base import DataError, DiffusionDataset
from .colored_digits import colored_digits

__all__ = ["DataError", "DiffusionDataset", "colored_digits", "load_dataset"]

COLORED_DIGITS_RESOLUTION = 16


def load_dataset(
    spec: str,
    split: str = "train",
    bias: float = 0.9,
    num_colors: int = 2,
    resolution: Optional[int] = None,
    seed: int = 0,
    *,
    center_crop: bool = True,
    random_flip: bool = False,
) -> DiffusionDataset:
    """`colored-digits` (the embedded benchmark) or a path to an imagefolder dataset.

    resolution: colored-digits renders at it (None: 16); an imagefolder resizes each image's
    shorter side to it and crops a square (None: keep the images' own, shared, square size).
    center_crop: imagefolder only (colored-digits is rendered square, nothing to crop).
    random_flip: recorded on the returned dataset for the training loop; nothing is flipped here.
    """
    if spec == "colored-digits":
        if resolution is None:
            resolution = COLORED_DIGITS_RESOLUTION
        ds = colored_digits(split, p=bias, num_colors=num_colors, resolution=resolution, seed=seed)
        if not isinstance(random_flip, bool):
            raise DataError(f"random_flip must be True or False, got {random_flip!r}")
        return dataclasses.replace(ds, random_flip=True) if random_flip else ds
    from .imagefolder import imagefolder

    return imagefolder(spec, resolution=resolution, center_crop=center_crop, random_flip=random_flip)
