"""A folder of images plus `metadata.jsonl`, the layout of diffusers' training scripts.

Each line of metadata.jsonl is {"file_name": "...", "text": "...", <optional attribute columns>}.
`text` is the prompt. Any other column is an attribute label kept for evaluation only.

With `resolution` set, images of any size and aspect ratio are brought to resolution x resolution
the way diffusers' train_text_to_image.py does it: the shorter side is resized to `resolution`
(bicubic here), then the image is cropped to a square, at the centre or, with center_crop=False, at
an offset drawn per sample like torchvision's RandomCrop -- but from a fixed seed and the sample
index, so loading the same folder twice gives identical tensors. Horizontal flipping is not done
at load time: `random_flip` is recorded on the dataset and left to the training loop.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..io import path_inside
from .base import DataError, DiffusionDataset

METADATA = "metadata.jsonl"
CROP_SEED = 0  # the fixed seed of the per-sample crop offsets when center_crop=False
MIN_RESOLUTION = 8


def _read_metadata(root: str) -> Tuple[List[Dict], List[str]]:
    """The rows of metadata.jsonl and the real path of each row's image, which must lie inside `root`."""
    path = os.path.join(root, METADATA)
    if not os.path.isfile(path):
        raise DataError(f"{root!r} has no {METADATA}: expected lines like " '{"file_name": "a.png", "text": "a prompt"}')
    rows, files = [], []
    with open(path, "rb") as f:  # bytes, so that a line that is not UTF-8 can be named
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{path}:{lineno}: not UTF-8 text ({exc.reason} at byte {exc.start}); save {METADATA} as UTF-8"
                ) from exc
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            except RecursionError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON (nested too deeply)") from exc
            if not isinstance(row, dict) or "file_name" not in row or "text" not in row:
                raise DataError(f"{path}:{lineno}: every line needs 'file_name' and 'text'")
            if not isinstance(row["file_name"], str) or not isinstance(row["text"], str):
                raise DataError(f"{path}:{lineno}: 'file_name' and 'text' must be strings")
            # Not os.path.join alone: "../x", an absolute path or a link out of the folder would
            # read (and train on) any file the user can read.
            image = path_inside(root, row["file_name"])
            if image is None:
                raise DataError(f"{path}:{lineno}: file_name {row['file_name']!r} leads outside the dataset folder {root!r}")
            rows.append(row)
            files.append(image)
    if not rows:
        raise DataError(f"{path} lists no images")
    return rows, files


def _check_options(resolution, center_crop, random_flip) -> None:
    if resolution is not None:
        if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)):
            raise DataError(f"resolution must be an integer >= {MIN_RESOLUTION} (or None to keep the images' own size), got {resolution!r}")
        if resolution < MIN_RESOLUTION:
            raise DataError(f"resolution must be >= {MIN_RESOLUTION}, got {int(resolution)}")
    for label, value in (("center_crop", center_crop), ("random_flip", random_flip)):
        if not isinstance(value, (bool, np.bool_)):
            raise DataError(f"{label} must be True or False, got {value!r}")


def resized_size(width: int, height: int, resolution: int) -> Tuple[int, int]:
    """(width, height) with the shorter side equal to `resolution`, the longer one scaled and
    truncated like torchvision's Resize(int)."""
    if width <= height:
        return resolution, int(resolution * height / width)
    return int(resolution * width / height), resolution


def crop_box(width: int, height: int, resolution: int, center_crop: bool, index: int) -> Tuple[int, int]:
    """(left, top) of the resolution x resolution crop of a (width, height) image.

    Centre: torchvision's CenterCrop rounding. Otherwise torchvision's RandomCrop range
    (offsets 0..size-resolution inclusive), drawn from a generator seeded by (CROP_SEED, index)."""
    if center_crop:
        return int(round((width - resolution) / 2.0)), int(round((height - resolution) / 2.0))
    rng = np.random.default_rng((CROP_SEED, int(index)))
    top = int(rng.integers(0, height - resolution + 1))
    left = int(rng.integers(0, width - resolution + 1))
    return left, top


