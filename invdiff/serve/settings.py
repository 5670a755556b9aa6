"""What `invdiff serve` was started with (ServeSettings), the caps on what one request may ask for,
and the start-up check of the address it listens on (check_listen_address).

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
# The largest request body the service reads (app.py's BoundedBody; larger ones get 413 before
# they are read or parsed). A sampling request is a few hundred bytes; the longest valid one, a
# 2000-character prompt of astral characters written as 12-byte \uXXXX\uXXXX escapes, is about
# 24,000 bytes. 64 KiB leaves room for that, and a body past it costs the server at most 64 KiB
# of memory and no parsing: before this cap a 400 MB body was read and parsed whole (11 s,
# +1.2 GB of memory) only to get a 422.
MAX_BODY_BYTES = 64 * 1024


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
    # --expose-details: responses name the model by its absolute path (not its folder's name),
    # error details keep the paths under it, and X-Served-By is host:pid (not a random id).
    expose_details: bool = False

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


def check_listen_address(host: str, port: int) -> None:
    """ValueError of one line when `host`:`port` cannot be listened on now (a port in use, one the
    user may not bind, a host that does not resolve), found by binding every address uvicorn will
    bind (asyncio's create_server: each address getaddrinfo gives, SO_REUSEADDR, IPv6 only on
    IPv6 sockets) and releasing it at once.

    Racy by nature: another process can take the port between this check and uvicorn's bind after
    the model has loaded (seconds later; then uvicorn fails as before, one logged line and exit
    status 3). Still worth it: a port in use is nearly always a server that was already running
    before this one started (the same service started twice, a forgotten one), which this finds in
    milliseconds instead of after a model load of tens of seconds."""
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ValueError(f"--host {host!r} cannot be listened on: {exc.strerror}") from None
    for family, kind, proto, _, address in dict.fromkeys(infos):
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free to uvicorn too
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                hint = "; another server is listening there: stop it or choose another --port" \
                    if exc.errno == errno.EADDRINUSE else ""
                raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint}") from None
