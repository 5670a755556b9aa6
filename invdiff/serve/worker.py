"""The engine worker behind `invdiff serve`: what a worker is (the `Worker` protocol), one job
(`ImageJob`), and the worker thread that owns the model and the device (`EngineWorker`).

HTTP handlers (app.py) never touch torch: they hand jobs to the worker, which takes new images
into free engine slots between steps, drops cancelled ones, fails only the requests a failed step
touched, and resolves each job's future with its images. engine_process.py runs the same worker
in a process of its own, behind the same protocol; both decide admission (429, 503) with one
`Admission` (admission.py).
"""
from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Protocol, Tuple

from .admission import SHUTDOWN_RETRY_AFTER_S, Admission
from .errors import ServiceError
from .metrics import Metrics
from .settings import MAX_STEPS, ServeSettings

log = logging.getLogger("invdiff.serve")

# The 503 of a request still running when the drain deadline passed (the app answers it at the
# deadline; a worker stopped with jobs left fails them with it too).
SHUT_DOWN_UNFINISHED = "the server shut down before this request finished (its drain deadline passed); retry on another replica"
PROMPT_TABLE_LIMIT = 4096  # prompts a text-encoder model's table holds before it is reset when idle
# The scheduler the worker warms up with and keeps an engine for; engines of other schedulers
# are freed as soon as they are idle (their buffers and plans are rebuilt in milliseconds).
DEFAULT_SCHEDULER = "ddim"


@dataclass
class ImageJob:
    """One HTTP request: `num` images of one prompt, image i from seed + i.
    images: filled by the worker, (C, H, W) float in [-1, 1] on the CPU."""

    prompt: str
    num: int
    seed: int
    steps: int
    guidance_scale: float
    strength: float
    scheduler: str
    created: float = field(default_factory=time.perf_counter)
    job_id: int = -1
    images: List = field(default_factory=list)
    done: int = 0
    started: Optional[float] = None  # when its first image took a slot
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class Worker(Protocol):
    """What the HTTP app (app.py) asks of an engine worker: EngineWorker (a thread of the server's
    process) and EngineProcess (engine_process.py: the same worker in a process of its own).

    The app calls `load` (before the port opens), `start` (with the app) and `stop` (at shutdown,
    draining for at most the given seconds); handlers `submit` jobs, `cancel` those whose client
    went away, and await each job's future: its images, or a ServiceError.
    """

    settings: ServeSettings
    metrics: Metrics
    admission: Admission  # queue depth, 429 / Retry-After, 503 once draining
    ready: threading.Event  # set once warmed up (or failed to: load_error)
    load_error: Optional[BaseException]
    known_prompts: Optional[frozenset]  # None: any prompt (a text encoder)
    num_train_timesteps: int
    device: object
    attention: Optional[str]

    def load(self) -> None: ...

    def start(self) -> None: ...

    def stop(self, deadline_seconds: float) -> None: ...

    def submit(self, job: ImageJob) -> ImageJob: ...

    def cancel(self, job: ImageJob) -> None: ...

    def queue_depth(self) -> int: ...

    def retry_after(self, waiting_images: int, steps: int = 25) -> int: ...

    def health(self) -> Optional[str]:
        """None while the engine serves or is recovering; else why it cannot (GET /healthz turns
        503 and Ray Serve's check_health raises, so that a supervisor replaces the replica)."""
        ...

    def unavailable(self) -> Optional[ServiceError]:
        """The 503 any request gets now because the engine is restarting (with Retry-After) or
        gone; None while it serves. GET /readyz is 503 while it is not None."""
        ...


