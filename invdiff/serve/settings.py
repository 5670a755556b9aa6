"""What `invdiff serve` was started with (ServeSettings) and the caps on what one request may ask for.

Plain data, free of torch and FastAPI: the settings travel to the engine process (engine_process.py)
and to Ray Serve replicas (ray_serve.py) as a dict, and the CLI builds them before anything heavy
is imported. The words they share with the rest of invdiff (dtypes, seed range) come from config.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ..config import FROZEN_DTYPES

# What one POST /v1/images may ask for (app.py's request model). A seed's range is config.SEED_LIMIT.
MAX_STEPS = 1000
MAX_GUIDANCE_SCALE = 50.0
MAX_STRENGTH = 10.0


@dataclass
class ServeSettings:
    """What `invdiff serve` was started with (plain data: it travels to Ray Serve replicas)."""

    model: str
    base: Optional[str] = None
    device: Optional[str] = None  # None: cuda if available, else cpu
    max_batch: int = 16  # engine slots: images sampled together
    max_queue: int = 64  # images waiting for a slot; beyond it a request gets 429
    max_images_per_request: int = 16
    attention: str = "sdpa"
    frozen_dtype: str = "fp32"
    eta_below_band: Optional[float] = None  # as `invdiff sample --eta-below-band`
    drain_seconds: float = 30.0  # SIGTERM: finish in-flight requests for at most this long
    # The engine in a process of its own (engine_process.py), so that HTTP work never holds the
    # GIL its sampling loop needs; False keeps it a thread of the server's process.
    engine_process: bool = True

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "max_images_per_request"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_images_per_request > self.max_queue:
            raise ValueError(f"max_images_per_request ({self.max_images_per_request}) cannot exceed "
                             f"max_queue ({self.max_queue}): such a request could never be queued")
        if self.frozen_dtype not in FROZEN_DTYPES:
            choices = ", ".join(FROZEN_DTYPES[:-1]) + " or " + FROZEN_DTYPES[-1]
            raise ValueError(f"frozen_dtype must be {choices}, got {self.frozen_dtype!r}")
        if not (self.drain_seconds >= 0 and math.isfinite(self.drain_seconds)):
            raise ValueError(f"drain_seconds must be a finite number >= 0, got {self.drain_seconds}")
