"""Atomic writes and checked reads: a crash mid-write never leaves a half file behind."""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from typing import TYPE_CHECKING, Dict, Optional

if TYPE_CHECKING:  # torch only in annotations: the command line reads files with this module before importing torch
    import torch


from .errors import CheckpointError  # noqa: F401 (torch-free home; re-exported)


def path_inside(folder: str, name: str) -> Optional[str]:
    """The real path of `name` taken relative to `folder`, or None when it leads outside the folder:
    through `..`, as an absolute path, or through a symbolic link that points out of it."""
    root = os.path.realpath(folder)
    try:
        path = os.path.realpath(os.path.join(root, name))
    except ValueError:  # an embedded NUL byte names no file at all
        return None
    return path if os.path.commonpath([root, path]) == root else None


def _umask() -> int:
    """The process umask, read from /proc where Linux shows it: elsewhere it can only be read by
    setting it, which for that instant also applies to files other threads create."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)  # strict while held, so a file created meanwhile is private, not open
    os.umask(mask)
    return mask


def apply_umask(path: str) -> None:
    """Give `path`, and everything below it when it is a folder, the mode a plain open() or mkdir()
    would have given: 0666 (0777 for folders and executables) less the umask. safetensors writes
    each file as a private 0600 temporary renamed into place, and without this that mode would
    reach what invdiff saves. Symbolic links are left alone."""
    mask = _umask()

    def reset(p: str) -> None:
        if not os.path.islink(p):
            full = 0o777 if os.path.isdir(p) or os.stat(p).st_mode & 0o111 else 0o666
            os.chmod(p, full & ~mask)

    if os.path.isdir(path) and not os.path.islink(path):
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                reset(os.path.join(root, name))
    reset(path)


def _unique_sibling(directory: str, prefix: str) -> str:
    from .outputs import temporary_name

    return temporary_name(directory, prefix)


@contextmanager
def atomic_path(path: str):
    """Yield a temporary path in the same folder; rename it onto `path` only on success."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # Not tempfile.mkstemp, which creates the file 0600; an exclusive create of a unique name gets
    # the mode a plain open() would. A writer may still replace it with a 0600 file of its own
    # (safetensors does), so the mode is set again before the rename.
    tmp = _unique_sibling(directory, "." + os.path.basename(path) + ".")
    open(tmp, "x").close()
    try:
        yield tmp
        apply_umask(tmp)
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


SAFE_WEIGHTS = (".safetensors", ".safetensors.index.json")  # one file, or the index of a sharded one
PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt")


def require_safetensors(folder: str, what: str) -> None:
    """Refuse a model folder whose weights are not safetensors, before any loader opens it.

    Given only a pickled .bin, diffusers and transformers fall back to torch.load ("Defaulting to
    unsafe serialization"), and unpickling a downloaded file can run code. Call this before each
    from_pretrained of a local folder, and pass use_safetensors=True as well (hub ids included)."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    if any(n.endswith(SAFE_WEIGHTS) for n in names):
        return
    pickled = sorted(n for n in names if n.endswith(PICKLED_WEIGHTS))
    if pickled:
        raise CheckpointError(
            f"{what} weights {os.path.join(folder, pickled[0])} are not safetensors: invdiff does not unpickle weights "
            "(loading a pickle can run code); convert them with save_pretrained(..., safe_serialization=True)"
        )
    raise CheckpointError(f"{what} weights not found: {folder} holds no .safetensors file")


def read_json(path: str, what: str) -> Dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # garbage bytes fail to decode first
        raise CheckpointError(f"{what} at {path} is corrupt: {exc}") from exc


@contextmanager
def staged_directory(final: str, kind: Optional[str] = None):
    """Build a whole output folder next to `final` and swap it in only when complete.

    If `final` already exists its content is replaced only after the new one is fully written,
    so an interrupted run leaves the previous output untouched. kind: the output's kind
    (outputs.KIND_NAMES); when given, the folder gets invdiff's marker listing what was written,
    which is what lets a later `--overwrite` replace it (outputs.check_output_folder). Staging
    folders that a killed process left beside `final` are removed first (outputs.sweep_stale_temporaries).
    """
    from .errors import OutputError
    from .outputs import replaceable, sweep_stale_temporaries, write_marker

    if os.path.islink(final):  # the swap would replace the link and leave its target as it was
        raise CheckpointError(f"{final!r} is a symbolic link; write to the folder it points to instead")
    parent = os.path.dirname(os.path.abspath(final)) or "."
    os.makedirs(parent, exist_ok=True)
    prefix = "." + os.path.basename(os.path.abspath(final)) + ".partial."
    sweep_stale_temporaries(parent, prefix)
    # Not tempfile.mkdtemp, which makes the folder 0700 (and the swapped-in output with it).
    stage = _unique_sibling(parent, prefix)
    os.mkdir(stage)
    try:
        yield stage
        if kind is not None:
            write_marker(stage, kind, os.listdir(stage))
        apply_umask(stage)  # what save_pretrained wrote through safetensors is 0600
        if os.path.isdir(final) and kind is not None and not replaceable(final, kind):
            # Checked before the run too (outputs.check_output_folder); a file put there since
            # is the user's: keep it, and keep the new output beside it rather than lose either.
            kept = f"{os.path.abspath(final)}.new-{os.getpid()}"
            os.replace(stage, kept)
            raise OutputError(f"{final!r} gained files invdiff did not make while this command ran, so it was not "
                              f"replaced; the new output is at {kept!r}")
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
