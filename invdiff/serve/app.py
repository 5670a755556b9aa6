"""`invdiff serve`'s HTTP app: the continuous-batching engine behind a FastAPI service (run by
uvicorn here, `serve`, or by Ray Serve, see ray_serve.py).

    POST /v1/images   {"prompt", "num", "seed", "steps", "guidance_scale", "strength", "scheduler",
                       "response_format": "png" | "b64_json"}
    GET  /healthz     alive (503 once the engine cannot sample: it could not be restarted, engine_process.py,
                      or its first warm-up failed: `engine_problem`)
    GET  /readyz      model loaded and warmed up (503 before, while draining, while the engine restarts)
    GET  /metrics     Prometheus text format

One worker owns the model and the device (worker.py's `EngineWorker`, by default in a process of
its own: engine_process.py; `make_worker` picks). HTTP handlers never touch torch: they validate,
hand a job to the worker and await its future.
Between two engine steps the worker takes new images into free slots, drops cancelled ones (a
client that disconnects or times out frees its slots) and resolves the jobs that finished. An
image is sampled exactly as `invdiff sample` samples it: the same engine settings, seed + i for
image i, so the same request gives the same pixels.

Every accepted request ends with its images or an error: 429 (with Retry-After) when the queue is
full (admission.py decides), 422 for input the caller can fix, 500 naming the cause when the
worker failed on its images (the others keep going), 503 with Retry-After when the server drains
(a request that arrives meanwhile at once, one still running at the drain deadline then: `Drain`),
503 with Retry-After when the engine process died with the request or is restarting, 503 naming the
cause once the engine's first warm-up failed (/healthz 503 too: `engine_problem`). Before any
of that, a body over settings.MAX_BODY_BYTES is 413 and one that is not JSON 415, unparsed
(asgi.py). Every response carries X-Served-By and is counted in invdiff_requests_total.

What a response shows of the machine: the model by its folder's name and X-Served-By as a random
id of this server process (logged at start), unless settings.expose_details (--expose-details)
asks for the model's absolute path and host:pid.
"""
# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at runtime,
# and the request model is built per app (its limits come from the settings).
import asyncio
import base64
import io
import logging
import os
import secrets
import socket
import time
from typing import List, Literal, Optional

from ..config import SCHEDULER_NAMES, SEED_LIMIT
from .admission import SHUTDOWN_RETRY_AFTER_S, SHUTTING_DOWN
from .asgi import BoundedBody, StampResponses, send_json_error, validation_problems
from .errors import ServiceError
from .metrics import Metrics
from .settings import LISTEN_BACKLOG, MAX_GUIDANCE_SCALE, MAX_STEPS, MAX_STRENGTH, ServeSettings, listen_sockets
from .worker import SHUT_DOWN_UNFINISHED, EngineWorker, ImageJob, Worker

log = logging.getLogger("invdiff.serve")
SEED_LIMIT_TEXT = f"2**{SEED_LIMIT.bit_length() - 1}"  # "2**64", for messages
# `serve`: uvicorn's own graceful-shutdown timeout is the drain deadline plus this. Only a backstop:
# every request has its answer at the deadline (`Drain`), and uvicorn would cancel one still
# running with a plain-text 500 and a traceback.
UVICORN_GRACE_S = 2.0
# How often a request held while the engine restarts (_wait_while_restarting) looks again: a tenth
# of the fastest restart measured (about 6 s on the CPU) is lost at most.
RESTART_POLL_S = 0.1

