"""Admission: which requests the service takes, and when to come back if it takes none (429).

The one place the overload policy is written. Both worker kinds (worker.py's EngineWorker thread
and engine_process.py's EngineProcess) and the app's early shedding (app.py's ShedWhenFull) ask
the same Admission object:

  - the queue is the images accepted and not yet released (delivered, failed or cancelled), less
    those in an engine slot; a request whose images would take it past --max-queue gets 429;
  - the 429's Retry-After is when the waiting images would be done at the measured step rate;
  - once closed (the server drains) every request gets 503 with Retry-After SHUTDOWN_RETRY_AFTER_S.

Accepted work is never dropped by this policy: it only refuses at the door.
"""
from __future__ import annotations

import math
import threading
from typing import Optional

from .errors import ServiceError

SHUTTING_DOWN = "the server is shutting down; retry on another replica"
# Retry-After of every 503 a draining server answers (a request refused while it drains, one still
# running at the drain deadline): this server will not serve it, another replica behind the same
# address (a load balancer, Ray's proxy) can at once.
SHUTDOWN_RETRY_AFTER_S = 1


def retry_after_seconds(waiting_images: int, steps: int, image_steps_per_s: float) -> int:
    """A 429's Retry-After: when `waiting_images` images of `steps` steps would be done at the
    measured rate (1 image-step/s before any step was measured); between 1 and 300 s."""
    rate = image_steps_per_s or 1.0
    return int(min(300, max(1, math.ceil(waiting_images * steps / rate))))


def queue_full_message(waiting: int, max_queue: int) -> str:
    return f"the queue is full ({waiting} images waiting, --max-queue {max_queue}); retry later"


class Admission:
    """The queue count that 429s are decided on, the step rate Retry-After is computed from, and
    whether the door is still open. Thread-safe: handlers admit while the worker (or an engine
    process's reader thread) releases images and reports slots and step rates."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self._outstanding = 0  # images accepted and not yet delivered, failed or cancelled
        self._occupied = 0  # images in an engine slot now
        self._closed = False
        self.step_rate = 0.0  # image-steps per second, smoothed: for Retry-After

    # ----------------------------------------------------------------- the door
    def admit(self, images: int, steps: int, broken: Optional[ServiceError] = None) -> None:
        """Count `images` images of `steps` steps as accepted, or raise the ServiceError that
        refuses them: 503 once closed, then `broken` (a worker that can no longer sample, as a
        dead engine process), then 429 with Retry-After when they would overflow the queue."""
        with self._lock:
            if self._closed:
                raise ServiceError(503, SHUTTING_DOWN, retry_after=SHUTDOWN_RETRY_AFTER_S)
            if broken is not None:
                raise broken
            waiting = self._outstanding - self._occupied
            if waiting + images > self.max_queue:
                raise ServiceError(429, queue_full_message(waiting, self.max_queue),
                                   retry_after=self.retry_after(waiting + images, steps))
            self._outstanding += images

    def when_full(self) -> Optional[ServiceError]:
        """The 429 for any request while the queue is full already, else None. For shedding a
        request before its body is read (its size and steps unknown: Retry-After assumes 25)."""
        waiting = self.waiting()
        if waiting < self.max_queue:
            return None
        return ServiceError(429, queue_full_message(waiting, self.max_queue), retry_after=self.retry_after(waiting))

    def close(self) -> None:
        """Refuse every request from now on (503): the server drains."""
        with self._lock:
            self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    # ----------------------------------------------------------------- what the worker reports
    def waiting(self) -> int:
        """Images accepted and waiting for an engine slot (the queue depth)."""
        with self._lock:
            return max(0, self._outstanding - self._occupied)

    def release(self, images: int) -> None:
        """`images` accepted images left the worker: delivered, failed or cancelled."""
        with self._lock:
            self._outstanding -= images

    def release_all(self) -> None:
        """Every accepted image is gone (the engine process died with them)."""
        with self._lock:
            self._outstanding = 0
            self._occupied = 0

    def occupy(self, slots: int) -> None:
        """`slots` images are in an engine slot now."""
        with self._lock:
            self._occupied = slots

    def record_step(self, image_steps: int, seconds: float) -> None:
        """One engine step advanced `image_steps` images by a step in `seconds`: smooth the rate."""
        if seconds > 0:
            rate = image_steps / seconds
            self.step_rate = rate if not self.step_rate else 0.8 * self.step_rate + 0.2 * rate

    def retry_after(self, waiting_images: int, steps: int = 25) -> int:
        """Seconds until `waiting_images` images of `steps` steps would be done at the measured
        step rate (Retry-After of a 429); at least 1, at most 300."""
        return retry_after_seconds(waiting_images, steps, self.step_rate)
