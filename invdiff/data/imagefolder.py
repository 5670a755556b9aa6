"""A folder of images plus `metadata.jsonl`, the layout of diffusers' training scripts.

Each line of metadata.jsonl is {"file_name": "...", "text": "...", <optional attribute columns>}.
`text` is the prompt. Any other column is an attribute label kept for evaluation only.

With `resolution` set, images of any size and aspect ratio are brought to resolution x resolution
the way diffusers' train_text_to_image.py does it: the shorter side is resized to `resolution`
(bicubic here), then the image is cropped to a square, at the centre or, with center_crop=False, at
an offset drawn per sample like torchvision's RandomCrop -- but from a fixed seed and the sample
index, so loading the same folder twice gives identical tensors. Horizontal flipping is not done
at load time: `random_flip` is recorded on the dataset and left to the training loop.

Loading reads only the images' headers. The pixels are decoded when they are asked for: all of
them as one fp32 tensor on the first use of `dataset.images` (the pixel-space path trains on it),
or a batch of rows at a time through `dataset.load_images(rows)` (a latent base streams the folder
through its VAE that way, never holding every image as pixels: 3 MB each at 512 x 512).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..io import path_inside
from ..limits import MAX_IMAGE_SIDE, check_fits_in_memory, check_image_side
from .base import DataError, DiffusionDataset

METADATA = "metadata.jsonl"
CROP_SEED = 0  # the fixed seed of the per-sample crop offsets when center_crop=False
MIN_RESOLUTION = 8
# PIL modes whose convert("RGB") is faithful: 8 bits a channel, with a palette, alpha, CMYK or
# YCbCr. PIL opens a 16-bit RGB(A) or grey+alpha PNG as RGB(A), keeping each sample's high byte
# (floor(v / 256), within one level of round(v / 257)), so those load here too.
EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"})
# 16-bit greyscale (PNG, TIFF), which convert("RGB") clips at 255: mid-grey 32768 would load as
# white. Scaled to 8 bits here instead.
SIXTEEN_BIT_GREY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_MODE_NAMES = {"F": "32-bit floating-point", "I": "32-bit integer", "LAB": "CIE L*a*b*", "HSV": "HSV"}


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
        check_image_side(int(resolution), "--resolution")
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


@contextlib.contextmanager
def _open_image(path: str, name: str, root: str):
    """PIL's lazy Image.open of `path` (listed as `name` in `root`'s metadata): the header is read,
    the pixels only when used. A file PIL cannot read, now or while decoding, is a DataError."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            yield im
    except (OSError, Image.DecompressionBombError) as exc:  # PIL's UnidentifiedImageError and truncated files are OSErrors
        raise DataError(f"{name!r} in {root!r} is not a readable image: {exc}") from exc


def _is_sixteen_bit_grey(im) -> bool:
    # Older Pillows open a 16-bit greyscale PNG as "I"; a PNG holds at most 16 bits a sample, so
    # there "I" is unambiguous. Elsewhere (a 32-bit TIFF) its range is unknown.
    return im.mode in SIXTEEN_BIT_GREY_MODES or (im.mode == "I" and im.format == "PNG")


def _check_mode(im, name: str, root: str) -> None:
    """A DataError of one line, naming the file and its PIL mode, for an image invdiff cannot
    bring to 8 bits a channel unambiguously (32-bit float or integer, L*a*b*, ...)."""
    if im.mode in EIGHT_BIT_MODES or _is_sixteen_bit_grey(im):
        return
    kind = _MODE_NAMES.get(im.mode, "mode " + im.mode)
    raise DataError(f"{name!r} in {root!r} is a {kind} image (PIL mode {im.mode!r}), which invdiff cannot scale to "
                    "8 bits a channel unambiguously; save it as an 8- or 16-bit RGB or greyscale PNG")


def _to_rgb(im, name: str, root: str):
    """`im` as an 8-bit RGB PIL image. 16-bit greyscale is scaled, round(v / 257), where PIL's
    convert("RGB") would clip it at 255; a mode that cannot be scaled is a DataError."""
    from PIL import Image

    _check_mode(im, name, root)
    if not _is_sixteen_bit_grey(im):
        return im.convert("RGB")
    values = np.clip(np.asarray(im).astype(np.int32), 0, 65535)  # "I;16B" is big-endian, "I" int32
    grey = ((values + 128) // 257).astype(np.uint8)  # round(v / 257): v = 257k + 128.5 never ties
    return Image.fromarray(grey).convert("RGB")


def _load_rgb(path: str, name: str, root: str, index: int, resolution: Optional[int], center_crop: bool) -> np.ndarray:
    """The image at `path` (listed as `name` in `root`'s metadata) as (H, W, 3) uint8, resized and
    cropped when `resolution` is set."""
    from PIL import Image

    with _open_image(path, name, root) as im:
        im = _to_rgb(im, name, root)
        if resolution is not None:
            w, h = resized_size(im.width, im.height, resolution)
            if (w, h) != im.size:
                im = im.resize((w, h), resample=Image.Resampling.BICUBIC)
            left, top = crop_box(w, h, resolution, center_crop, index)
            im = im.crop((left, top, left + resolution, top + resolution))
        return np.array(im, dtype=np.uint8)  # a writable copy


@dataclasses.dataclass(frozen=True)
class ImageFiles:
    """The files behind an imagefolder dataset's rows and how they are brought to size: enough to
    decode any rows on demand, and to know the folder's content without decoding it."""

    root: str
    names: Tuple[str, ...]  # each row's file_name, as metadata.jsonl lists it
    paths: Tuple[str, ...]  # the real path of each row's file, inside root
    positions: Tuple[int, ...]  # each row's place in metadata.jsonl: it seeds the crop offset (center_crop=False)
    resolution: Optional[int]  # None: the images' own size
    size: int  # the side of every loaded image
    center_crop: bool

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, rows: Sequence[int]) -> torch.Tensor:
        """(len(rows), 3, size, size) fp32 in [-1, 1]: the images of those rows, decoded from their
        files. Rows this machine's memory cannot hold are a ValueError before any is decoded."""
        hint = "lower --resolution" if self.resolution is not None else "pass --resolution N to resize the images smaller"
        check_fits_in_memory(len(rows) * 3 * self.size * self.size * 4,
                             f"{len(rows)} images of {self.size}x{self.size} from {self.root!r} (fp32)", hint)
        out = torch.empty((len(rows), 3, self.size, self.size), dtype=torch.float32)
        for k, row in enumerate(int(r) for r in rows):
            arr = _load_rgb(self.paths[row], self.names[row], self.root, self.positions[row], self.resolution, self.center_crop)
            if arr.shape != (self.size, self.size, 3):
                raise DataError(f"{self.names[row]!r} in {self.root!r} is now {arr.shape[1]}x{arr.shape[0]}, not the "
                                f"{self.size}x{self.size} it was when the folder was loaded: it changed on disk")
            out[k] = torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1.0
        return out

    def subset(self, index: torch.Tensor) -> "ImageFiles":
        """The files of rows `index` (anything that indexes a (N,) tensor), each keeping its crop."""
        rows = torch.arange(len(self))[index].tolist()
        return dataclasses.replace(self, names=tuple(self.names[i] for i in rows), paths=tuple(self.paths[i] for i in rows),
                                   positions=tuple(self.positions[i] for i in rows))

    def fingerprint(self) -> str:
        """A hash of what the decoded pixels depend on: each row's file name, byte size and
        modification time (ns), its crop position, and the resize and crop settings. It reads no
        pixels, so checking a cache costs one stat per file. A rewritten file gets a new
        modification time; a file replaced by one of the same size with its old time kept (cp -p
        of other content) is not noticed."""
        h = hashlib.sha256()
        h.update(json.dumps({"resolution": self.resolution, "size": self.size, "center_crop": self.center_crop,
                             "crop_seed": CROP_SEED, "interpolation": "bicubic"}, sort_keys=True).encode())
        for name, path, position in zip(self.names, self.paths, self.positions):
            stat = os.stat(path)
            h.update(json.dumps([name, position, stat.st_size, stat.st_mtime_ns]).encode())
        return h.hexdigest()