class EngineWorker:
    """The one thread that owns the model and the device (a `Worker`).

    One `SamplingEngine` per scheduler that requests ask for (schedulers differ in their update
    rule, so they cannot share a batch; the strength is a per-slot value, so every strength of
    one scheduler shares its batch). Each image of a job is one engine request. The worker holds
    the images in one FIFO and hands an engine an image only while the images in all engines are
    fewer than --max-batch, so that the slots of every engine together never exceed it; an engine
    other than the default scheduler's is freed once it is idle. Handlers talk to the worker only
    through `submit` and `cancel`, which put a message in the inbox; the worker applies them
    between steps.
    """

    def __init__(self, settings: ServeSettings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.admission = Admission(settings.max_queue)
        self._inbox: "queue.Queue[Tuple[str, ImageJob]]" = queue.Queue()
        self._finished_at: List[float] = []
        self._ids = itertools.count()
        self._jobs: Dict[int, ImageJob] = {}
        self._owner: Dict[int, Tuple[ImageJob, int, str]] = {}  # engine request id -> (job, image index, scheduler)
        self._engines: Dict[str, object] = {}  # scheduler -> its SamplingEngine
        self._waiting: "collections.deque[Tuple[str, object]]" = collections.deque()  # (scheduler, engine Request) not yet in an engine
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._deadline: Optional[float] = None
        # Called with a count whenever images leave the worker (delivered, failed or cancelled):
        # an EngineProcess tells its parent, whose Admission keeps the queue depth 429s are decided on.
        self.on_released: Optional[Callable[[int], None]] = None
        self.ready = threading.Event()
        self.load_error: Optional[BaseException] = None
        self.base = self.guidance = None
        self.size: Tuple[Optional[int], Optional[int]] = (None, None)
        self.known_prompts: Optional[frozenset] = None  # None: any prompt (a text encoder)
        self.num_train_timesteps = MAX_STEPS
        self.device = self.attention = None  # set by load

    # ----------------------------------------------------------------- loading (caller's thread)
    def load(self) -> None:
        """Load the model (before the server takes requests: a bad folder fails the start)."""
        import torch

        from ..model_folders import sampling_size
        from ..model_folders.load import load_model
        from ..models.conditioner import PromptEmbedding
        from ..models.sd import set_attention

        s = self.settings
        device = torch.device(s.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.size = sampling_size(s.model)
        base, guidance = load_model(s.model, s.base, frozen_dtype=s.frozen_dtype)
        self.attention = set_attention(base.unet, s.attention)
        self.base = base.to(device)
        self.guidance = guidance.to(device) if guidance is not None else None
        self.device = device
        if isinstance(base.conditioner, PromptEmbedding):
            self.known_prompts = frozenset(base.conditioner.config.prompts)
        self.num_train_timesteps = int(base.scheduler.config.num_train_timesteps)

    # ----------------------------------------------------------------- handler side (any thread)
    def queue_depth(self) -> int:
        return self.admission.waiting()

    def submit(self, job: ImageJob) -> ImageJob:
        """Accept `job` or raise the admission's ServiceError (429 when its images would overflow
        the queue, 503 while draining)."""
        self.admission.admit(job.num, job.steps, broken=self.unavailable())
        if job.job_id < 0:  # an EngineProcess numbers its jobs itself
            job.job_id = next(self._ids)
        self._inbox.put(("submit", job))
        return job

    def cancel(self, job: ImageJob) -> None:
        """The client went away: free the job's slots and drop its queued images."""
        self._inbox.put(("cancel", job))

    def retry_after(self, waiting_images: int, steps: int = 25) -> int:
        """Seconds until `waiting_images` images of `steps` steps would be done at the measured
        step rate (Retry-After of a 429); at least 1, at most 300."""
        return self.admission.retry_after(waiting_images, steps)

    def health(self) -> Optional[str]:
        """None unless the worker thread ended without being stopped (a bug: nothing would take jobs)."""
        if self._thread is not None and not self._thread.is_alive() and not self._stop.is_set():
            return "the engine worker thread ended unexpectedly; restart this replica"
        return None

    def unavailable(self) -> Optional[ServiceError]:
        problem = self.health()
        return None if problem is None else ServiceError(503, problem)

    # ----------------------------------------------------------------- the worker thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="invdiff-engine-worker", daemon=True)
        self._thread.start()

    def stop(self, deadline_seconds: float) -> None:
        """Stop taking jobs; finish what is in flight for at most `deadline_seconds`, then fail
        the rest with 503 and end the thread."""
        self._deadline = time.perf_counter() + deadline_seconds
        self.admission.close()
        self._stop.set()
        self._inbox.put(("wake", None))
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        try:
            self._warm_up()
        except BaseException as exc:  # readyz reports it; every request fails with it
            log.exception("warm-up failed")
            self.load_error = exc
        self.ready.set()
        while True:
            busy = bool(self._waiting) or any(e.pending or e.active for e in self._engines.values())
            if not busy:
                self._trim_prompt_table()
            self._drain_inbox(block=not busy)
            if self._stop.is_set() and (not self._jobs or time.perf_counter() >= self._deadline):
                break
            self._feed_engines()
            for scheduler, engine in list(self._engines.items()):
                if engine.pending or engine.active:
                    self._step(scheduler, engine)
            self._free_idle_engines()
        for job in list(self._jobs.values()):
            self._fail(job, ServiceError(503, SHUT_DOWN_UNFINISHED, retry_after=SHUTDOWN_RETRY_AFTER_S))

    def _trim_prompt_table(self) -> None:
        # A text encoder's table keeps one (L, D) row per prompt ever asked for (118 KB in fp16 at
        # SD 1.5's 77 x 768). When no sample holds a prompt id, ids can be handed out afresh.
        conditioner = self.base.conditioner if self.base is not None else None
        if hasattr(conditioner, "reset_prompts") and len(conditioner.prompts) > PROMPT_TABLE_LIMIT:
            conditioner.reset_prompts()

    def _warm_up(self) -> None:
        # One 1-step image through the default engine: loads kernels (Triton, the C++ step) and
        # allocates the engine's buffers before readyz says yes.
        if self.load_error is not None:
            raise self.load_error
        from ..sampling.engine import Request

        engine = self._engine(DEFAULT_SCHEDULER)
        prompt = sorted(self.known_prompts)[0] if self.known_prompts else ""
        prompt_id = int(self.base.conditioner.prompt_ids([prompt])[0])
        engine.run([Request(prompt_id, 0, steps=1, guidance_scale=1.0, request_id=-1)])

    def _engine(self, scheduler: str):
        if scheduler not in self._engines:
            from ..sampling.sampler import GuidedDenoiser, sampling_engine

            # Strength 1 is only the default of a request without one: each request carries its own.
            self._engines[scheduler] = sampling_engine(GuidedDenoiser(self.base, self.guidance, 1.0), scheduler,
                                                       self.settings.max_batch, device=self.device,
                                                       eta_below=self.settings.eta_below_band, height=self.size[0], width=self.size[1],
                                                       guidance_every=self.settings.guidance_every)
        return self._engines[scheduler]

    def images_in_engines(self) -> int:
        """Images held by engines (in a slot, or queued in one to take a slot at its next step)."""
        return sum(e.active + e.pending for e in self._engines.values())

    def _feed_engines(self) -> None:
        """Hand waiting images to their engines, oldest first, while all engines together hold
        fewer than --max-batch: the cap on slots is global, not per engine."""
        room = self.settings.max_batch - self.images_in_engines()
        while self._waiting and room > 0:
            scheduler, request = self._waiting.popleft()
            self._engine(scheduler).submit(request)
            room -= 1

    def _free_idle_engines(self) -> None:
        for scheduler in [k for k, e in self._engines.items() if k != DEFAULT_SCHEDULER and not (e.pending or e.active)]:
            del self._engines[scheduler]

    def _drain_inbox(self, block: bool) -> None:
        from ..sampling.engine import Request

        while True:
            try:
                kind, job = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            if kind == "submit":
                if self.load_error is not None:
                    self._fail(job, ServiceError(500, f"the model failed to warm up: {type(self.load_error).__name__}: {self.load_error}"))
                    continue
                try:
                    prompt_id = int(self.base.conditioner.prompt_ids([job.prompt])[0])  # here: an SD table grows
                    self._engine(job.scheduler)  # a scheduler that cannot be built fails this job only
                except Exception as exc:
                    self._fail(job, ServiceError(500, f"could not start the request: {type(exc).__name__}: {exc}"))
                    continue
                self._jobs[job.job_id] = job
                job.images = [None] * job.num
                for i in range(job.num):
                    rid = next(self._ids)
                    self._owner[rid] = (job, i, job.scheduler)
                    self._waiting.append((job.scheduler, Request(prompt_id, job.seed + i, job.steps, job.guidance_scale,
                                                                 request_id=rid, strength=float(job.strength))))
            elif kind == "cancel" and job.job_id in self._jobs:
                self._drop(job)
                self._count_done(job.num - job.done)

    def _step(self, scheduler: str, engine) -> None:
        start = time.perf_counter()
        before = engine.slot_steps
        try:
            finished = engine.step()
        except Exception as exc:  # the images in this batch fail; the service keeps serving
            log.exception("engine step failed")
            failed = {r.request_id for r in engine.abort_active()}
            error = ServiceError(500, f"sampling failed in the worker: {type(exc).__name__}: {exc}")
            for job in {self._owner[rid][0].job_id: self._owner[rid][0] for rid in failed if rid in self._owner}.values():
                self._fail(job, error)
            self._update_occupancy()
            return
        elapsed = time.perf_counter() - start
        self.metrics.step_seconds.observe(elapsed)
        self.admission.record_step(engine.slot_steps - before, elapsed)
        now = time.perf_counter()
        for rid in engine.active_ids():
            job = self._owner[rid][0]
            if job.started is None:
                job.started = now
                self.metrics.queue_wait.observe(now - job.created)
        for rid, image in finished.items():
            owner = self._owner.pop(rid, None)
            if owner is None:
                continue
            job, i, _ = owner
            job.images[i] = image
            job.done += 1
            self._count_done(1)
            self._finished_at.append(now)
            if job.done == job.num:
                del self._jobs[job.job_id]
                self.metrics.latency.observe(now - job.created)
                self.metrics.images.inc(job.num)
                job.future.set_result(job.images)
        self._finished_at = [t for t in self._finished_at if t > now - 10.0]
        self.metrics.images_per_second.set(len(self._finished_at) / 10.0)
        self._update_occupancy()

    def _update_occupancy(self) -> None:
        occupied = sum(e.active for e in self._engines.values())
        self.admission.occupy(occupied)
        self.metrics.slots_occupied.set(occupied)
        self.metrics.queue_depth.set(self.queue_depth())

    def _count_done(self, images: int) -> None:
        self.admission.release(images)
        if self.on_released is not None:
            self.on_released(images)

    def _drop(self, job: ImageJob) -> None:
        """Remove the job's images from the worker's FIFO and the engines (queued or in a slot)."""
        self._jobs.pop(job.job_id, None)
        mine = {rid for rid, (owner, _, _) in self._owner.items() if owner is job}
        self._waiting = collections.deque(item for item in self._waiting if item[1].request_id not in mine)
        for rid in mine:
            _, _, scheduler = self._owner.pop(rid)
            if scheduler in self._engines:
                self._engines[scheduler].cancel(rid)
        self._update_occupancy()

    def _fail(self, job: ImageJob, error: ServiceError) -> None:
        if job.job_id in self._jobs:
            self._drop(job)
        self._count_done(job.num - job.done)
        if not job.future.done():
            job.future.set_exception(error)