def _load_rgb(path: str, name: str, root: str, index: int, resolution: Optional[int], center_crop: bool) -> np.ndarray:
    """The image at `path` (listed as `name` in `root`'s metadata) as (H, W, 3) uint8, resized and
    cropped when `resolution` is set."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if resolution is not None:
                w, h = resized_size(im.width, im.height, resolution)
                if (w, h) != im.size:
                    im = im.resize((w, h), resample=Image.Resampling.BICUBIC)
                left, top = crop_box(w, h, resolution, center_crop, index)
                im = im.crop((left, top, left + resolution, top + resolution))
            return np.array(im, dtype=np.uint8)  # a writable copy
    except (OSError, Image.DecompressionBombError) as exc:  # PIL's UnidentifiedImageError and truncated files are OSErrors
        raise DataError(f"{name!r} in {root!r} is not a readable image: {exc}") from exc


def imagefolder(
    root: str,
    resolution: Optional[int] = None,
    center_crop: bool = True,
    random_flip: bool = False,
) -> DiffusionDataset:
    """Load every listed image as RGB in [-1, 1].

    resolution: None keeps the images as they are, so they must all be square, of one size and at
    least 8x8; an int (>= 8) resizes each image's shorter side to it (bicubic) and crops a square.
    center_crop: crop at the centre; False crops at a per-sample offset that is random-looking
    but fixed (seeded by CROP_SEED and the sample index), so loading is deterministic.
    random_flip: not applied here; recorded as `dataset.random_flip` for the training loop.
    """
    _check_options(resolution, center_crop, random_flip)
    if resolution is not None:
        resolution = int(resolution)
    center_crop, random_flip = bool(center_crop), bool(random_flip)
    if not os.path.isdir(root):
        raise DataError(f"dataset folder {root!r} does not exist")
    rows, files = _read_metadata(root)
    missing = [r["file_name"] for r, path in zip(rows, files) if not os.path.isfile(path)]
    if missing:
        raise DataError(f"{len(missing)} file(s) listed in {METADATA} are missing, e.g. {missing[:3]}")
    images, sizes = [], {}
    for i, (r, path) in enumerate(zip(rows, files)):
        arr = _load_rgb(path, r["file_name"], root, i, resolution, center_crop)
        sizes.setdefault(arr.shape[:2], r["file_name"])
        images.append(arr)
    hint = "pass --resolution N (resolution=N in Python) to resize and crop every image to N x N"
    if len(sizes) > 1:
        desc = ", ".join(f"{h}x{w} (e.g. {name})" for (h, w), name in sizes.items())
        raise DataError(f"images in {root!r} have mixed sizes: {desc}; {hint}")
    ((h, w), name), = sizes.items()
    if h != w:
        raise DataError(f"images must be square, got {h}x{w} (e.g. {name}); {hint}")
    if h < MIN_RESOLUTION:  # their own size becomes the model's resolution: the same floor as resolution=N
        raise DataError(f"images are {h}x{w} (e.g. {name}), smaller than {MIN_RESOLUTION}x{MIN_RESOLUTION}, "
                        f"the smallest resolution invdiff trains at; {hint} (N >= {MIN_RESOLUTION})")
    # uint8 while reading, float32 only once: peak memory ~1.25x the final tensor
    x = torch.empty((len(images), 3, h, w), dtype=torch.float32)
    for i, arr in enumerate(images):
        x[i] = torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1.0
        images[i] = None
    prompts = sorted({r["text"] for r in rows})
    index = {p: i for i, p in enumerate(prompts)}
    attr_keys = sorted({k for r in rows for k in r} - {"file_name", "text"})
    attributes = {}
    for key in attr_keys:
        values = sorted({str(r.get(key)) for r in rows})
        vindex = {v: i for i, v in enumerate(values)}
        attributes[key] = torch.tensor([vindex[str(r.get(key))] for r in rows])
    info = {
        "root": os.path.abspath(root),
        "attribute_values": {k: sorted({str(r.get(k)) for r in rows}) for k in attr_keys},
        "resolution": resolution,
        "center_crop": center_crop,
        "random_flip": random_flip,
    }
    if resolution is not None:
        info["interpolation"] = "bicubic"
        if not center_crop:
            info["crop_seed"] = CROP_SEED
    return DiffusionDataset(
        images=x,
        prompt_ids=torch.tensor([index[r["text"]] for r in rows]),
        prompts=prompts,
        sample_ids=torch.arange(len(rows)),
        name=f"imagefolder:{os.path.abspath(root)}",
        attributes=attributes or None,
        info=info,
        random_flip=random_flip,
    )
