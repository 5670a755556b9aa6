"""Whether invdiff may download from the Hugging Face hub: only when the user asked for it.

invdiff works offline by default. A hub id is downloaded only when the user names it on the
command line and allows downloads explicitly: `--allow-download`, or the hub's own switch
HF_HUB_OFFLINE set to a false value ("0", "false", "no", "off"). Whoever hands over a run folder
does not choose what is downloaded (models/base_reference.py loads a hub base the folder names
from the local hub cache only), and a mistyped local path is "does not exist", at once, not a
hub id tried with a minute of network retries.

Torch-free and quick to import: the command line checks its paths with this before it imports
anything heavy. huggingface_hub is not imported here either; it reads HF_HUB_OFFLINE when it is
first imported, which is why `set_downloads_allowed` must come first.
"""
from __future__ import annotations

import os
import sys
from typing import Dict, Optional

from .errors import OfflineError

# The switches the hub libraries read (huggingface_hub, transformers, datasets).
OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
_FALSE_VALUES = ("0", "false", "no", "off")

_allowed_by_flag = False
# What set_downloads_allowed(False) replaced, so that a later set_downloads_allowed(True) in the
# same process (tests call the command line many times) puts the user's own settings back.
_replaced_env: Dict[str, Optional[str]] = {}


def _env_allows_downloads() -> bool:
    """The user set HF_HUB_OFFLINE to a false value: an explicit yes to the hub."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _FALSE_VALUES


def downloads_allowed() -> bool:
    """Whether a hub id may be downloaded now: `set_downloads_allowed(True)` was called (the
    command line's --allow-download), or HF_HUB_OFFLINE is explicitly false. False otherwise, for
    library use too."""
    return _allowed_by_flag or _env_allows_downloads()


def set_downloads_allowed(allowed: bool) -> None:
    """Allow downloads from the hub (--allow-download) or forbid them, for this process.

    Forbidding sets HF_HUB_OFFLINE=1 (and TRANSFORMERS_OFFLINE=1, HF_DATASETS_OFFLINE=1), so that
    no library under invdiff reaches the network either, unless the user set HF_HUB_OFFLINE to a
    false value, which counts as allowing. Call it before huggingface_hub is imported: the hub
    reads the variable once, at import; if it is imported already, its constant is set as well.
    Allowing puts back what an earlier call replaced."""
    global _allowed_by_flag
    _allowed_by_flag = bool(allowed)
    constants = sys.modules.get("huggingface_hub.constants")
    if downloads_allowed():
        for name, value in _replaced_env.items():
            if os.environ.get(name) != "1":
                continue  # changed since (the user's own setting): leave it
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if constants is not None and "HF_HUB_OFFLINE" in _replaced_env:
            constants.HF_HUB_OFFLINE = _is_true(os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE"))
        _replaced_env.clear()
        return
    for name in OFFLINE_SWITCHES:
        _replaced_env.setdefault(name, os.environ.get(name))
        os.environ[name] = "1"
    if constants is not None and hasattr(constants, "HF_HUB_OFFLINE"):
        constants.HF_HUB_OFFLINE = True


def _is_true(value: Optional[str]) -> bool:
    # how huggingface_hub.constants reads a switch
    return value is not None and value.upper() in ("1", "ON", "YES", "TRUE")


def looks_like_hub_id(path: str) -> bool:
    """`path` reads as a hub id (org/name): no such path exists, it has exactly one '/', and it
    does not start with '.' or '/'. Says nothing about whether it may be downloaded."""
    return not os.path.exists(path) and path.count("/") == 1 and not path.startswith((".", "/"))


def does_not_exist_message(path: str, what: str) -> str:
    """One line: `what` `path` does not exist, with how to download it when it reads as a hub id
    and downloads are not allowed."""
    message = f"{what} {path!r} does not exist"
    if looks_like_hub_id(path) and not downloads_allowed():
        message += (f"; invdiff is offline by default: to download the hub model {path!r}, pass it to "
                    "`invdiff debias --base` with --allow-download, or fetch it yourself (hf download) and pass its folder")
    return message


def check_model_source(path: str, flag: str) -> None:
    """Refuse, at once and without the network, a model path given as `flag` that cannot be
    loaded: an existing path passes, a hub id passes only while downloads are allowed. Anything
    else is a one-line FileNotFoundError (OfflineError for a hub id) saying it does not exist."""
    if os.path.exists(path) or looks_like_hub_id(path) and downloads_allowed():
        return
    error = OfflineError if looks_like_hub_id(path) else FileNotFoundError
    raise error(does_not_exist_message(path, flag))