# --------------------------------------------------------------------- the HTTP app
def _request_model(settings: ServeSettings):
    from pydantic import BaseModel, ConfigDict, Field

    class ImagesRequest(BaseModel):
        """POST /v1/images. Defaults are `invdiff sample`'s."""

        # strict: "num": "2" or true is a 422 naming the field, not a 2 or a 1 (pydantic's lax
        # mode); a float field still takes a JSON integer ("strength": 1).
        model_config = ConfigDict(extra="forbid", strict=True)
        prompt: str = Field(min_length=1, max_length=2000)
        num: int = Field(1, ge=1, le=settings.max_images_per_request,
                         description=f"images; at most {settings.max_images_per_request} per request (--max-images-per-request)")
        seed: Optional[int] = Field(None, ge=0, lt=SEED_LIMIT, description="seed of image 0; image i uses seed + i (None: drawn)")
        steps: int = Field(25, ge=1, le=MAX_STEPS)
        guidance_scale: float = Field(1.0, ge=0.0, le=MAX_GUIDANCE_SCALE, allow_inf_nan=False,
                                      description="classifier-free guidance scale w (1 = off)")
        strength: float = Field(1.0, ge=0.0, le=MAX_STRENGTH, allow_inf_nan=False,
                                description="G_psi strength s (0 = the frozen model, 1 = the calibrated push, or G as trained when uncalibrated)")
        scheduler: Literal[tuple(sorted(SCHEDULER_NAMES))] = "ddim"  # type: ignore[valid-type]
        response_format: Literal["png", "b64_json"] = "b64_json"

    return ImagesRequest


def served_by(settings: ServeSettings) -> str:
    """X-Served-By: which server process answered (for logs and load-balancing checks). host:pid
    with settings.expose_details; else a random id drawn once per process, which `serve` logs at
    start beside host:pid, so that an operator can tell the two apart and a caller learns neither."""
    if settings.expose_details:
        return f"{socket.gethostname()}:{os.getpid()}"
    global _PROCESS_ID
    if _PROCESS_ID is None:
        _PROCESS_ID = f"invdiff-{secrets.token_hex(6)}"
    return _PROCESS_ID


_PROCESS_ID: Optional[str] = None


class Redactor:
    """What responses say of the model's place: its folder's name in "model" (the absolute path
    with settings.expose_details), and error details with the model's and the base's absolute
    paths written as <model> and <base> (kept with expose_details). A hub id is shown as given."""

    def __init__(self, settings: ServeSettings):
        self.model_name = settings.model
        self.replacements: List[tuple] = []
        if os.path.exists(settings.model):
            self.model_name = (os.path.abspath(settings.model) if settings.expose_details
                               else os.path.basename(os.path.normpath(os.path.abspath(settings.model))))
        if settings.expose_details:
            return
        for path, name in ((settings.model, "<model>"), (settings.base, "<base>")):
            if path and os.path.exists(path):
                forms = {os.path.abspath(path), os.path.realpath(path)}
                if os.sep in path:  # a bare folder name is a word too, and shows no place
                    forms.add(os.path.normpath(path))
                self.replacements += [(form, name) for form in forms if form not in (os.sep, ".")]
        self.replacements.sort(key=lambda pair: -len(pair[0]))  # /a/run/base before /a/run

    def __call__(self, text: str) -> str:
        for form, name in self.replacements:
            text = text.replace(form, name)
        return text


def make_worker(settings: ServeSettings, metrics: Metrics) -> Worker:
    """The engine worker the settings ask for: in a process of its own (the default) or a thread."""
    if settings.engine_process:
        from .engine_process import EngineProcess

        return EngineProcess(settings, metrics)
    return EngineWorker(settings, metrics)


def warm_up_failure(worker: Worker) -> Optional[str]:
    """Why the engine cannot sample although its model loaded: its first warm-up (one image
    through the engine, run before /readyz says yes) failed. Both worker kinds then stay up and
    would fail every request: it is no state to recover from in place. None otherwise."""
    if not worker.ready.is_set() or worker.load_error is None:
        return None
    return f"the engine failed to warm up ({type(worker.load_error).__name__}: {worker.load_error})"


