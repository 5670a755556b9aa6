"""`invdiff serve`'s HTTP app: the continuous-batching engine behind a FastAPI service (run by
uvicorn here, `serve`, or by Ray Serve, see ray_serve.py).

    POST /v1/images   {"prompt", "num", "seed", "steps", "guidance_scale", "strength", "scheduler",
                       "response_format": "png" | "b64_json"}
    GET  /healthz     alive (503 once a dead engine could not be restarted: engine_process.py)
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
worker failed on its images (the others keep going), 503 when the server drains past its deadline,
503 with Retry-After when the engine process died with the request or is restarting.
"""
# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at runtime,
# and the request model is built per app (its limits come from the settings).
import asyncio
import base64
import io
import json
import logging
import os
import socket
import time
from typing import List, Literal, Optional

from ..config import SCHEDULER_NAMES, SEED_LIMIT
from .errors import ServiceError
from .metrics import Metrics
from .settings import MAX_GUIDANCE_SCALE, MAX_STEPS, MAX_STRENGTH, ServeSettings
from .worker import EngineWorker, ImageJob, Worker

log = logging.getLogger("invdiff.serve")
SERVED_BY = f"{socket.gethostname()}:{os.getpid()}"  # which replica answered: for logs and load balancing checks
SEED_LIMIT_TEXT = f"2**{SEED_LIMIT.bit_length() - 1}"  # "2**64", for messages

# --------------------------------------------------------------------- the HTTP app
def _request_model(settings: ServeSettings):
    from pydantic import BaseModel, ConfigDict, Field

    class ImagesRequest(BaseModel):
        """POST /v1/images. Defaults are `invdiff sample`'s."""

        model_config = ConfigDict(extra="forbid")
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


def make_worker(settings: ServeSettings, metrics: Metrics) -> Worker:
    """The engine worker the settings ask for: in a process of its own (the default) or a thread."""
    if settings.engine_process:
        from .engine_process import EngineProcess

        return EngineProcess(settings, metrics)
    return EngineWorker(settings, metrics)


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
    instead of FastAPI's full request path, CPU the engine would otherwise lose on a busy machine."""

    def __init__(self, app, state, metrics: Metrics):
        self.app, self.state, self.metrics = app, state, metrics

    async def __call__(self, scope, receive, send):
        worker = self.state["worker"]
        if (scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/v1/images"
                and worker is not None and worker.ready.is_set()):
            refusal = worker.admission.when_full()
            if refusal is not None:
                body = json.dumps({"detail": str(refusal)}).encode()
                headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                           (b"retry-after", str(refusal.retry_after).encode())]
                self.metrics.requests.labels(str(refusal.status)).inc()
                await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def create_app(settings: ServeSettings, worker: Optional[Worker] = None):
    """The FastAPI app. `worker`: a loaded EngineWorker or EngineProcess (make_worker; None: make
    and load one at startup). The worker thread starts with the app and drains at shutdown."""
    import contextlib
    import random

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool

    metrics = worker.metrics if worker is not None else Metrics(settings.max_batch)
    ImagesRequest = _request_model(settings)
    state = {"worker": worker, "draining": False}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        w = state["worker"]
        if w is None:
            w = state["worker"] = make_worker(settings, metrics)
            await run_in_threadpool(w.load)
        w.start()
        try:
            yield
        finally:
            state["draining"] = True
            await run_in_threadpool(w.stop, settings.drain_seconds)

    app = FastAPI(title="invdiff", summary="InvDiff guided sampling", lifespan=lifespan)
    app.state.invdiff = state
    app.add_middleware(ShedWhenFull, state=state, metrics=metrics)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request, exc):
        # One readable line per bad field ("num: Input should be less than or equal to 16")
        # rather than FastAPI's nested list: the caller reads it and fixes the request.
        problems = [f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors()]
        return error(422, "; ".join(problems))

    def error(status: int, message: str, retry_after: Optional[int] = None):
        metrics.requests.labels(str(status)).inc()
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        return JSONResponse({"detail": message}, status_code=status, headers=headers)

    @app.get("/healthz")
    async def healthz():
        # Liveness: 503 only once the engine gave up (engine_process.py: it failed to restart
        # MAX_FAILED_RESTARTS times in a row), so that a supervisor restarts the process. An
        # engine that is restarting is alive: /readyz says it cannot take requests meanwhile.
        w = state["worker"]
        problem = w.health() if w is not None else None
        if problem is not None:
            return JSONResponse({"status": "failed", "detail": problem}, status_code=503)
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz():
        w = state["worker"]
        if state["draining"]:
            return JSONResponse({"status": "draining"}, status_code=503)
        if w is None or not w.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        if w.load_error is not None:
            return JSONResponse({"status": "failed", "detail": f"{type(w.load_error).__name__}: {w.load_error}"}, status_code=503)
        refusal = w.unavailable()  # the engine is restarting, or gave up
        if refusal is not None:
            status = "restarting" if w.health() is None else "failed"
            return JSONResponse({"status": status, "detail": str(refusal)}, status_code=503)
        return {"status": "ready", "model": settings.model, "device": str(w.device), "attention": w.attention}

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
        if state["draining"]:
            return error(503, "the server is shutting down; retry on another replica")
        if w is None or not w.ready.is_set():
            return error(503, "the model is still loading; retry when /readyz is 200", retry_after=5)
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
        try:
            w.submit(job)
        except ServiceError as exc:
            return error(exc.status, str(exc), exc.retry_after)
        waiting = asyncio.wrap_future(job.future)
        # Watch the client without polling: the body is read, so the next ASGI message is the
        # disconnect (a client that closed or timed out), which frees the job's slots at once.
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # Ray Serve cancels the handler when its client leaves
            w.cancel(job)
            raise
        finally:
            if not gone.done():
                gone.cancel()
        if not waiting.done():
            w.cancel(job)
            metrics.requests.labels("499").inc()  # nginx's "client closed request"
            return Response(status_code=499)
        try:
            result = waiting.result()
        except ServiceError as exc:
            return error(exc.status, str(exc), exc.retry_after)
        pngs = await run_in_threadpool(_png_bytes, result)
        metrics.requests.labels("200").inc()
        headers = {"X-Seed": str(seed), "X-Latency-Seconds": f"{time.perf_counter() - job.created:.3f}", "X-Served-By": SERVED_BY}
        if body.response_format == "png":
            return Response(pngs[0], media_type="image/png", headers=headers)
        return JSONResponse({"model": settings.model, "seed": seed,
                             "images": [{"seed": seed + i, "b64_json": base64.b64encode(p).decode("ascii")} for i, p in enumerate(pngs)]},
                            headers=headers)

    return app


def serve(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Load the model, then serve until SIGTERM/SIGINT; on the signal stop taking requests and
    finish in-flight ones for at most settings.drain_seconds (uvicorn's graceful shutdown)."""
    import uvicorn

    worker = make_worker(settings, Metrics(settings.max_batch))
    worker.load()  # before the port opens: a bad model folder is one error line, not a 503 forever
    app = create_app(settings, worker)

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):  # readyz turns 503 at once, so balancers stop sending
            app.state.invdiff["draining"] = True
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=settings.drain_seconds)
    DrainingServer(config).run()