@dataclasses.dataclass(eq=False, repr=False)
class ImageFolderDataset(DiffusionDataset):
    """An imagefolder dataset that decodes its pixels from `files` only when they are used.

    `images` is every row as one (N, 3, S, S) fp32 tensor, decoded on first use and kept: the
    pixel-space path trains on it whole, with the values imagefolder() always gave.
    `load_images(rows)` decodes only those rows, and `training_view()` and `subset()` read no
    pixels, so a latent base can encode the folder batch by batch (models/sd.py latent_dataset).
    Built with `images` (e.g. by dataclasses.replace, which reads them), it holds those instead.
    """

    files: Optional[ImageFiles] = None

    @property
    def images(self) -> torch.Tensor:
        if self._pixels is None:
            self._pixels = self.files.load(range(len(self.files)))
        return self._pixels

    @images.setter
    def images(self, value: Optional[torch.Tensor]) -> None:
        self._pixels = value

    @property
    def image_shape(self) -> Tuple[int, ...]:
        if self._pixels is not None:
            return tuple(self._pixels.shape)
        return (len(self.files), 3, self.files.size, self.files.size)

    def load_images(self, rows: torch.Tensor) -> torch.Tensor:
        return self._pixels[rows] if self._pixels is not None else self.files.load(rows)

    def training_view(self) -> "ImageFolderDataset":
        view = copy.copy(self)  # not dataclasses.replace, which would decode every image
        view.attributes = None
        return view

    def subset(self, index: torch.Tensor) -> "ImageFolderDataset":
        attrs = None if self.attributes is None else {k: v[index] for k, v in self.attributes.items()}
        return dataclasses.replace(
            self,
            images=None if self._pixels is None else self._pixels[index],
            files=self.files.subset(index),
            prompt_ids=self.prompt_ids[index],
            sample_ids=self.sample_ids[index],
            attributes=attrs,
        )

    def __repr__(self) -> str:
        state = "decoded" if self._pixels is not None else "decoded from its files on use"
        return f"ImageFolderDataset({self.name!r}, {len(self)} images of {self.resolution}x{self.resolution}, {state})"


def imagefolder(
    root: str,
    resolution: Optional[int] = None,
    center_crop: bool = True,
    random_flip: bool = False,
) -> ImageFolderDataset:
    """Every listed image as RGB in [-1, 1], decoded when used (see ImageFolderDataset).

    resolution: None keeps the images as they are, so they must all be square, of one size and at
    least 8x8; an int (>= 8) resizes each image's shorter side to it (bicubic) and crops a square.
    center_crop: crop at the centre; False crops at a per-sample offset that is random-looking
    but fixed (seeded by CROP_SEED and the sample index), so loading is deterministic.
    random_flip: not applied here; recorded as `dataset.random_flip` for the training loop.
    A side past limits.MAX_IMAGE_SIDE (resolution or the images' own), and an image whose mode
    cannot be brought to 8 bits a channel (16-bit greyscale is scaled; 32-bit float is refused),
    are one-line errors here, before any pixel is decoded; so are rows the machine's memory
    cannot hold as fp32, when they are decoded (ImageFiles.load).
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
    sizes = {}  # (height, width) after loading -> the first file of that size
    largest_resize = (0, "")  # the most pixels a file is resized to before its crop, and that file
    for r, path in zip(rows, files):
        with _open_image(path, r["file_name"], root) as im:  # the header only
            width, height = im.size
            _check_mode(im, r["file_name"], root)
        sizes.setdefault((height, width) if resolution is None else (resolution, resolution), r["file_name"])
        if resolution is not None:
            resized = resized_size(width, height, resolution)
            largest_resize = max(largest_resize, (resized[0] * resized[1], r["file_name"]))
    if largest_resize[0]:
        # A narrow image's longer side grows with the shorter one: 10 x 100000 pixels resized to
        # 4096 would be 4096 x 40960000 (RGBX, 4 bytes a pixel in PIL) before it is cropped.
        check_fits_in_memory(largest_resize[0] * 4, f"resizing {largest_resize[1]!r} in {root!r} to --resolution {resolution} "
                             "on its shorter side", "lower --resolution, or crop that image nearer to a square first")
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
    if h > MAX_IMAGE_SIDE:  # the same cap as resolution=N
        raise DataError(f"images are {h}x{w} (e.g. {name}), larger than invdiff's cap of {MAX_IMAGE_SIDE} pixels a side "
                        f"(invdiff/limits.py); {hint} (N <= {MAX_IMAGE_SIDE})")
    image_files = ImageFiles(root=root, names=tuple(r["file_name"] for r in rows), paths=tuple(files),
                             positions=tuple(range(len(rows))), resolution=resolution, size=h, center_crop=center_crop)
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
    return ImageFolderDataset(
        images=None,
        files=image_files,
        prompt_ids=torch.tensor([index[r["text"]] for r in rows]),
        prompts=prompts,
        sample_ids=torch.arange(len(rows)),
        name=f"imagefolder:{os.path.abspath(root)}",
        attributes=attributes or None,
        info=info,
        random_flip=random_flip,
    )
