"""What `invdiff serve` was started with (ServeSettings), the caps on what one request may ask for,
and the sockets it listens on, taken at start-up (listen_sockets).

Plain data, free of torch and FastAPI: the settings travel to the engine process (engine_process.py)
and to Ray Serve replicas (ray_serve.py) as a dict, and the CLI builds them before anything heavy
is imported. The words they share with the rest of invdiff (dtypes, seed range) come from config.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional

from ..config import DEFAULT_GUIDANCE_EVERY, FROZEN_DTYPES

if TYPE_CHECKING:
    import socket

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
# Connections the listening sockets queue while the model loads or the server is busy (uvicorn's
# own default is 2048 too).
LISTEN_BACKLOG = 2048


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
    guidance_every: int = DEFAULT_GUIDANCE_EVERY  # as `invdiff sample --guidance-every`
    drain_seconds: float = 30.0  # SIGTERM: finish in-flight requests for at most this long
    # The engine in a process of its own (engine_process.py), so that HTTP work never holds the
    # GIL its sampling loop needs; False keeps it a thread of the server's process.
    engine_process: bool = True
    # --expose-details: responses name the model by its absolute path (not its folder's name),
    # error details keep the paths under it, and X-Served-By is host:pid (not a random id).
    expose_details: bool = False
    # A request that arrives while the engine restarts waits up to this long for it, instead of a
    # 503 at once (0: the 503 at once). Ray Serve replicas set it (ray_serve.py): Ray's router
    # sends each request to the replica with fewer requests in flight, and a replica that refuses
    # at once never has any, so it drew most requests while its engine restarted (the soak
    # benchmark: 46 to 72 503s per kill while the other replica had room). Held requests count
    # as in flight, and the router moves to the other replica.
    hold_while_restarting_s: float = 0.0

    def __post_init__(self):
        if not (self.hold_while_restarting_s >= 0 and math.isfinite(self.hold_while_restarting_s)):
            raise ValueError(f"hold_while_restarting_s must be a finite number >= 0, got {self.hold_while_restarting_s}")
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


def listen_sockets(host: str, port: int) -> List["socket.socket"]:
    """Listening sockets on every address uvicorn would bind for `host`:`port` (asyncio's
    create_server: each address getaddrinfo gives, SO_REUSEADDR, IPv6 only on IPv6 sockets), for
    `app.serve` to hand to uvicorn. Bound and listening before the model loads: a port in use (the
    same service started twice, a forgotten one), one the user may not bind or a host that does
    not resolve is a ValueError of one line within milliseconds, and from then on the port is this
    server's: no other process can take it during the load (seconds to minutes). Connections made
    meanwhile wait in the backlog and are answered once the server runs."""
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ValueError(f"--host {host!r} cannot be listened on: {exc.strerror}") from None
    sockets: List[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
                # Listening holds the port: a socket that is only bound leaves it to any other
                # that sets SO_REUSEADDR too (Linux), as uvicorn's and most servers' do.
                sock.listen(LISTEN_BACKLOG)
            except OSError as exc:
                hint = "; another server is listening there: stop it or choose another --port" \
                    if exc.errno == errno.EADDRINUSE else ""
                raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint}") from None
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets
