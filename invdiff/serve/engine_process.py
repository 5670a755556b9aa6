"""The engine worker in a process of its own (`EngineProcess`), behind the same `Worker` protocol
as worker.py's `EngineWorker` thread, restarted when it dies.

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
                      ("done", job id, (N, H, W, C) uint8) ("failed", job id, status, message, retry after)
                      ("released", images) ("metric", name, method, value) ("stopped",)

The child ignores SIGINT and SIGTERM: the parent drains it with "stop" (a terminal's Ctrl-C or a
supervisor's SIGTERM to the process group must not kill in-flight work), and it exits when the
pipe closes, so it never outlives its parent.

When the child dies (killed, out of memory, a crash in native code), the parent heals it:

    loading --ready--> ready --child exits--> restarting --wait backoff, spawn, load, warm up--> ready
                                               |    ^  (a start that fails: back to restarting)
                                               |    |
                                               +----+--MAX_FAILED_RESTARTS failures in a row--> failed
    (any state) --stop()--> stopping

  - the jobs the dead child held fail with a 503 and Retry-After (the client may retry: nothing
    of its request was delivered), its slots and queue are released (Admission, the gauges);
  - while restarting, new requests get a 503 with Retry-After (the backoff left plus the last
    measured start), /readyz is 503 and /healthz stays 200 (the replica is recovering);
  - a failure is an engine that never became ready (its model did not load, its warm-up failed,
    it exited or hung for START_TIMEOUT_S before ready) or a restarted engine that died within
    STABLE_AFTER_S of becoming ready; an engine that served longer starts the count afresh.
    After MAX_FAILED_RESTARTS failures in a row the parent gives up ("failed"): /healthz turns
    503 (a supervisor restarts the process, Ray Serve replaces the replica: ray_serve.py) and
    every request gets a 503.

The first engine is not restarted: a model that does not load fails the start, and a first
warm-up that fails leaves the engine "ready" with its load_error, which /healthz answers with a
503 and every request with a 503 naming it (app.engine_problem), for the supervisor to act.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import multiprocessing
import multiprocessing.util
import os
import signal
import sys
import threading
import time
from typing import Dict, Optional

from .admission import SHUTDOWN_RETRY_AFTER_S, Admission
from .errors import ServiceError
from .metrics import Metrics
from .settings import ServeSettings
from .worker import EngineWorker, ImageJob

log = logging.getLogger("invdiff.serve")

# ImageJob fields that travel to the child (the future and the images do not).
_JOB_FIELDS = ("prompt", "num", "seed", "steps", "guidance_scale", "strength", "scheduler", "job_id")

# Healing a dead engine (the module docstring's state machine; docs/serving.md, "When the engine
# dies"). The wait before a restart is min(RESTART_BACKOFF_CAP_S, RESTART_BACKOFF_S * 2**k), k the
# failures in a row so far: 0.5, 1, 2, 4, 8 s, then the parent gives up.
#   RESTART_BACKOFF_S: short next to a start itself (about 5 s on the CPU, mostly importing torch),
#     and time for the OS and a GPU driver to reclaim the dead process's memory.
#   RESTART_BACKOFF_CAP_S: a cause that persists (a full GPU, a broken disk) is not hammered, and
#     one that clears is healed within seconds.
#   MAX_FAILED_RESTARTS: failures in a row before the parent gives up and /healthz turns 503, so
#     that a supervisor acts: 15.5 s of backoff plus 5 starts (about a minute on the CPU).
#   STABLE_AFTER_S: a restarted engine that served this long before it died did not fail: the count
#     starts afresh (one that dies sooner is a crash loop, counted). 30 s: a cause that kills each
#     new engine at once (a request that crashes it as soon as it is retried, a device that faults)
#     kills it within seconds of ready; at 60 s, independent deaths a minute apart (the soak
#     benchmark's kill every 60 s, with a start of 5-20 s out of each minute) were counted as a
#     crash loop, backed off ever longer, and would have given up at the sixth.
#   START_TIMEOUT_S: a restart not ready by then failed: a hung load must not count as recovering
#     forever (a Stable Diffusion folder on a slow disk takes minutes).
#   ASSUMED_START_S: Retry-After's guess at a start before one was measured.
RESTART_BACKOFF_S = 0.5
RESTART_BACKOFF_CAP_S = 8.0
MAX_FAILED_RESTARTS = 5
STABLE_AFTER_S = 30.0
START_TIMEOUT_S = 600.0
ASSUMED_START_S = 10.0

LOADING, READY, RESTARTING, FAILED, STOPPING = "loading", "ready", "restarting", "failed", "stopping"


class _Stopped(Exception):
    """The server stopped while an engine was starting."""


class _Child:
    """One engine process: its pipe, its reader thread, and when it started and became ready."""

    def __init__(self, process, conn, info: Dict, started: float, generation: int):
        self.process, self.conn, self.info = process, conn, info
        self.started, self.generation = started, generation
        self.ready_at: Optional[float] = None
        self.failure: Optional[str] = None  # why it failed before ready (warm-up error, start timeout)
        self.settled = threading.Event()  # ready, or gone
        self.reader: Optional[threading.Thread] = None


class EngineProcess:
    """The `Worker` protocol (worker.py) over a spawned process that runs an `EngineWorker`,
    restarted with backoff when it dies (the module docstring)."""

    def __init__(self, settings: ServeSettings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.admission = Admission(settings.max_queue)
        self.ready = threading.Event()
        self.load_error: Optional[BaseException] = None
        self.known_prompts = None
        self.num_train_timesteps = 1000
        self.device = self.attention = None
        self.restarts = 0  # engines started after the first (invdiff_engine_restarts_total)
        # Guards the job table, the state and the current child: admitting a job, registering it
        # and sending it to the child are one step, so a child's death fails every job it was sent.
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()  # one message at a time on the pipe
        self._jobs: Dict[int, ImageJob] = {}
        self._ids = itertools.count()
        self._child: Optional[_Child] = None
        self._state = LOADING
        self._failures = 0  # failed engines in a row (the module docstring)
        self._last_failure = ""  # why the last engine died or failed to start
        self._next_attempt_at = 0.0  # (time.monotonic) when the restart thread starts the next engine
        self._start_seconds: Optional[float] = None  # spawn to ready, last measured
        self._stopping = threading.Event()

    # ----------------------------------------------------------------- lifetime
    def load(self) -> None:
        """Spawn the child and wait until its model is loaded; its load error is raised here (the
        first start is not retried: a bad model folder fails the start)."""
        child = self._spawn(generation=0, timeout=None)
        info = child.info
        self.known_prompts = info["known_prompts"]
        self.num_train_timesteps = info["num_train_timesteps"]
        self.device, self.attention = info["device"], info["attention"]
        self._child = child

    def start(self) -> None:
        self._run_child(self._child)

    def stop(self, deadline_seconds: float) -> None:
        """Drain the child (finish in-flight jobs for at most `deadline_seconds`), then end it;
        a restart in progress is abandoned."""
        self.admission.close()
        self._stopping.set()
        with self._lock:
            self._state = STOPPING
            child = self._child
        if child is None:
            return
        try:
            self._send(child, ("stop", deadline_seconds))
        except (OSError, ValueError):  # the child is gone already
            pass
        if child.reader is not None:
            child.reader.join()
        child.process.join(timeout=30)
        if child.process.is_alive():
            child.process.kill()

    def _spawn(self, generation: int, timeout: Optional[float]) -> _Child:
        """Start an engine process and wait until its model is loaded (its "loaded" message);
        raise its load error, or _Stopped when the server stops meanwhile."""
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        conn, child_end = ctx.Pipe()
        process = ctx.Process(target=_child_main, args=(dataclasses.asdict(self.settings), child_end),
                              name="invdiff-engine", daemon=True)
        started = time.monotonic()
        process.start()
        child_end.close()
        try:
            while not conn.poll(0.25):  # True on a message or on EOF
                if generation > 0 and self._stopping.is_set():
                    raise _Stopped()
                if timeout is not None and time.monotonic() - started > timeout:
                    raise RuntimeError(f"the engine process did not load the model within {timeout:g} s")
            message = conn.recv()
        except EOFError:
            process.join(timeout=10)
            conn.close()
            raise RuntimeError(f"the engine process exited while loading the model (exit code {process.exitcode})") from None
        except BaseException:
            process.kill()
            process.join(timeout=10)
            conn.close()
            raise
        if message[0] == "load_failed":
            process.join(timeout=10)
            conn.close()
            raise message[1]
        return _Child(process, conn, message[1], started, generation)

    def _run_child(self, child: _Child) -> None:
        child.reader = threading.Thread(target=self._read, args=(child,), name="invdiff-engine-reader", daemon=True)
        child.reader.start()
        self._send(child, ("start",))

    # ----------------------------------------------------------------- handler side
    def queue_depth(self) -> int:
        return self.admission.waiting()

    def submit(self, job: ImageJob) -> ImageJob:
        """Accept `job` or raise the admission's ServiceError (503 while draining, while the engine
        restarts (with Retry-After), after it gave up or once its first warm-up failed (as the
        app's answer: app.engine_problem); 429 when the queue is full)."""
        with self._lock:
            broken = self._refusal()
            if broken is None and self.load_error is not None:
                broken = ServiceError(503, f"the engine failed to warm up ({self.load_error}); retry on another replica")
            self.admission.admit(job.num, job.steps, broken=broken)
            job.job_id = next(self._ids)
            self._jobs[job.job_id] = job
            try:
                self._send(self._child, ("submit", {name: getattr(job, name) for name in _JOB_FIELDS}))
            except (OSError, ValueError):  # the child just died: its reader fails this job with a 503
                pass
        return job

    def retry_after(self, waiting_images: int, steps: int = 25) -> int:
        """As EngineWorker.retry_after, from the step rate the child reports."""
        return self.admission.retry_after(waiting_images, steps)

    def cancel(self, job: ImageJob) -> None:
        """The client went away: the child frees the job's slots (and reports them released)."""
        with self._lock:
            known = self._jobs.pop(job.job_id, None) is not None
            child = self._child
        if not known:  # delivered, failed, or held by an engine that died
            return
        try:
            self._send(child, ("cancel", job.job_id))
        except (OSError, ValueError):
            pass

    def health(self) -> Optional[str]:
        """None while the engine serves or is being restarted; why not once it gave up (/healthz
        503, Ray Serve's check_health raises)."""
        with self._lock:
            if self._state != FAILED:
                return None
            return f"{self._gave_up()}; restart this replica"

    def unavailable(self) -> Optional[ServiceError]:
        """The 503 a request gets now because the engine is restarting (with Retry-After) or gave
        up; None while it serves."""
        with self._lock:
            return self._refusal()

    def _refusal(self) -> Optional[ServiceError]:  # under self._lock
        if self._state == RESTARTING:
            wait = self._retry_after()
            return ServiceError(503, f"the engine is restarting ({self._last_failure}); retry in {wait} s", retry_after=wait)
        if self._state == FAILED:
            return ServiceError(503, f"{self._gave_up()}; retry on another replica")
        return None

    def _gave_up(self) -> str:  # under self._lock
        times = "time" if self._failures == 1 else "times"
        return f"the engine failed {self._failures} {times} in a row and is not restarted again (last: {self._last_failure})"

    def _retry_after(self) -> int:  # under self._lock: the backoff left plus one start, in whole seconds
        start = self._start_seconds if self._start_seconds is not None else ASSUMED_START_S
        left = max(0.0, self._next_attempt_at - time.monotonic()) + start
        return int(min(300, max(1, math.ceil(left))))

    def _send(self, child: Optional[_Child], message) -> None:
        if child is None:
            raise ValueError("no engine process")
        with self._send_lock:
            child.conn.send(message)

    # ----------------------------------------------------------------- the reader thread (one per child)
    def _read(self, child: _Child) -> None:
        while True:
            try:
                message = child.conn.recv()
            except (EOFError, OSError):
                self._child_gone(child)
                return
            kind = message[0]
            if kind == "done":
                job = self._pop(message[1])
                if job is not None and not job.future.done():
                    job.future.set_result(message[2])
            elif kind == "failed":
                job = self._pop(message[1])
                if job is not None and not job.future.done():
                    job.future.set_exception(ServiceError(message[2], message[3], retry_after=message[4]))
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
                self._child_ready(child, message[1])
            elif kind == "stopped":
                child.settled.set()
                return

    def _pop(self, job_id: int) -> Optional[ImageJob]:
        with self._lock:
            return self._jobs.pop(job_id, None)

    def _child_ready(self, child: _Child, error: Optional[str]) -> None:
        if error is not None and child.generation > 0:
            # A restarted engine that cannot warm up failed to start: end it; its reader counts it.
            child.failure = f"the restarted engine failed to warm up: {error}"
            child.process.kill()
            return
        now = time.monotonic()
        with self._lock:
            child.ready_at = now
            self._start_seconds = now - child.started
            if self._state in (LOADING, RESTARTING):
                self._state = READY
            if error is not None:  # the first engine's warm-up failed: readyz and healthz say so (app.engine_problem),
                # requests get a 503; not restarted: the supervisor restarts the server
                self.load_error = RuntimeError(error)
            elif child.generation > 0:
                self.load_error = None
                log.warning("the engine is ready again after restart %d (%.1f s to start)", self.restarts, self._start_seconds)
        child.settled.set()
        self.ready.set()

    def _child_gone(self, child: _Child) -> None:
        # The child died (killed, out of memory, a crash in native code): every job it held fails
        # with a 503 the caller may retry, its slots and queue are released, and a restart is
        # scheduled (or, after too many failures in a row, the engine gives up: /healthz 503).
        child.process.join(timeout=5)
        with self._send_lock:  # not while a handler writes to it (its descriptor could be reused)
            child.conn.close()
        now = time.monotonic()
        with self._lock:
            jobs, self._jobs = list(self._jobs.values()), {}
            self.admission.release_all()
            reason = child.failure or f"the engine process exited unexpectedly (exit code {child.process.exitcode})"
            restart = False
            if self._stopping.is_set():
                error = ServiceError(503, f"{reason} while the server shut down", retry_after=SHUTDOWN_RETRY_AFTER_S)
            else:
                failed = child.ready_at is None or (child.generation > 0 and now - child.ready_at < STABLE_AFTER_S)
                self._failures = self._failures + 1 if failed else 0
                self._last_failure = reason
                restart = self._schedule_restart(now)
                error = self._refusal()
        self.metrics.slots_occupied.set(0)
        self.metrics.queue_depth.set(0)
        self.metrics.images_per_second.set(0)
        log.error("%s: %d request(s) in flight get a 503; %s", reason, len(jobs),
                  "restarting the engine" if restart else "not restarted (failed or stopping)")
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)
        child.settled.set()
        if restart:
            threading.Thread(target=self._restart, name="invdiff-engine-restart", daemon=True).start()
        # Handlers check readiness before they submit: set it even when the first engine died
        # before its warm-up ended, so that they reach the engine's 503 and not "still loading".
        self.ready.set()

    def _schedule_restart(self, now: float) -> bool:  # under self._lock
        """After a failure: restarting (the next attempt after the backoff) or failed; True to restart."""
        if self._failures >= MAX_FAILED_RESTARTS:
            self._state = FAILED
            log.error("the engine failed %d times in a row; giving up (/healthz is 503)", self._failures)
            return False
        self._state = RESTARTING
        self._next_attempt_at = now + min(RESTART_BACKOFF_CAP_S, RESTART_BACKOFF_S * 2 ** self._failures)
        return True

    def _restart(self) -> None:
        """Start engines, each after its backoff, until one is loaded; then wait for its warm-up
        (its reader reports the outcome: ready, or gone and counted)."""
        while True:
            with self._lock:
                delay = max(0.0, self._next_attempt_at - time.monotonic())
            if self._stopping.wait(delay):
                return
            self.restarts += 1
            self.metrics.engine_restarts.inc()
            log.warning("restarting the engine (restart %d, %d failure(s) in a row)", self.restarts, self._failures)
            generation = self.restarts
            try:
                child = self._spawn(generation, timeout=START_TIMEOUT_S)
            except _Stopped:
                return
            except BaseException as exc:  # noqa: BLE001 (a failed start: counted, retried or given up)
                log.error("the restarted engine failed to load: %s: %s", type(exc).__name__, exc)
                with self._lock:
                    self._failures += 1
                    self._last_failure = f"the restarted engine failed to load: {type(exc).__name__}: {exc}"
                    if not self._schedule_restart(time.monotonic()):
                        return
                continue
            with self._lock:
                if self._stopping.is_set():
                    child.process.kill()
                    return
                self._child = child
            try:
                self._run_child(child)
            except (OSError, ValueError):  # it died at once: its reader counts the failure
                pass
            deadline = child.started + START_TIMEOUT_S
            while not child.settled.wait(0.5):
                if self._stopping.is_set():
                    return
                if time.monotonic() > deadline:
                    child.failure = f"the restarted engine was not ready within {START_TIMEOUT_S:g} s"
                    child.process.kill()  # its reader sees the pipe close and counts the failure
                    return
            return


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
            send(("failed", job.job_id, error.status, str(error), error.retry_after))
        else:
            send(("failed", job.job_id, 500, f"{type(error).__name__}: {error}", None))
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
            # Skip the interpreter's teardown (torch's modules: 1.7 s on the CPU, which a SIGTERM's
            # drain would wait for) after what Process._bootstrap itself runs at a child's end:
            # multiprocessing's finalizers (they unlink the semaphore tqdm's lock made).
            try:
                multiprocessing.util._exit_function()
            except Exception:  # noqa: BLE001 (a private function; without it only a warning at exit)
                pass
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
