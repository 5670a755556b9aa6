from .base import DataError, DiffusionDataset
from .colored_digits import colored_digits

__all__ = ["DataError", "DiffusionDataset", "colored_digits", "load_dataset"]


def load_dataset(spec: str, split: str = "train", bias: float = 0.9, num_colors: int = 2, resolution: int = 16, seed: int = 0) -> DiffusionDataset:
    """`colored-digits` (the embedded benchmark) or a path to an imagefolder dataset."""
    if spec == "colored-digits":
        return colored_digits(split, p=bias, num_colors=num_colors, resolution=resolution, seed=seed)
    from .imagefolder import imagefolder

    return imagefolder(spec)
