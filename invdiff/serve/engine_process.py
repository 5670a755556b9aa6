"""The engine worker in a process of its own (`EngineProcess`), behind the same `Worker` protocol
as worker.py's `EngineWorker` thread.

Why a process: the HTTP side (parsing, validation, 429s, PNG and base64 encoding) runs Python
for every request, and in the worker's process it would hold the GIL that the sampling loop
needs between its torch calls. On the CPU with short requests the in-process worker delivered
about three quarters of the offline engine's images/s under overload, while the same worker
without HTTP kept the offline rate. A spawned process has its own interpreter, so HTTP work costs
the engine nothing while a core is free (benchmarks/RESULTS.md, "invdiff serve under load").

The parent keeps admission control (its `Admission`, admission.py: the queue depth that 429s
are decided on, fed by the child's "released" and slot reports) and the futures the handlers
await; the child owns the model and the device and runs an `EngineWorker`. They talk over one
pipe:

    parent -> child   ("start",) ("submit", job fields) ("cancel", job id) ("stop", seconds)
    child -> parent   ("loaded", info) ("load_failed", exception) ("ready", error or None)
                      ("done", job id, (N, H, W, C) uint8) ("failed", job id, status, message)
                      ("released", images) ("metric", name, method, value) ("stopped",)

The child ignores SIGINT and SIGTERM: the parent drains it with "stop" (a terminal's Ctrl-C or a
supervisor's SIGTERM to the process group must not kill in-flight work), and it exits when the
pipe closes, so it never outlives its parent.
"""
from __future__ import annotations

import dataclasses
import itertools
import multiprocessing
import signal
import threading
from typing import Dict, Optional

from .admission import Admission
from .errors import ServiceError
from .metrics import Metrics
from .settings import ServeSettings
from .worker import EngineWorker, ImageJob

# ImageJob fields that travel to the child (the future and the images do not).
_JOB_FIELDS = ("prompt", "num", "seed", "steps", "guidance_scale", "strength", "scheduler", "job_id")


