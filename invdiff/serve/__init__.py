"""Serving, in one place: `invdiff serve`, the sampling engine behind an HTTP service.

    settings.py        ServeSettings (what the server was started with), the per-request caps (the body's
                       size too) and the start-up check of the address to listen on
    errors.py          ServiceError: a request ended with an HTTP status and a message
    metrics.py         Metrics: the Prometheus metrics of GET /metrics
    admission.py       Admission: the queue count, 429 with Retry-After when full, 503 when draining
    worker.py          the Worker protocol, ImageJob, and EngineWorker (the thread that owns the model)
    engine_process.py  EngineProcess: that worker in a process of its own (the default), restarted when it dies
    asgi.py            the pure-ASGI layers around the app: 413/415 before a body is parsed, X-Served-By
                       and invdiff_requests_total on every response; JSON decode errors by field
    app.py             the FastAPI app (create_app, make_worker) and `serve` (uvicorn)
    ray_serve.py       the app as a Ray Serve deployment

What is sampled, and how, lives in invdiff.sampling (the engine, the sampler); this package only
takes requests to it. Imports run one way: settings, errors, metrics -> admission -> worker ->
engine_process -> app -> ray_serve (asgi: settings, metrics -> asgi -> app), and serving imports sampling, never the reverse;
tests/test_sampling_imports.py checks both. The names below load their module on first use
(PEP 562), so `import invdiff.serve` imports neither torch nor FastAPI.
"""
from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "ServeSettings": "settings", "MAX_STEPS": "settings", "MAX_GUIDANCE_SCALE": "settings", "MAX_STRENGTH": "settings",
    "MAX_BODY_BYTES": "settings", "listen_sockets": "settings",
    "ServiceError": "errors",
    "Metrics": "metrics",
    "Admission": "admission",
    "Worker": "worker", "ImageJob": "worker", "EngineWorker": "worker",
    "EngineProcess": "engine_process",
    "create_app": "app", "make_worker": "app", "serve": "app",
    "deployment": "ray_serve", "app_builder": "ray_serve",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
