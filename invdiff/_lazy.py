"""PEP 562 lazy exports for a package's __init__: a name loads its module on first use, so that
importing the package stays light (invdiff.sampling does not import diffusers' pipelines,
invdiff.serve neither torch nor FastAPI). Torch-free, and imports nothing from invdiff."""
from __future__ import annotations

import importlib
import sys
from typing import Callable, Dict, List, Tuple


def lazy_exports(package: str, exports: Dict[str, str]) -> Tuple[Callable[[str], object], Callable[[], List[str]]]:
    """(__getattr__, __dir__) for `package`, whose name `n` lives in its submodule `exports[n]`."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{exports[name]}", package), name)
        vars(sys.modules[package])[name] = value  # later lookups skip this function
        return value

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