def engine_problem(worker: Worker) -> Optional[str]:
    """Liveness: why this server can no longer sample, or None while it serves, loads or heals
    its engine. GET /healthz answers 503 with it and Ray Serve's check_health raises it
    (ray_serve.py), so that a supervisor restarts the process or Ray replaces the replica: the
    worker's own verdict (an engine that gave up restarting: worker.health()), or a failed first
    warm-up (`warm_up_failure`)."""
    problem = worker.health()
    if problem is None and warm_up_failure(worker) is not None:
        problem = f"{warm_up_failure(worker)}; restart this replica"
    return problem


def _png_bytes(images) -> List[bytes]:
    """A job's images -> PNG files, quantised exactly as `invdiff sample` saves them. images: a
    list of (C, H, W) tensors in [-1, 1] (a worker thread) or an (N, H, W, C) uint8 array (an
    engine process, which quantises them there)."""
    import numpy as np
    from PIL import Image

    if isinstance(images, list):
        import torch

        from ..report import to_uint8

        images = to_uint8(torch.stack(images)).numpy()
    out = []
    for image in np.asarray(images):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


async def _client_gone(request) -> None:
    """Returns when the ASGI server reports that the client disconnected."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class ShedWhenFull:
    """ASGI middleware: while the queue is already full, POST /v1/images gets its 429 before the
    body is read, parsed or validated (the worker's Admission.when_full). Under overload most
    requests are refused, and each one refused this way costs the server a few microseconds
    instead of FastAPI's full request path, CPU the engine would otherwise lose on a busy machine.
    (StampResponses, outside it, counts the 429 and stamps X-Served-By.)"""

    def __init__(self, app, state):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        worker = self.state["worker"]
        if (scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/v1/images"
                and worker is not None and worker.ready.is_set()):
            refusal = worker.admission.when_full()
            if refusal is not None:
                await send_json_error(send, refusal.status, str(refusal), refusal.retry_after)
                return
        await self.app(scope, receive, send)


class Drain:
    """The drain deadline of one app. `begin` (SIGTERM: `serve`'s handler; under Ray Serve, the start
    of the replica's graceful shutdown: ray_serve.py; else the app's shutdown)
    stops new requests (503) and starts the clock: settings.drain_seconds later `passed` resolves,
    and every request still waiting for its images is cancelled in the engine and answered 503
    with Retry-After, in the service's JSON body, so that the server can exit on time.

    `bind` (at the app's start, on its event loop) makes `passed`; `begin` may be called from any
    thread or from a signal handler."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.started = False
        self.deadline: Optional[float] = None  # time.monotonic() when the drain ends
        self.passed: Optional[asyncio.Future] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop, self.passed = loop, loop.create_future()
        if self.started:  # begun before the app started
            loop.call_soon_threadsafe(self._arm)

    def begin(self) -> None:
        if self.started:
            return
        self.deadline = time.monotonic() + self.seconds
        self.started = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._arm)

    def left(self) -> float:
        """Seconds until the deadline (the whole drain before `begin`)."""
        return self.seconds if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def _arm(self) -> None:  # on the loop
        self._loop.call_later(self.left(), self._pass)

    def _pass(self) -> None:
        if self.passed is not None and not self.passed.done():
            self.passed.set_result(None)


async def _wait_while_restarting(worker: Worker, limit_s: float, drain) -> None:
    """Wait while the engine restarts (not when it gave up, nor once the server drains), for at
    most `limit_s` (settings.hold_while_restarting_s); the caller then submits, and gets the 503
    if the engine is still not back."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and not drain.started:
        if worker.unavailable() is None or worker.health() is not None:
            return
        await asyncio.sleep(RESTART_POLL_S)


def create_app(settings: ServeSettings, worker: Optional[Worker] = None):
    """The FastAPI app. `worker`: a loaded EngineWorker or EngineProcess (make_worker; None: make
    and load one at startup). The worker thread starts with the app and drains at shutdown.
    `app.state.drain` is the app's `Drain`: `serve` begins it on SIGTERM."""
    import contextlib
    import random

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    metrics = worker.metrics if worker is not None else Metrics(settings.max_batch)
    ImagesRequest = _request_model(settings)
    state = {"worker": worker}
    drain = Drain(settings.drain_seconds)
    redact = Redactor(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        w = state["worker"]
        if w is None:
            w = state["worker"] = make_worker(settings, metrics)
            await run_in_threadpool(w.load)
        w.start()
        drain.bind(asyncio.get_running_loop())
        try:
            yield
        finally:
            # Under `serve` the drain began at SIGTERM and the requests have their answers by now.
            drain.begin()
            await run_in_threadpool(w.stop, drain.left())

    app = FastAPI(title="invdiff", summary="InvDiff guided sampling", lifespan=lifespan)
    app.state.invdiff = state
    app.state.drain = drain
    # Added innermost first: a request meets StampResponses, then ShedWhenFull (a full queue is
    # refused before anything is read), then BoundedBody (413, 415), then FastAPI.
    app.add_middleware(BoundedBody)
    app.add_middleware(ShedWhenFull, state=state)
    app.add_middleware(StampResponses, metrics=metrics, served_by=served_by(settings))

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request, exc):
        # One readable line per bad field ("num: Input should be less than or equal to 16"); a
        # body that is not JSON names the field where decoding stopped (asgi.py).
        return error(422, "; ".join(validation_problems(exc.errors(), getattr(exc, "body", None))))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        # Starlette's 404 and 405 and FastAPI's 400 (a body it could not decode), in the usual body.
        return error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    def error(status: int, message: str, retry_after: Optional[int] = None, headers: Optional[dict] = None):
        # Counted, with X-Served-By, by StampResponses.
        headers = dict(headers or {})
        if retry_after is not None:
            headers["Retry-After"] = str(retry_after)
        return JSONResponse({"detail": redact(message)}, status_code=status, headers=headers or None)

    @app.get("/healthz")
    async def healthz():
        # Liveness: 503 only once the engine can no longer sample (`engine_problem`: it gave up
        # restarting, or its first warm-up failed), so that a supervisor restarts the process. An
        # engine that is restarting is alive: /readyz says it cannot take requests meanwhile.
        w = state["worker"]
        problem = engine_problem(w) if w is not None else None
        if problem is not None:
            return JSONResponse({"status": "failed", "detail": redact(problem)}, status_code=503)
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz():
        w = state["worker"]
        if drain.started:
            return JSONResponse({"status": "draining"}, status_code=503)
        if w is None or not w.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        if w.load_error is not None:
            return JSONResponse({"status": "failed", "detail": redact(f"{type(w.load_error).__name__}: {w.load_error}")},
                                status_code=503)
        refusal = w.unavailable()  # the engine is restarting, or gave up
        if refusal is not None:
            status = "restarting" if w.health() is None else "failed"
            return JSONResponse({"status": status, "detail": redact(str(refusal))}, status_code=503)
        return {"status": "ready", "model": redact.model_name, "device": str(w.device), "attention": w.attention}

    @app.get("/metrics")
    async def prometheus_metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        w = state["worker"]
        if w is not None:
            metrics.queue_depth.set(w.queue_depth())
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/images")
    async def images(body: ImagesRequest, request: Request):
        w = state["worker"]
        if drain.started:
            return error(503, SHUTTING_DOWN, retry_after=SHUTDOWN_RETRY_AFTER_S)
        if w is None or not w.ready.is_set():
            return error(503, "the model is still loading; retry when /readyz is 200", retry_after=5)
        if w.load_error is not None:  # /healthz is 503 too: a supervisor restarts this server
            return error(503, f"{warm_up_failure(w)}; retry on another replica")
        if w.known_prompts is not None and body.prompt not in w.known_prompts:
            known = ", ".join(repr(p) for p in sorted(w.known_prompts)[:20])
            return error(422, f"unknown prompt {body.prompt!r}: this model was trained on {known}")
        if body.steps > w.num_train_timesteps:
            return error(422, f"steps {body.steps} exceeds the model's {w.num_train_timesteps} training timesteps")
        if body.response_format == "png" and body.num != 1:
            return error(422, "response_format 'png' returns one image; ask for num = 1 or use 'b64_json'")
        seed = body.seed if body.seed is not None else random.randrange(SEED_LIMIT - body.num)
        if seed + body.num > SEED_LIMIT:
            return error(422, f"seed + num must stay below {SEED_LIMIT_TEXT}, got seed {seed} with num {body.num}")
        job = ImageJob(body.prompt, body.num, seed, body.steps, body.guidance_scale, body.strength, body.scheduler)
        if settings.hold_while_restarting_s > 0:
            await _wait_while_restarting(w, settings.hold_while_restarting_s, drain)
        try:
            w.submit(job)
        except ServiceError as exc:
            return error(exc.status, str(exc), exc.retry_after)
        waiting = asyncio.wrap_future(job.future)
        # Watch the client without polling: the body is read, so the next ASGI message is the
        # disconnect (a client that closed or timed out), which frees the job's slots at once.
        # And the drain deadline: a request still running then is answered, not cut.
        gone = asyncio.ensure_future(_client_gone(request))
        watched = {waiting, gone} | ({drain.passed} if drain.passed is not None else set())
        try:
            await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # Ray Serve cancels the handler when its client leaves
            w.cancel(job)
            raise
        finally:
            if not gone.done():
                gone.cancel()
        if not waiting.done():
            w.cancel(job)
            if gone.done() and not gone.cancelled():
                return Response(status_code=499)  # nginx's "client closed request", counted as such
            # The drain deadline passed: one line, not uvicorn's traceback of a cancelled handler.
            log.warning("a request of %d image(s) was still running at the drain deadline (%g s): 503", job.num, drain.seconds)
            return error(503, SHUT_DOWN_UNFINISHED, retry_after=SHUTDOWN_RETRY_AFTER_S)
        try:
            result = waiting.result()
        except ServiceError as exc:
            return error(exc.status, str(exc), exc.retry_after)
        pngs = await run_in_threadpool(_png_bytes, result)
        headers = {"X-Seed": str(seed), "X-Latency-Seconds": f"{time.perf_counter() - job.created:.3f}"}
        if body.response_format == "png":
            return Response(pngs[0], media_type="image/png", headers=headers)
        return JSONResponse({"model": redact.model_name, "seed": seed,
                             "images": [{"seed": seed + i, "b64_json": base64.b64encode(p).decode("ascii")} for i, p in enumerate(pngs)]},
                            headers=headers)

    return app


def serve(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          sockets: Optional[List[socket.socket]] = None) -> None:
    """Take the port (settings.listen_sockets; or `sockets`, which the CLI took before its other
    start-up checks), load the model, then serve until SIGTERM/SIGINT. On the
    signal: /readyz 503, no new connections (uvicorn's graceful shutdown), in-flight requests
    finish for at most settings.drain_seconds, and those still running then get a 503 with
    Retry-After (`Drain`); then the engine stops and the process ends by the signal, as uvicorn
    ends it."""
    if sockets is None:
        sockets = listen_sockets(host, port)  # first: a port in use is one error line, and the port is ours from here on
    import uvicorn

    try:
        worker = make_worker(settings, Metrics(settings.max_batch))
        worker.load()  # before the server runs: a bad model folder is one error line, not a 503 forever
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    app = create_app(settings, worker)

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):  # readyz turns 503 at once, so balancers stop sending
            app.state.drain.begin()  # the deadline counts from the signal
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=sockets[0].getsockname()[1], log_level=log_level, backlog=LISTEN_BACKLOG,
                            timeout_graceful_shutdown=settings.drain_seconds + UVICORN_GRACE_S)
    # uvicorn's logger: configured by now, it prints where uvicorn's own start-up lines go.
    logging.getLogger("uvicorn.error").info("X-Served-By %s is %s:%d", served_by(settings), socket.gethostname(), os.getpid())
    DrainingServer(config).run(sockets=sockets)
