"""A folder of images plus `metadata.jsonl`, the layout of diffusers' training scripts.

Each line of metadata.jsonl is {"file_name": "...", "text": "...", <optional attribute columns>}.
`text` is the prompt. Any other column is an attribute label kept for evaluation only.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List

import numpy as np
import torch

from .base import DataError, DiffusionDataset

METADATA = "metadata.jsonl"


def _read_metadata(root: str) -> List[Dict]:
    path = os.path.join(root, METADATA)
    if not os.path.isfile(path):
        raise DataError(f"{root!r} has no {METADATA}: expected lines like " '{"file_name": "a.png", "text": "a prompt"}')
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict) or "file_name" not in row or "text" not in row:
                raise DataError(f"{path}:{lineno}: every line needs 'file_name' and 'text'")
            if not isinstance(row["file_name"], str) or not isinstance(row["text"], str):
                raise DataError(f"{path}:{lineno}: 'file_name' and 'text' must be strings")
            rows.append(row)
    if not rows:
        raise DataError(f"{path} lists no images")
    return rows


def imagefolder(root: str) -> DiffusionDataset:
    """Load every listed image as RGB in [-1, 1]. All images must share one size."""
    from PIL import Image

    if not os.path.isdir(root):
        raise DataError(f"dataset folder {root!r} does not exist")
    rows = _read_metadata(root)
    missing = [r["file_name"] for r in rows if not os.path.isfile(os.path.join(root, r["file_name"]))]
    if missing:
        raise DataError(f"{len(missing)} file(s) listed in {METADATA} are missing, e.g. {missing[:3]}")
    images, sizes = [], {}
    for r in rows:
        try:
            with Image.open(os.path.join(root, r["file_name"])) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.float32)
        except OSError as exc:  # PIL's UnidentifiedImageError and truncated files are OSErrors
            raise DataError(f"{r['file_name']!r} in {root!r} is not a readable image: {exc}") from exc
        sizes.setdefault(arr.shape[:2], r["file_name"])
        images.append(arr)
    if len(sizes) > 1:
        desc = ", ".join(f"{h}x{w} (e.g. {name})" for (h, w), name in sizes.items())
        raise DataError(f"images in {root!r} have mixed sizes: {desc}; resize them to one size first")
    (h, w), = sizes
    if h != w:
        raise DataError(f"images must be square, got {h}x{w}")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1.0
    prompts = sorted({r["text"] for r in rows})
    index = {p: i for i, p in enumerate(prompts)}
    attr_keys = sorted({k for r in rows for k in r} - {"file_name", "text"})
    attributes = {}
    for key in attr_keys:
        values = sorted({str(r.get(key)) for r in rows})
        vindex = {v: i for i, v in enumerate(values)}
        attributes[key] = torch.tensor([vindex[str(r.get(key))] for r in rows])
    return DiffusionDataset(
        images=x.contiguous(),
        prompt_ids=torch.tensor([index[r["text"]] for r in rows]),
        prompts=prompts,
        sample_ids=torch.arange(len(rows)),
        name=f"imagefolder:{os.path.abspath(root)}",
        attributes=attributes or None,
        info={"root": os.path.abspath(root), "attribute_values": {k: sorted({str(r.get(k)) for r in rows}) for k in attr_keys}},
    )
