"""What a model folder is and what size it samples at, read from its small files alone.

Kept free of torch and diffusers: the command line asks `sampling_size` before it imports
anything heavy, so that a bad size or a damaged config file is one line in well under a second,
before any model is loaded. Every value read from a file is checked here, and a bad one is a
CheckpointError naming the file and the key: a damaged config must not end in a TypeError,
KeyError or ZeroDivisionError, nor in a MemoryError after the model has loaded.

The kinds of folder, told apart by `classify` from which files exist (load.py loads each kind,
write.py writes the run folders):

    FolderKind.SD             a Stable Diffusion folder: model_index.json, unet/config.json,
                              vae/config.json, text_encoder/, tokenizer/, scheduler/
    FolderKind.PIPELINE       an SD folder that also holds G_psi in guidance/: one written by
                              InvDiffPipeline.save_pretrained, or a --copy-base SD run
    FolderKind.BASE           an invdiff base folder: invdiff_base.json, unet/config.json,
                              conditioner/, scheduler/
    FolderKind.RUN            a debias run on an embedded base: invdiff_run.json, base/ (an
                              invdiff base folder), guidance/
    FolderKind.REFERRING_RUN  a debias run on an SD base that refers to its base: invdiff_run.json
                              (with "vae_factor", "resolution" and the base's place:
                              models/base_reference.py), guidance/

Anything else is no model folder: `classify` raises NotAModelFolder, one line.
"""
from __future__ import annotations

import json
import numbers
import os
from enum import Enum
from typing import Any, Dict, Optional, Tuple

from ..errors import CheckpointError
from ..limits import MAX_IMAGE_SIDE, check_image_side

RUN_META = "invdiff_run.json"  # a debias run folder's record of what was run
BASE_META = "invdiff_base.json"  # an invdiff base folder's record of how it was trained
SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")  # a Stable Diffusion folder's parts
SD_WEIGHTED_COMPONENTS = ("unet", "vae", "text_encoder")  # the tokenizer and scheduler are config files only


def _shown(value: Any, most: int = 60) -> str:
    """repr(value) cut to `most` characters: a damaged file may hold a long string or list there."""
    text = repr(value)
    return text if len(text) <= most else text[: most - 3] + "..."


