"""Output folders: what invdiff may write to, replace and remove, and who writes at a time.

A user's files are never deleted or overwritten by a command that did not make them:

- every folder invdiff writes holds a marker file, MARKER, naming the kind of output and the
  top-level entries invdiff put there. `--overwrite` replaces only a folder whose marker names
  the same kind and that holds nothing the marker does not list; any other non-empty folder is
  refused, with or without `--overwrite`;
- `/`, the home folder, the working folder and every folder above it are refused outright, and
  so is an `--out` that is a symbolic link (a swap would replace the link, not its target) or
  empty;
- one writer at a time: `output_lock` takes an advisory lock (flock) on a file beside the output,
  so that a second command writing there gets one line instead of silently replacing the first
  one's result. The kernel drops the lock when its process dies, so a stale lock never blocks;
- temporaries (staging folders, the frozen-prediction bank) carry the host and process id in
  their names, so that a later run can prove that one a killed process left behind is invdiff's
  and remove it (`sweep_stale_temporaries`).

Kept free of torch: the command line runs these checks before it imports anything heavy.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import uuid
from contextlib import contextmanager
from typing import Iterable, Iterator, List, Optional

from .errors import OutputError

MARKER = ".invdiff-output.json"
KIND_NAMES = {"base": "a base model", "run": "a debias run", "samples": "samples (invdiff sample --prompt)",
              "sample-job": "a sampling job (invdiff sample --prompts)", "demo": "a demo report",
              "inspect": "an inspect report (invdiff inspect)"}


# ----------------------------------------------------------------------------- markers


def read_marker(folder: str) -> Optional[dict]:
    """The marker of a folder invdiff made ({"kind", "entries"}), or None when it has none or
    a damaged one (a damaged marker proves nothing, so the folder counts as not invdiff's)."""
    path = os.path.join(folder, MARKER)
    if os.path.islink(path) or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    if (not isinstance(marker, dict) or marker.get("kind") not in KIND_NAMES
            or not isinstance(marker.get("entries"), list) or not all(map(_plain_name, marker["entries"]))):
        return None
    return marker


def _plain_name(entry) -> bool:
    """A marker is a file anybody can write, and a job replaced with --overwrite removes what its
    marker lists: an entry must name something directly inside the folder (no '/', '..', NUL)."""
    return (isinstance(entry, str) and entry not in ("", ".", "..") and "/" not in entry and "\\" not in entry
            and "\0" not in entry)


def write_marker(folder: str, kind: str, entries: Iterable[str]) -> None:
    """Record that invdiff made `folder` as `kind`, with these top-level entries (the marker
    itself excluded). Written atomically, so a marker is always whole or absent."""
    if kind not in KIND_NAMES:
        raise ValueError(f"unknown output kind {kind!r}")
    body = json.dumps({"made_by": "invdiff", "kind": kind, "entries": sorted(set(entries) - {MARKER})}, indent=2)
    tmp = os.path.join(folder, f"{MARKER}.{_temp_tag()}")
    with open(tmp, "x", encoding="utf-8") as f:
        f.write(body + "\n")
    os.replace(tmp, os.path.join(folder, MARKER))


def foreign_entries(folder: str, marker: Optional[dict]) -> List[str]:
    """Top-level entries of `folder` that its marker does not list (all of them without one)."""
    listed = set(marker["entries"]) | {MARKER} if marker else set()
    return sorted(name for name in os.listdir(folder) if name not in listed)


def replaceable(folder: str, kind: str) -> bool:
    """`folder` may be replaced by a new output of `kind`: it is empty, or invdiff made it as
    that kind and it holds nothing its marker does not list."""
    if not os.listdir(folder):
        return True
    marker = read_marker(folder)
    return marker is not None and marker["kind"] == kind and not foreign_entries(folder, marker)


# ----------------------------------------------------------------------------- checks before compute


def protected_folders() -> List[str]:
    """Real paths no command may write into as a whole: /, the home folder, the working folder
    and every folder above it (replacing one of them would take the user's files with it)."""
    cwd = os.path.realpath(os.getcwd())
    folders = {os.path.realpath(os.path.expanduser("~")), os.path.sep}
    while True:
        folders.add(cwd)
        parent = os.path.dirname(cwd)
        if parent == cwd:
            return sorted(folders)
        cwd = parent


def check_output_folder(path: str, kind: str, overwrite: bool = False, flag: str = "--out") -> None:
    """Refuse, before any compute, an output folder this command may not write: one line.

    Allowed: a path that does not exist yet (its nearest existing parent must be a writable
    folder), an empty folder, or a folder that invdiff made as this `kind` and that holds only
    what its marker lists. Whether such a folder may then be replaced (same settings, or
    `--overwrite`) is the command's decision; this only guarantees it is invdiff's own.
    """
    if path == "":
        raise OutputError(f"{flag} is empty: name the folder to write")
    if "\0" in path:
        raise OutputError(f"{flag} {path!r} holds a NUL byte")
    if os.path.islink(path):
        raise OutputError(f"{flag} {path!r} is a symbolic link: invdiff replaces its output folder whole, which "
                          f"would replace the link; pass the folder it points to ({os.path.realpath(path)!r}) instead")
    real = os.path.realpath(path)
    if real in protected_folders():
        raise OutputError(f"{flag} {path!r} is {_protected_name(real)}: invdiff writes only into a folder of its own "
                          "below it; choose a new folder such as ./invdiff_out")
    check_writable(path, flag, folder=True)
    if not os.path.isdir(real) or not os.listdir(real):
        return
    marker = read_marker(real)
    # Said where the command has the flag, so that nobody tries it in hope.
    forced = ", --overwrite included" if kind != "demo" else ""
    if marker is None:
        raise OutputError(f"{flag} {path!r} is not empty and was not made by invdiff (it has no {MARKER}); invdiff "
                          f"never replaces it{forced}: choose another {flag}")
    if marker["kind"] != kind:
        raise OutputError(f"{flag} {path!r} holds {KIND_NAMES[marker['kind']]}, not {KIND_NAMES[kind]}; invdiff does "
                          f"not replace one kind of output with another{forced}: choose another {flag}")
    foreign = foreign_entries(real, marker)
    if foreign:
        shown = ", ".join(repr(n) for n in foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OutputError(f"{flag} {path!r} holds files invdiff did not make ({shown}); invdiff never replaces them"
                          f"{forced}: move them away or choose another {flag}")


def check_output_file(path: str, made_by: str, flag: str = "--out") -> None:
    """Refuse, before any compute, a JSON output file that exists and was not written by invdiff
    (`made_by`, the "made_by" field invdiff writes into it); its folder must be writable."""
    if path == "":
        raise OutputError(f"{flag} is empty: name the file to write")
    check_writable(path, flag, folder=False)
    if os.path.lexists(path):
        try:
            with open(path, encoding="utf-8") as f:
                ours = json.load(f).get("made_by") == made_by
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours or os.path.islink(path):
            raise OutputError(f"{flag} {path!r} exists and was not written by {made_by}; invdiff does not overwrite "
                              f"it: choose another {flag}")


def check_writable(path: str, flag: str, folder: bool) -> None:
    """Refuse an output path that cannot be written, before any compute is spent.

    Outputs are built beside their final place and renamed onto it (io.staged_directory,
    io.atomic_path), so the nearest existing parent folder must be writable. A folder output may
    not be an existing file, and a file output may not be an existing folder.
    """
    target = os.path.realpath(path)
    if os.path.exists(target) and os.path.isdir(target) != folder:
        kind, other = ("file", "folder") if os.path.isdir(target) else ("folder", "file")
        raise OutputError(f"{flag} {path!r} is an existing {other}, not a {kind}")
    parent = os.path.dirname(target)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OutputError(f"{flag} {path!r} lies under {parent!r}, which is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {path!r}: cannot write in {parent!r} (permission denied)")


def _protected_name(real: str) -> str:
    if real == os.path.sep:
        return "the root folder"
    if real == os.path.realpath(os.path.expanduser("~")):
        return "your home folder"
    if real == os.path.realpath(os.getcwd()):
        return "the working folder"
    return "a folder above the working folder"


# ----------------------------------------------------------------------------- one writer at a time


def lock_path(path: str) -> str:
    """The lock file of output `path`: beside it, since the output itself is swapped whole."""
    real = os.path.realpath(path)
    return os.path.join(os.path.dirname(real), f".{os.path.basename(real)}.invdiff-lock")


@contextmanager
def output_lock(path: str, flag: str = "--out") -> Iterator[None]:
    """Hold an exclusive advisory lock on output `path` while the block runs.

    A second invdiff process that asks for the same output gets an OutputError naming the
    holder's pid at once. The kernel releases a flock when its process dies (SIGKILL included),
    so a lock file a dead process left behind does not block: it is taken over. Under DDP only
    the main process (RANK 0) locks; the other ranks write under its lock.
    """
    if int(os.environ.get("RANK", "0") or 0) != 0:
        yield
        return
    import fcntl

    lock_file = lock_path(path)
    os.makedirs(os.path.dirname(lock_file), exist_ok=True)
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise OutputError(f"{flag} {path!r} is being written by another invdiff process{holder}; wait for it "
                                  f"to finish or choose another {flag}") from None
            raise
        # The holder before us may have removed the file between our open and our lock: then we
        # hold a lock on a file nobody else can see, so open the path afresh.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock_file))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        yield
    finally:
        try:
            os.remove(lock_file)  # removed while still held, so no waiter can take a removed file
        except OSError:
            pass
        os.close(fd)


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").split()
    except OSError:
        return ""
    return f" (pid {text[0]} on {text[1]})" if len(text) >= 2 else ""


# ----------------------------------------------------------------------------- temporaries


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def owned_prefix(prefix: str) -> str:
    """prefix + host.pid. : what a temporary's name starts with, so that a later process can
    tell whether its maker is still alive (sweep_stale_temporaries); a random part follows."""
    return f"{prefix}{_host()}.{os.getpid()}."


def _temp_tag() -> str:
    return owned_prefix("") + uuid.uuid4().hex[:12]


def temporary_name(parent: str, prefix: str) -> str:
    """A new temporary path in `parent`: prefix + host.pid.random (see sweep_stale_temporaries)."""
    return os.path.join(parent, prefix + _temp_tag())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def sweep_stale_temporaries(parent: str, prefix: str) -> List[str]:
    """Remove the temporaries named prefix + host.pid.random (+ ".old") in `parent` whose
    process, on this host, is dead: a SIGKILL (or a power cut) left them. Returns what was
    removed. Another host's temporaries, a live process's, and anything not named so are kept:
    only what provably is a dead invdiff process's temporary goes."""
    # The random part: 12 hex digits (temporary_name) or tempfile's 8 characters.
    pattern = re.compile(re.escape(prefix) + re.escape(_host()) + r"\.(\d+)\.[0-9A-Za-z_]{6,32}(\.old)?")
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        match = pattern.fullmatch(name)
        if not match or _pid_alive(int(match.group(1))):
            continue
        path = os.path.join(parent, name)
        if os.path.islink(path) or not os.path.isdir(path):
            try:
                os.remove(path)
            except OSError:
                continue
        else:
            shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed
