"""A run folder's reference to its frozen Stable Diffusion base, in place of a copy (issue 13).

A copied SD base is gigabytes (3.9 GB for SD 1.5) in every run folder, whatever dtype the run
used. So an SD run folder records its base in invdiff_run.json instead, as one of

    "base_reference": {"path": "/models/sd15", "sha256": "...", "files": {"unet/diffusion_pytorch_model.safetensors":
                       {"size": ..., "mtime_ns": ..., "sha256": "..."}, ...}}
    "base_reference": {"hub_id": "org/name", "revision": "<the commit it was loaded at>"}

and every load of the run checks the base against it first: a missing base or one whose content
changed is a CheckpointError, before any weight is read. `invdiff debias --copy-base` still writes
a self-contained folder (the base copied in, no reference). The embedded bases are a few MB and
are always copied.

The content hash covers model_index.json and every file of the five component folders (weights
and configs, the tokenizer's vocabulary included), in sorted order, except pickled weights,
which invdiff never reads, and hidden files (a download tool's bookkeeping).
"""
from __future__ import annotations

import hashlib
import os
import re
from typing import Dict, List, Optional, Tuple

from ..io import PICKLED_WEIGHTS, CheckpointError, read_json
from ..model_folders import RUN_META, SD_COMPONENTS, FolderKind, NotAModelFolder, classify  # RUN_META: re-exported

REFERENCE_KEY = "base_reference"
_CHUNK = 16 << 20  # bytes read per hashing step: large reads, bounded memory
_COMMIT = re.compile(r"[0-9a-f]{40}")


def base_files(folder: str) -> List[str]:
    """The files of an SD folder its content hash covers, as sorted '/'-separated relative paths."""
    names = ["model_index.json"] if os.path.isfile(os.path.join(folder, "model_index.json")) else []
    for part in SD_COMPONENTS:
        for root, dirs, files in os.walk(os.path.join(folder, part)):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            rel = os.path.relpath(root, folder).replace(os.sep, "/")
            names += [f"{rel}/{f}" for f in files if not f.startswith(".") and not f.endswith(PICKLED_WEIGHTS)]
    return sorted(names)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while True:
            n = f.readinto(buf)
            if not n:
                return h.hexdigest()
            h.update(view[:n])


def content_sha256(file_hashes: Dict[str, str]) -> str:
    """One hash of the whole base from its files' hashes: sha256 over "name<NUL>sha256<LF>" lines in name order."""
    h = hashlib.sha256()
    for name in sorted(file_hashes):
        h.update(f"{name}\0{file_hashes[name]}\n".encode())
    return h.hexdigest()


def _stamp(path: str) -> Dict[str, int]:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def describe_local_base(folder: str) -> Dict:
    """The reference to a local SD folder: its absolute path, its content hash, and each file's
    hash with its (size, mtime_ns) stamp. Reads every covered file once (see check_local_base for the cost)."""
    files = {}
    for name in base_files(folder):
        path = os.path.join(folder, name)
        files[name] = dict(_stamp(path), sha256=file_sha256(path))
    return {"path": os.path.abspath(folder), "sha256": content_sha256({k: v["sha256"] for k, v in files.items()}),
            "files": files}


