"""`python -m invdiff.info`: versions, devices and which op backends are live."""
from __future__ import annotations

import platform


def collect() -> dict:
    import torch

    from . import __version__
    from .ops import backend_table

    info = {
        "invdiff": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    import importlib.util

    has_xformers = importlib.util.find_spec("xformers") is not None
    info["attention"] = "sdpa (PyTorch scaled_dot_product_attention, default); xformers " + (
        "installed: --attention xformers selects it" if has_xformers else "not installed (--attention xformers would fail)")
    # Installed versions from package metadata: importing diffusers and friends only to read
    # __version__ would add seconds to this command.
    from importlib.metadata import PackageNotFoundError, version

    for mod in ("diffusers", "accelerate", "triton", "xformers", "torchmetrics"):
        try:
            info[mod] = version(mod)
        except PackageNotFoundError:
            info[mod] = "not installed"
    from ._ext import build_metadata

    build = build_metadata()
    if build:
        info["invdiff._C build"] = ", ".join(f"{k}={v}" for k, v in sorted(build.items()) if v not in (None, ""))
    info["backends"] = backend_table()
    return info


def main() -> None:
    info = collect()
    for k, v in info.items():
        if k != "backends":
            print(f"{k:16s} {v}")
    print("\nop backends (dispatch takes the first that accepts the inputs):")
    for row in info["backends"]:
        print(f"  {row['backend']:12s} available={row['available']:5s} devices={row['devices']:10s} ops={row['ops']}")
        if row.get("note"):
            print(f"  {'':12s} ({row['note']})")


if __name__ == "__main__":
    main()