def _is_positive_int(value: Any) -> bool:
    # bool is an int to Python, but `true` in a config file is no size
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def read_json_object(path: str, what: str) -> Dict:
    """The JSON object in the file at `path` (`what` names it in errors, e.g. "the UNet's config").
    A missing file, one that cannot be read or parsed, or one holding anything but an object is a
    CheckpointError of one line naming the file. The wording of the first two follows io.read_json."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} not found: {path}")
    try:
        with open(path, "rb") as f:  # bytes: json detects UTF-8/16/32 itself, whatever the locale
            value = json.loads(f.read())
    except OSError as exc:
        raise CheckpointError(f"{what} at {path} could not be read: {exc.strerror or exc}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # garbage bytes fail to decode first
        raise CheckpointError(f"{what} at {path} is corrupt: {exc}") from exc
    except RecursionError as exc:
        raise CheckpointError(f"{what} at {path} is corrupt: nested too deeply") from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"{what} at {path} is corrupt: it holds a JSON {type(value).__name__}, not an object")
    return value


def is_sd_folder(path: str) -> bool:
    """A diffusers pipeline folder (it has model_index.json)."""
    return os.path.isfile(os.path.join(path, "model_index.json"))


def vae_downsampling_factor(vae_config) -> int:
    """Pixels per latent cell along a side of an AutoencoderKL with this config (a dict or the
    model's config): 2 ** (number of down blocks - 1). Unchecked: see read_vae_factor for a file."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def refers_to_base(path: str) -> bool:
    """A run folder that records its base rather than holding it: invdiff_run.json without the
    base's files (a --copy-base SD run has model_index.json, an embedded run has base/)."""
    return (os.path.isfile(os.path.join(path, RUN_META)) and not os.path.isfile(os.path.join(path, "model_index.json"))
            and not os.path.isdir(os.path.join(path, "base")))


class NotAModelFolder(CheckpointError):
    """`classify` found none of the files that make a model folder (or no folder at all)."""


class FolderKind(str, Enum):
    """The kinds of model folder (see the module's docstring for what each holds)."""

    BASE = "base"
    RUN = "run"
    SD = "sd"
    PIPELINE = "pipeline"
    REFERRING_RUN = "referring-run"

    @property
    def latent(self) -> bool:
        """Its frozen base is a Stable Diffusion model in latent space (models/sd.py), not an
        embedded invdiff base."""
        return self in (FolderKind.SD, FolderKind.PIPELINE, FolderKind.REFERRING_RUN)


def classify(path: str) -> FolderKind:
    """The kind of model folder at `path`, from which of its files exist (none is read, so a
    damaged one is named by whoever reads it). The first that fits, in this order: a run that
    refers to its base, an SD folder (a pipeline folder when it holds guidance/), a run on an
    embedded base, an invdiff base. Anything else, a missing path included, is NotAModelFolder,
    one line."""
    if refers_to_base(path):
        return FolderKind.REFERRING_RUN
    if is_sd_folder(path):
        return FolderKind.PIPELINE if os.path.isdir(os.path.join(path, "guidance")) else FolderKind.SD
    if os.path.isfile(os.path.join(path, RUN_META)):
        return FolderKind.RUN
    if os.path.isfile(os.path.join(path, BASE_META)) or os.path.isdir(os.path.join(path, "unet")):
        return FolderKind.BASE
    raise NotAModelFolder(f"{path!r} is neither an invdiff base model, a run folder nor a Stable Diffusion folder")


def check_image_size(pixels: int, factor: int, name: str = "height") -> None:
    """A sampled image's height or width must be a positive integer, a whole number of latent
    cells (`factor` pixels each, the VAE's downsampling factor; 1 in pixel space), and at most
    limits.MAX_IMAGE_SIDE: ValueError of one line naming `name` otherwise."""
    if not _is_positive_int(pixels):
        raise ValueError(f"{name} must be a positive integer, got {_shown(pixels)}")
    if pixels % factor:
        nearest = max(factor, pixels // factor * factor)
        raise ValueError(f"{name} {pixels} is not a multiple of the VAE's downsampling factor {factor}; "
                         f"use a multiple of {factor} (e.g. {nearest})")
    check_image_side(int(pixels), name)


def _check_factor(factor: Any, where: str) -> int:
    """`factor` as the VAE's pixels per latent cell: a positive power of two at most
    MAX_IMAGE_SIDE (`where` names its source). CheckpointError of one line otherwise."""
    if not _is_positive_int(factor) or factor & (factor - 1):
        raise CheckpointError(f"{where} must be a positive power of two (the VAE's pixels per latent cell), "
                              f"got {_shown(factor)}")
    _check_file_side(int(factor), where)  # past it, not one latent cell would fit in an image
    return int(factor)


def read_vae_factor(vae_dir: str) -> int:
    """The VAE's pixels per latent cell along a side (vae_downsampling_factor), from
    `vae_dir`/config.json, checked: 'block_out_channels' must be a non-empty list, and the factor
    it gives at most limits.MAX_IMAGE_SIDE. CheckpointError naming the file and key otherwise."""
    path = os.path.join(vae_dir, "config.json")
    config = read_json_object(path, "the VAE's config")
    blocks = config.get("block_out_channels")
    if not isinstance(blocks, list) or not blocks:
        shown = "nothing" if "block_out_channels" not in config else _shown(blocks)
        raise CheckpointError(f"{path}: 'block_out_channels' must be a non-empty list (the VAE's down blocks), got {shown}")
    if 2 ** min(len(blocks) - 1, 64) > MAX_IMAGE_SIDE:  # min: a damaged list may be very long
        raise CheckpointError(f"{path}: 'block_out_channels' lists {len(blocks)} down blocks, a latent cell of "
                              f"2 ** {len(blocks) - 1} pixels; invdiff's cap on an image side is {MAX_IMAGE_SIDE}")
    return vae_downsampling_factor(config)


def check_sample_size(value: Any, where: str) -> Tuple[int, int]:
    """A UNet's 'sample_size' (read from `where`, e.g. "/m/unet/config.json: 'sample_size'") as
    (height, width) in latent cells: diffusers takes one integer (square) or a [height, width]
    pair. CheckpointError of one line otherwise."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or not all(_is_positive_int(v) for v in value):
            raise CheckpointError(f"{where} must be a positive integer or a [height, width] pair of them, "
                                  f"got {_shown(value)}")
        return int(value[0]), int(value[1])
    if not _is_positive_int(value):
        raise CheckpointError(f"{where} must be a positive integer, got {_shown(value)}")
    return int(value), int(value)


def read_unet_config(unet_dir: str, need_sample_size: bool = True) -> Dict:
    """The UNet's config.json in `unet_dir` as a dict, checked: a JSON object whose 'sample_size'
    (the native size, in latent cells) is a positive integer or a [height, width] pair, each at
    most limits.MAX_IMAGE_SIDE. need_sample_size=False lets the key be absent (a caller that is
    given the size); a present one is checked all the same. One-line CheckpointError naming the
    file and the key otherwise, before diffusers (or anything else) reads the file."""
    path = os.path.join(unet_dir, "config.json")
    config = read_json_object(path, "the UNet's config")
    if "sample_size" not in config:
        if need_sample_size:
            raise CheckpointError(f"{path}: 'sample_size' is missing (the UNet's native size in latent cells, "
                                  "a positive integer); the model folder is damaged")
        return config
    for side in check_sample_size(config["sample_size"], f"{path}: 'sample_size'"):
        _check_file_side(side, f"{path}: 'sample_size'")
    return config


def _check_file_side(pixels: int, where: str) -> None:
    """check_image_side for a size read from a file, as a CheckpointError (the file is damaged,
    not the user's flag)."""
    try:
        check_image_side(pixels, where)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc


def _run_resolution(path: str, meta: Dict, required: bool) -> Tuple[Optional[int], str]:
    """(the pixel size a run trained at, where it was read) from its invdiff_run.json (`meta`,
    read from `path`): 'resolution', else (older runs) the --resolution asked for,
    data.resolution; None when neither is recorded and `required` is False. Checked: a positive
    integer at most MAX_IMAGE_SIDE."""
    if meta.get("resolution") is not None or required:
        value, where = meta.get("resolution"), f"{path}: 'resolution'"
    else:
        data = meta.get("data")
        if data is not None and not isinstance(data, dict):
            raise CheckpointError(f"{path}: 'data' must be an object (the data the run trained on), got {_shown(data)}")
        value, where = (data or {}).get("resolution"), f"{path}: 'data.resolution'"
        if value is None:
            return None, where
    if not _is_positive_int(value):
        shown = "nothing" if value is None else _shown(value)
        raise CheckpointError(f"{where} must be a positive integer (the pixel size the run trained at), got {shown}")
    _check_file_side(int(value), where)
    return int(value), where


def sampling_size(path: str, height: Optional[int] = None, width: Optional[int] = None) -> Tuple[Optional[int], Optional[int]]:
    """(height, width) in pixels to sample the model folder at `path` at, read from its config
    files alone (nothing is loaded, so a bad size costs nothing): each as given, else the size a
    debias run trained at (its invdiff_run.json), else the model's native size (the UNet's
    sample_size times the VAE's downsampling factor).

    A given size that is no positive integer, not a multiple of that factor, or past
    limits.MAX_IMAGE_SIDE is a ValueError naming --height / --width; a damaged config file (not a
    JSON object, a missing or bad 'sample_size', 'vae_factor' or 'resolution', a size past the
    cap) a CheckpointError naming the file and the key. Both are one line. A path that is no model
    folder is passed through, as given, for load.load_model to name."""
    for name, pixels in (("--height", height), ("--width", width)):
        if pixels is not None:
            check_image_size(pixels, 1, name)  # the factor is checked below, once it is known
    run_meta = os.path.join(path, RUN_META)
    meta = read_json_object(run_meta, "run metadata") if os.path.isfile(run_meta) else None
    try:
        kind = classify(path)
    except NotAModelFolder:
        return height, width
    unet_dir: Optional[str]
    if kind is FolderKind.REFERRING_RUN:
        # The run records its VAE factor and resolution: its base need not be found (or read) yet.
        unet_dir = None
        factor = _check_factor(meta.get("vae_factor"), f"{run_meta}: 'vae_factor'")
    elif kind.latent:
        unet_dir, factor = os.path.join(path, "unet"), read_vae_factor(os.path.join(path, "vae"))
    elif kind is FolderKind.RUN:
        unet_dir, factor = os.path.join(path, "base", "unet"), 1
    else:
        unet_dir, factor = os.path.join(path, "unet"), 1
        if not os.path.isdir(unet_dir):  # invdiff_base.json alone: load.load_model names what is missing
            return height, width
    trained, trained_where = (None, "") if meta is None else _run_resolution(run_meta, meta, required=unet_dir is None)
    needs_default = height is None or width is None
    if unet_dir is not None:
        config = read_unet_config(unet_dir, need_sample_size=needs_default and trained is None)
    if trained is not None:
        if trained % factor:
            raise CheckpointError(f"{trained_where} {trained} is not a multiple of the VAE's downsampling "
                                  f"factor {factor}, as every size a run trains at is; the run folder is damaged")
        default = (trained, trained)
    elif needs_default:
        where = f"{os.path.join(unet_dir, 'config.json')}: 'sample_size'"
        cells = check_sample_size(config["sample_size"], where)
        if factor > 1:
            where += f" x the VAE's downsampling factor {factor}"
        for side in cells:
            _check_file_side(side * factor, where)
        default = (cells[0] * factor, cells[1] * factor)
    else:
        default = (height, width)
    height = default[0] if height is None else height
    width = default[1] if width is None else width
    check_image_size(height, factor, "--height")
    check_image_size(width, factor, "--width")
    return height, width