class EngineProcess:
    """The `Worker` protocol (worker.py) over a spawned process that runs an `EngineWorker`."""

    def __init__(self, settings: ServeSettings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.admission = Admission(settings.max_queue)
        self.ready = threading.Event()
        self.load_error: Optional[BaseException] = None
        self.known_prompts = None
        self.num_train_timesteps = 1000
        self.device = self.attention = None
        self._lock = threading.Lock()  # guards the job table (admitting a job and registering it are one step)
        self._send_lock = threading.Lock()  # one message at a time on the pipe
        self._jobs: Dict[int, ImageJob] = {}
        self._ids = itertools.count()
        self._process = self._conn = self._reader = None

    # ----------------------------------------------------------------- lifetime
    def load(self) -> None:
        """Spawn the child and wait until its model is loaded; its load error is raised here."""
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        self._conn, child_end = ctx.Pipe()
        self._process = ctx.Process(target=_child_main, args=(dataclasses.asdict(self.settings), child_end),
                                    name="invdiff-engine", daemon=True)
        self._process.start()
        child_end.close()
        try:
            message = self._conn.recv()
        except EOFError:
            self._process.join(timeout=10)
            raise RuntimeError(f"the engine process exited while loading the model (exit code {self._process.exitcode})") from None
        if message[0] == "load_failed":
            self._process.join(timeout=10)
            raise message[1]
        info = message[1]
        self.known_prompts = info["known_prompts"]
        self.num_train_timesteps = info["num_train_timesteps"]
        self.device, self.attention = info["device"], info["attention"]

    def start(self) -> None:
        self._reader = threading.Thread(target=self._read, name="invdiff-engine-reader", daemon=True)
        self._reader.start()
        self._send(("start",))

    def stop(self, deadline_seconds: float) -> None:
        """Drain the child (finish in-flight jobs for at most `deadline_seconds`), then end it."""
        self.admission.close()
        try:
            self._send(("stop", deadline_seconds))
        except (OSError, ValueError):  # the child is gone already
            pass
        if self._reader is not None:
            self._reader.join()
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()

    # ----------------------------------------------------------------- handler side
    def queue_depth(self) -> int:
        return self.admission.waiting()

    def submit(self, job: ImageJob) -> ImageJob:
        """Accept `job` or raise the admission's ServiceError (503 while draining, 500 once the
        engine failed, 429 when the queue is full)."""
        with self._lock:
            broken = None if self.load_error is None else ServiceError(500, f"the engine failed: {self.load_error}")
            self.admission.admit(job.num, job.steps, broken=broken)
            job.job_id = next(self._ids)
            self._jobs[job.job_id] = job
        self._send(("submit", {name: getattr(job, name) for name in _JOB_FIELDS}))
        return job

    def retry_after(self, waiting_images: int, steps: int = 25) -> int:
        """As EngineWorker.retry_after, from the step rate the child reports."""
        return self.admission.retry_after(waiting_images, steps)

    def cancel(self, job: ImageJob) -> None:
        """The client went away: the child frees the job's slots (and reports them released)."""
        self._pop(job.job_id)
        try:
            self._send(("cancel", job.job_id))
        except (OSError, ValueError):
            pass

    def _send(self, message) -> None:
        with self._send_lock:
            self._conn.send(message)

    # ----------------------------------------------------------------- the reader thread
    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                self._child_gone()
                return
            kind = message[0]
            if kind == "done":
                job = self._pop(message[1])
                if job is not None and not job.future.done():
                    job.future.set_result(message[2])
            elif kind == "failed":
                job = self._pop(message[1])
                if job is not None and not job.future.done():
                    job.future.set_exception(ServiceError(message[2], message[3]))
            elif kind == "released":
                self.admission.release(message[1])
            elif kind == "metric":
                _, name, method, value = message
                if name == "slots_occupied":
                    self.admission.occupy(int(value))
                elif name == "step_rate":
                    self.admission.step_rate = value
                    continue
                getattr(getattr(self.metrics, name), method)(value)
            elif kind == "ready":
                if message[1] is not None:
                    self.load_error = RuntimeError(message[1])
                self.ready.set()
            elif kind == "stopped":
                return

    def _pop(self, job_id: int) -> Optional[ImageJob]:
        with self._lock:
            return self._jobs.pop(job_id, None)

    def _child_gone(self) -> None:
        # The child died (killed, out of memory, a crash in native code): every job it held fails
        # with a 500 that says so, and readyz reports it, so that a supervisor restarts the replica.
        self._process.join(timeout=5)
        error = f"the engine process exited unexpectedly (exit code {self._process.exitcode})"
        with self._lock:
            jobs, self._jobs = list(self._jobs.values()), {}
            if not self.admission.closed:
                self.load_error = RuntimeError(error)
            self.admission.release_all()
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(ServiceError(500, error))
        self.ready.set()


class _RelayMetric:
    """A metric of the parent's registry, driven from the child (set / inc / observe)."""

    def __init__(self, name: str, send):
        self.name, self._send = name, send

    def set(self, value):
        self._send(("metric", self.name, "set", value))

    def inc(self, value=1):
        self._send(("metric", self.name, "inc", value))

    def observe(self, value):
        self._send(("metric", self.name, "observe", value))


def _child_main(fields: Dict, conn) -> None:
    """The engine process: load, then serve the parent's messages until "stop" or a closed pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    send_lock = threading.Lock()

    def send(message):
        with send_lock:
            conn.send(message)

    # The parent decides admission; the child takes every job it is given.
    settings = ServeSettings(**{**fields, "max_queue": 2**31 - 1})
    names = ("queue_depth", "slots_occupied", "images_per_second", "images", "latency", "queue_wait", "step_seconds")
    metrics = type("RelayMetrics", (), {name: _RelayMetric(name, send) for name in names})()
    worker = EngineWorker(settings, metrics)
    try:
        worker.load()
    except BaseException as exc:  # noqa: BLE001 (the parent raises it: a bad model is one error line)
        try:
            send(("load_failed", exc))
        except Exception:  # an exception that does not pickle
            send(("load_failed", RuntimeError(f"{type(exc).__name__}: {exc}")))
        return
    send(("loaded", {"known_prompts": worker.known_prompts, "num_train_timesteps": worker.num_train_timesteps,
                     "device": str(worker.device), "attention": worker.attention}))
    worker.on_released = lambda images: send(("released", images))
    jobs: Dict[int, ImageJob] = {}

    def finished(job: ImageJob, future) -> None:  # runs on the worker thread
        from ..report import to_uint8

        jobs.pop(job.job_id, None)
        error = future.exception()
        if error is None:
            import torch

            send(("done", job.job_id, to_uint8(torch.stack(future.result())).numpy()))
        elif isinstance(error, ServiceError):
            send(("failed", job.job_id, error.status, str(error)))
        else:
            send(("failed", job.job_id, 500, f"{type(error).__name__}: {error}"))
        send(("metric", "step_rate", "set", worker.admission.step_rate))

    def report_ready():
        worker.ready.wait()
        error = None if worker.load_error is None else f"{type(worker.load_error).__name__}: {worker.load_error}"
        send(("ready", error))

    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            worker.stop(0.0)
            return
        kind = message[0]
        if kind == "start":
            worker.start()
            threading.Thread(target=report_ready, daemon=True).start()
        elif kind == "submit":
            job = ImageJob(**message[1])
            jobs[job.job_id] = job
            job.future.add_done_callback(lambda future, job=job: finished(job, future))
            worker.submit(job)
        elif kind == "cancel":
            job = jobs.pop(message[1], None)
            if job is not None:
                worker.cancel(job)
        elif kind == "stop":
            worker.stop(message[1])
            send(("stopped",))
            return