def describe_hub_base(hub_id: str) -> Optional[Dict]:
    """The reference to a hub id: the commit its files were loaded at, read from the local hub
    cache (a commit names the repository's content, as a content hash does), or None when the
    cache does not show it."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(hub_id, "model_index.json")
    if not isinstance(cached, str):  # None, or the marker of a file known not to exist
        return None
    revision = os.path.basename(os.path.dirname(cached))  # .../snapshots/<commit>/model_index.json
    return {"hub_id": hub_id, "revision": revision} if _COMMIT.fullmatch(revision) else None


def describe_base(source: str) -> Optional[Dict]:
    """The reference a run records to the SD base it loaded from `source` (a local folder, else
    a hub id): describe_local_base or describe_hub_base; None when the hub cache does not show
    which commit was loaded."""
    return describe_local_base(source) if os.path.isdir(source) else describe_hub_base(source)


from ..model_folders import refers_to_base  # noqa: E402,F401 (torch-free home, for the CLI; re-exported)


def read_base_reference(run_dir: str) -> Dict:
    """The base reference a run folder records (see refers_to_base), checked for shape."""
    meta = read_json(os.path.join(run_dir, RUN_META), "run metadata")
    reference = meta.get(REFERENCE_KEY) if isinstance(meta, dict) else None
    if not isinstance(reference, dict) or not (
            _is_local(reference) or isinstance(reference.get("hub_id"), str) and isinstance(reference.get("revision"), str)):
        raise CheckpointError(f"run folder {run_dir!r} holds no base model and its {RUN_META} names none "
                              f"(no valid {REFERENCE_KEY!r}); the run folder is damaged")
    return reference


def _is_local(reference: Dict) -> bool:
    return isinstance(reference.get("path"), str) and isinstance(reference.get("sha256"), str)


def _names(names: List[str], most: int = 3) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def check_local_base(folder: str, reference: Dict, run_dir: str) -> None:
    """Refuse a base folder whose content differs from the one the run recorded.

    A file whose size and modification time (to the nanosecond) are those recorded is taken as
    unchanged without being read, as make and rsync's quick check do. Hashing is too slow for
    every load: measured 0.34 GiB/s from the page cache on a busy 2-core CPU (sha256 alone
    ~1 GiB/s), about 12 s for SD 1.5's 3.9 GB before each `invdiff sample`. A rewrite that keeps
    both size and time is a deliberate act. Any other file (a touched or copied base) is hashed
    again, so a base copied elsewhere with new file times still passes, at the cost of reading
    it on each load; a base moved with `mv` keeps its times."""
    recorded = reference.get("files") if isinstance(reference.get("files"), dict) else {}
    hashes, changed = {}, []
    for name in base_files(folder):
        old = recorded.get(name) if isinstance(recorded.get(name), dict) else {}
        path = os.path.join(folder, name)
        same_stamp = all(old.get(k) == v for k, v in _stamp(path).items())
        hashes[name] = old.get("sha256") if same_stamp and isinstance(old.get("sha256"), str) else file_sha256(path)
        if hashes[name] != old.get("sha256"):
            changed.append(f"{name} {'differs' if old else 'is new'}")
    changed += [f"{name} is missing" for name in sorted(set(recorded) - set(hashes))]
    if content_sha256(hashes) != reference["sha256"]:
        raise CheckpointError(
            f"the base model {folder!r} has changed since run {run_dir!r} was made ({_names(changed) or 'content hash differs'}); "
            "G_psi was trained on the base as it was: restore it, point the run at an unchanged copy "
            "(invdiff sample --base DIR, or base=DIR in Python), or make the run again")


def cached_hub_base(hub_id: str, revision: str, run_dir: str) -> str:
    """The snapshot folder of `hub_id` at commit `revision` in the local hub cache, for a run
    folder that refers to a hub base. Never downloads, whatever downloads are allowed: the run
    folder chose that id, not the user. Not in the cache (or only some of its parts): a one-line
    CheckpointError that says how to proceed."""
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(hub_id, "model_index.json", revision=revision)
    except ValueError as exc:  # an id or revision the hub library refuses (HFValidationError)
        raise CheckpointError(f"run folder {run_dir!r} names the hub base {hub_id!r} at {revision!r} in its {RUN_META}, "
                              f"which is no valid hub id and revision ({exc}); the run folder is damaged") from exc
    snapshot = os.path.dirname(cached) if isinstance(cached, str) else None
    if snapshot is None or not all(os.path.isdir(os.path.join(snapshot, part)) for part in SD_COMPONENTS):
        raise CheckpointError(
            f"run {run_dir!r} refers to its base as the hub model {hub_id!r} at commit {revision}, which is not "
            f"{'all ' if snapshot else ''}in the local hub cache ({constants.HF_HUB_CACHE}), and invdiff does not "
            "download a model a run folder names: download it yourself "
            f"(hf download {hub_id} --revision {revision}), or point HF_HUB_CACHE at a cache that holds it")
    return snapshot


def resolve_base(run_dir: str, base: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """(the local folder to load the base of `run_dir` from, None), after checking it against the
    run's reference. `base`: the base at a new place (a local folder), checked the same way. A
    base the run names by hub id loads from its snapshot in the local hub cache, never from the
    network (see cached_hub_base). A missing base or a changed one is a CheckpointError. The
    second item, once a hub revision to load, is always None now: kept for the callers."""
    reference = read_base_reference(run_dir)
    if not _is_local(reference):
        if base is not None:
            raise ValueError(f"run {run_dir!r} refers to the hub id {reference['hub_id']!r} at commit "
                             f"{reference['revision']}, not to a folder: it loads from the hub cache, and base= does not apply")
        return cached_hub_base(reference["hub_id"], reference["revision"], run_dir), None
    folder = reference["path"] if base is None else base
    if not os.path.isdir(folder):
        given = "given as its base" if base is not None else "which it refers to as its base"
        raise CheckpointError(
            f"the base model {folder!r}, {given}, does not exist (run {run_dir!r} does not hold a copy of it): pass "
            "the base's new place (invdiff sample --base DIR, or base=DIR in Python), or make the run again with "
            "invdiff debias --copy-base for a self-contained run folder")
    check_local_base(folder, reference, run_dir)
    return folder, None


def base_source(path: str, base: Optional[str] = None, revision: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """(where to load the frozen Stable Diffusion parts of `path` from, the hub revision to load
    them at): for a run folder that refers to its base, that base, checked (resolve_base; `base`:
    its new place); for anything else `path` and `revision` as given. A `base` given for anything
    but such a run is a ValueError: it would be silently ignored.

    The one place a run folder's reference is followed: LatentDiffusionBase.from_pretrained,
    InvDiffPipeline.from_pretrained and model_folders.load all call it."""
    try:
        referring = classify(path) is FolderKind.REFERRING_RUN
    except NotAModelFolder:  # a hub id, or a folder its loader names
        referring = False
    if referring:
        return resolve_base(path, base)
    if base is not None:
        raise ValueError(f"{path!r} is no run folder that refers to its base model: a base to load it with "
                         "(base=, invdiff sample --base) applies only to those")
    return path, revision
