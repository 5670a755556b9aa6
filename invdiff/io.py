"""Atomic writes and checked reads: a crash mid-write never leaves a half file behind."""
from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from typing import Dict

import torch


class CheckpointError(RuntimeError):
    """A missing, corrupt or mismatched checkpoint or run folder."""


def _unique_sibling(directory: str, prefix: str) -> str:
    return os.path.join(directory, f"{prefix}{os.getpid()}.{uuid.uuid4().hex[:12]}")


@contextmanager
def atomic_path(path: str):
    """Yield a temporary path in the same folder; rename it onto `path` only on success."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # Not tempfile.mkstemp: it creates the file 0600, and that mode would survive the rename.
    # An exclusive create of a unique name gets the same permissions a plain open() would.
    tmp = _unique_sibling(directory, "." + os.path.basename(path) + ".")
    open(tmp, "x").close()
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(path: str, obj: Dict) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")


def atomic_write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def atomic_save_file(tensors: Dict[str, torch.Tensor], path: str, metadata: Dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)


def load_safetensors(path: str, what: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise CheckpointError(f"{what} not found: {path}")
    try:
        return load_file(path)
    except Exception as exc:
        raise CheckpointError(f"{what} at {path} is corrupt: {exc}") from exc


def read_json(path: str, what: str) -> Dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # garbage bytes fail to decode first
        raise CheckpointError(f"{what} at {path} is corrupt: {exc}") from exc


@contextmanager
def staged_directory(final: str):
    """Build a whole output folder next to `final` and swap it in only when complete.

    If `final` already exists its content is replaced only after the new one is fully written,
    so an interrupted run leaves the previous output untouched.
    """
    parent = os.path.dirname(os.path.abspath(final)) or "."
    os.makedirs(parent, exist_ok=True)
    # Not tempfile.mkdtemp, which makes the folder 0700 (and the swapped-in output with it).
    stage = _unique_sibling(parent, "." + os.path.basename(os.path.abspath(final)) + ".partial.")
    os.mkdir(stage)
    try:
        yield stage
        if os.path.isdir(final):
            old = stage + ".old"
            os.replace(final, old)
            os.replace(stage, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, final)
    finally:
        if os.path.isdir(stage):
            shutil.rmtree(stage, ignore_errors=True)
