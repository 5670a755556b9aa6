"""Documented caps on every size a user can ask for, checked before any compute.

A size past these caps would end in a MemoryError or a "can't allocate" traceback after the
model has loaded, or run for days. Each cap is far above any real use; a size under its cap can
still be refused by `check_fits_in_memory` when the machine's memory cannot hold it.
Kept free of torch, so that the command line checks them before importing anything heavy.
"""
from __future__ import annotations

import os

from .config import SEED_LIMIT  # noqa: F401 (the seed range is part of the vocabulary; re-exported)

# Images sampled together (engine slots) or trained on in one step: SD-XL at 1024 px fits ~64 on
# an 80 GB card; 4096 leaves room for small models on large cards.
MAX_BATCH_SIZE = 4096
# A side of an image, in pixels: 4x SD-XL's native 1024 (a 512x512 latent at 8 px a cell).
MAX_IMAGE_SIDE = 4096
# Images per prompt of one `invdiff sample --prompt` (all held in memory until written).
MAX_IMAGES_PER_PROMPT = 100_000
# Images of one `--prompts` job, over all its lines: each is an item held in memory (~250 bytes)
# before sampling starts. Many small lines are fine; one line may ask for at most this many too.
MAX_JOB_IMAGES = 1_000_000
# What one command may plan to hold in memory, as a share of what is free when it starts.
MEMORY_SHARE = 0.8


def available_memory_bytes() -> int:
    """Memory free for this process now: MemAvailable from /proc/meminfo (Linux), else the
    physical memory. A cgroup limit below it (containers) counts when one is set."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return 2**62  # unknown: only the documented caps apply
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit_file) as f:
                text = f.read().strip()
            if text.isdigit():
                available = min(available, int(text))
        except OSError:
            continue
    return available


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"  # unreachable; keeps type checkers quiet


def check_fits_in_memory(nbytes: int, what: str, hint: str = "") -> None:
    """ValueError (one line) when `what` would need more than MEMORY_SHARE of the free memory."""
    budget = int(available_memory_bytes() * MEMORY_SHARE)
    if nbytes > budget:
        raise ValueError(f"{what} would need {format_bytes(nbytes)} of memory, more than the "
                         f"{format_bytes(budget)} this machine has free{'; ' + hint if hint else ''}")


def check_image_side(value: int, what: str) -> None:
    """ValueError naming `what` when an image side is past MAX_IMAGE_SIDE pixels."""
    if value > MAX_IMAGE_SIDE:
        raise ValueError(f"{what} is {value} pixels; invdiff's cap is {MAX_IMAGE_SIDE} (invdiff/limits.py)")
