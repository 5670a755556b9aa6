"""The `invdiff serve` app as a Ray Serve deployment: one replica per GPU, Ray's proxy routes.

    invdiff serve --model DIR --ray --replicas 4            # starts or joins Ray, serves on :8000
    serve run invdiff.serve.ray_serve:app_builder model=DIR replicas=4   # the same, by Ray's CLI

Each replica is the same FastAPI app as `invdiff serve` (app.create_app), built on the replica
after its model is loaded (Ray Serve's late-bound ingress), with its own engine worker; Ray Serve
spreads requests over the replicas and scales them. Nothing here routes requests itself.

Health: Ray Serve calls each replica's `check_health` every HEALTH_CHECK_PERIOD_S and replaces a
replica after three failed checks in a row (an exception, or no answer within
HEALTH_CHECK_TIMEOUT_S). `InvDiffReplica.check_health` raises what GET /healthz reports: once the
engine process died and could not be restarted (engine_process.py), Ray replaces the replica;
while the engine restarts it passes, as a restart (seconds) is cheaper than a new replica (a new
actor, and the model loaded again). A replica whose first engine warm-up failed fails the check
too (app.engine_problem).

Metrics: a scrape of GET /metrics through Ray's proxy reaches one replica, whichever the proxy
picks; so each replica labels every series of its /metrics with `replica` (its Ray Serve replica
id), and records the same metrics through ray.serve.metrics (`ray_metric`), which Ray's metrics
agent on each node exports, tagged with deployment, replica and application, as
ray_invdiff_images_total and so on on the node's metrics export port (`run`'s
metrics_export_port, `ray start --metrics-export-port`): that port is what Prometheus scrapes.

Shutdown: `run` (what `invdiff serve --ray` runs) serves until SIGTERM or SIGINT, then takes Ray
Serve's own graceful path (`shutdown`): the app is deleted, so that each replica stops taking
requests and finishes its in-flight ones, for at most --drain-seconds (the deployment's
graceful_shutdown_timeout_s, after which Ray kills the replica), then Serve and Ray stop and the
process exits with status 0. A second signal ends it at once. A replica begins its app's drain
(app.Drain) when Ray begins its graceful shutdown (`on_graceful_shutdown`), with a deadline
ANSWER_BEFORE_KILL_S short of Ray's: a request still running then gets the service's JSON 503 with
Retry-After, as under `invdiff serve`, instead of a connection Ray cuts when it kills the replica.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import threading
import time
from typing import Dict, List, Optional

from .app import create_app, engine_problem, make_worker, served_by
from .metrics import Metrics
from .settings import ServeSettings

# Ray Serve's defaults are 10 s and 30 s. A check is one call on the replica (worker.health(): a
# lock and a comparison), so a short period costs nothing, and a replica whose engine gave up is
# replaced about 3 x 5 s later instead of 30 s. The timeout covers an event loop busy with
# requests (PNG encoding of large batches) without mistaking it for a dead replica.
HEALTH_CHECK_PERIOD_S = 5.0
HEALTH_CHECK_TIMEOUT_S = 10.0
# The Serve application's name (`serve run` and `run` deploy it under it; `shutdown` deletes it).
APP_NAME = "invdiff"
# `shutdown` waits for the application's deletion for the drain plus this (Ray's controller stops
# the replicas in its own loop, and a replica's engine stops after its drain) before it stops Serve.
DELETE_GRACE_S = 15.0
# A replica answers a request still running at its drain deadline this long before Ray's
# controller kills it (graceful_shutdown_timeout_s after it stopped the replica), or a quarter of a
# shorter drain: time for the 503 to reach Ray's proxy and for Ray's drain loop
# (graceful_shutdown_wait_loop_s, a tenth of the drain) to see the replica idle.
ANSWER_BEFORE_KILL_S = 1.0
# A request reaching a replica whose engine restarts waits this long for it (ServeSettings.
# hold_while_restarting_s): the readiness goal after an engine death; a restart measured 6 to 9 s
# on the CPU (benchmarks/RESULTS.md, the soak).
HOLD_WHILE_RESTARTING_S = 30.0
# How often a replica sets its Ray gauges again (Metrics.refresh_mirror): Ray drops a gauge not set
# within two export intervals, at least 2 s; one set per gauge per second costs nothing.
RAY_GAUGE_REFRESH_S = 1.0


def drain_options(drain_seconds: float) -> Dict[str, float]:
    """The deployment's drain (Ray Serve's replica shutdown): a replica that is stopped takes no
    new requests and checks every graceful_shutdown_wait_loop_s whether its in-flight ones are
    done; Ray's controller kills it graceful_shutdown_timeout_s after the stop. The loop is a
    tenth of the drain, within 0.1 s and Ray's default 2 s, so that a replica leaves soon after
    its last request."""
    return {"graceful_shutdown_timeout_s": float(drain_seconds),
            "graceful_shutdown_wait_loop_s": min(2.0, max(0.1, drain_seconds / 10))}


def answer_deadline(drain_seconds: float) -> float:
    """Seconds after Ray begins a replica's graceful shutdown at which the replica answers the
    requests still running (app.Drain): ANSWER_BEFORE_KILL_S, or a quarter of a shorter drain,
    before Ray kills it at drain_seconds."""
    return drain_seconds - min(ANSWER_BEFORE_KILL_S, drain_seconds / 4)


def ray_metric(kind: str, name: str, documentation: str, labelnames, buckets):
    """metrics.Mirror for Ray: the Ray Serve metric that mirrors one of Metrics'. Ray adds the
    deployment, replica and application tags, and its metrics agent exports it as ray_<name>
    (a counter as ray_<name>_total) on the node's metrics export port."""
    from ray.serve import metrics

    tag_keys = tuple(labelnames) or None
    if kind == "histogram":
        return metrics.Histogram(name, documentation, boundaries=list(buckets), tag_keys=tag_keys)
    return {"counter": metrics.Counter, "gauge": metrics.Gauge}[kind](name, documentation, tag_keys=tag_keys)


def replica_id() -> Optional[str]:
    """This Ray Serve replica's id (the `replica` tag Ray gives its metrics), or None outside a replica."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        return serve.get_replica_context().replica_tag
    except RayServeException:
        return None


def _keep_ray_gauges(metrics: Metrics) -> None:
    """The replica's thread that keeps its gauges in Ray's export (Metrics.refresh_mirror), for
    the replica's life (a daemon thread: it ends with the actor's process)."""
    while True:
        time.sleep(RAY_GAUGE_REFRESH_S)
        try:
            metrics.refresh_mirror()
        except Exception:  # noqa: BLE001 (Ray shutting down under it: the next round, or the process's end)
            logging.getLogger("ray.serve").debug("refreshing the Ray gauges failed", exc_info=True)


def on_graceful_shutdown(callback) -> bool:
    """Call `callback()` (from Ray's event loop; it must not block) when Ray Serve begins this
    replica's graceful shutdown: the controller stopped it (the app deleted or redeployed, the
    replica scaled down or replaced) and will kill it graceful_shutdown_timeout_s later.

    Ray Serve tells a replica's own code only once in-flight requests are done (__del__, the ASGI
    lifespan's shutdown), too late for a request still running when Ray kills the replica. No
    public hook says when the shutdown begins, so this wraps the replica's private
    perform_graceful_shutdown (Ray 2.60's ReplicaActor._replica_impl, which the controller's stop
    calls). False, and the caller's requests keep Ray's behaviour, when Ray's internals differ;
    tests/test_service_ray.py checks it on the Ray installed."""
    import ray

    for actor in list(getattr(ray._private.worker.global_worker, "actors", {}).values()):
        runtime = getattr(actor, "_replica_impl", None)
        begin = getattr(runtime, "perform_graceful_shutdown", None)
        if begin is None:
            continue

        async def perform_graceful_shutdown(begin=begin):
            callback()
            await begin()

        runtime.perform_graceful_shutdown = perform_graceful_shutdown
        return True
    return False


class InvDiffReplica:
    """One replica: the engine worker, loaded in the constructor, and the app built around it
    (Ray Serve's late-bound ingress: `deployment` wraps this class with serve.ingress())."""

    def __init__(self, fields: Dict):
        self.settings = ServeSettings(**fields)
        self.replica = replica_id()  # None when constructed outside Ray Serve (tests)
        if self.replica is None:
            metrics = Metrics(self.settings.max_batch)
        else:
            metrics = Metrics(self.settings.max_batch, labels={"replica": self.replica}, mirror=ray_metric)
            threading.Thread(target=_keep_ray_gauges, args=(metrics,), name="invdiff-ray-gauges", daemon=True).start()
        self.worker = make_worker(self.settings, metrics)
        self.worker.load()
        logging.getLogger("ray.serve").info("X-Served-By %s is %s:%d, replica %s", served_by(self.settings), socket.gethostname(),
                                            os.getpid(), self.replica)

    def __serve_build_asgi_app__(self):
        # The app's drain ends before Ray kills the replica, so that its answers get out first.
        # And a request that arrives while the engine restarts waits for it (in flight to Ray's
        # router, which then prefers the other replicas), instead of a 503 at once.
        settings = dataclasses.replace(self.settings, drain_seconds=answer_deadline(self.settings.drain_seconds),
                                       hold_while_restarting_s=HOLD_WHILE_RESTARTING_S)
        app = create_app(settings, self.worker)
        if not on_graceful_shutdown(app.state.drain.begin):
            logging.getLogger("ray.serve").warning(
                "cannot tell when Ray Serve begins this replica's shutdown (Ray's internals changed): a request still "
                "running at the drain deadline gets Ray's 500, not the service's 503")
        return app

    def check_health(self) -> None:
        """Ray Serve's health check: raise when the engine can no longer sample (as GET /healthz's
        503: it gave up restarting, or its first warm-up failed), so that Ray replaces this replica."""
        problem = engine_problem(self.worker)
        if problem is not None:
            raise RuntimeError(problem)


def deployment(settings: ServeSettings, replicas: int = 1, gpus_per_replica: Optional[float] = None,
               cpus_per_replica: float = 1.0, max_ongoing_requests: Optional[int] = None):
    """A bound Ray Serve application of `replicas` copies of the service.

    gpus_per_replica: None = 1 when the settings' device is CUDA (or unset and Ray sees GPUs),
    else 0. max_ongoing_requests: the requests Ray sends one replica at once (None: the
    replica's slots plus its queue, so that overload reaches the replica's own 429)."""
    from ray import serve

    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    if gpus_per_replica is None:
        gpus_per_replica = 1.0 if (settings.device or "").startswith("cuda") else 0.0
    ongoing = max_ongoing_requests or settings.max_batch + settings.max_queue

    options = {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica}
    replica = serve.deployment(serve.ingress()(InvDiffReplica), name="invdiff", num_replicas=replicas, ray_actor_options=options,
                               max_ongoing_requests=ongoing, **drain_options(settings.drain_seconds),
                               health_check_period_s=HEALTH_CHECK_PERIOD_S, health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S)
    return replica.bind(dataclasses.asdict(settings))


def app_builder(args: Dict[str, str]):
    """For `serve run invdiff.serve.ray_serve:app_builder model=DIR replicas=N max_batch=16 ...`."""
    args = dict(args)
    replicas = int(args.pop("replicas", 1))
    gpus = args.pop("gpus_per_replica", None)
    cpus = float(args.pop("cpus_per_replica", 1.0))
    fields = {f.name: f.type for f in dataclasses.fields(ServeSettings)}
    unknown = sorted(set(args) - set(fields))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown}; known: replicas, gpus_per_replica, cpus_per_replica, {sorted(fields)}")
    casts = {"max_batch": int, "max_queue": int, "max_images_per_request": int, "drain_seconds": float, "eta_below_band": float,
             "guidance_every": int,
             "engine_process": lambda v: v.lower() in ("1", "true", "yes"),
             "expose_details": lambda v: v.lower() in ("1", "true", "yes")}
    settings = ServeSettings(**{k: casts.get(k, str)(v) for k, v in args.items()})
    return deployment(settings, replicas, float(gpus) if gpus is not None else None, cpus)


def run(settings: ServeSettings, replicas: int, host: str = "127.0.0.1", port: int = 8000,
        gpus_per_replica: Optional[float] = None, cpus_per_replica: float = 1.0, blocking: bool = True,
        metrics_export_port: Optional[int] = None):
    """Start (or join, with RAY_ADDRESS) a Ray cluster and serve on host:port. blocking (from the
    main thread): until SIGTERM or SIGINT, then drain and stop (`shutdown`) and return None; a
    signal while the app deploys is acted on once it is deployed. Else return the app's handle.
    metrics_export_port: where the local Ray this starts exports the replicas' metrics for
    Prometheus (None: a port Ray picks; logged either way). A joined cluster exports on the ports
    its nodes were started with."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(include_dashboard=False, _metrics_export_port=metrics_export_port)
    exports = sorted(f"{node['NodeManagerAddress']}:{node['MetricsExportPort']}" for node in ray.nodes()
                     if node.get("Alive") and node.get("MetricsExportPort"))
    _log().info("Ray exports the replicas' metrics (ray_invdiff_*) for Prometheus at %s",
                ", ".join(f"http://{where}/metrics" for where in exports) or "no node yet")
    # After ray.init: Ray installs SIGTERM handlers of its own as it starts (its driver's
    # sys.exit, its core worker's stack dump), which cut in-flight requests.
    signals = Signals() if blocking else None
    try:
        serve.start(http_options={"host": host, "port": port})
        handle = serve.run(deployment(settings, replicas, gpus_per_replica, cpus_per_replica), name=APP_NAME, route_prefix="/")
        if signals is None:
            return handle
        sig = signals.wait()
    finally:
        if signals is not None:
            signals.restore()  # a second signal ends the process as Ray would have
    _log().info("%s: draining for at most %g s (--drain-seconds)", signal.Signals(sig).name, settings.drain_seconds)
    shutdown(settings.drain_seconds)
    return None


def _log() -> logging.Logger:
    return logging.getLogger("ray.serve")  # Ray prints it on the driver's terminal


class Signals:
    """Records SIGTERM and SIGINT from its creation (on the main thread) until `restore`, which
    puts the handlers that were there before back in place."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("serving until a signal needs the main thread (signal handlers belong to it)")
        self.received: List[int] = []
        self._previous = {sig: signal.signal(sig, self._record) for sig in signals}

    def _record(self, sig, frame) -> None:
        self.received.append(sig)

    def wait(self, poll_s: float = 0.5) -> int:
        """The first signal received, once there is one. Polls instead of signal.pause(): the
        kernel may hand the signal to one of Ray's threads, and Python runs the handler on the
        main thread only when it next runs bytecode."""
        while not self.received:
            time.sleep(poll_s)
        return self.received[0]

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def shutdown(drain_seconds: float, name: str = APP_NAME) -> None:
    """Ray Serve's graceful shutdown of the app: delete it, so that its replicas stop taking
    requests and finish their in-flight ones (for at most `drain_seconds`: drain_options), and
    wait for that; then stop Serve unless other applications run on it, and disconnect from Ray
    (which stops a local Ray that this process started)."""
    import ray
    from ray import serve

    started = time.monotonic()
    serve.delete(name, _blocking=False)
    deadline = started + drain_seconds + DELETE_GRACE_S
    while True:
        app = serve.status().applications.get(name)
        if app is None or app.status == "NOT_STARTED":  # (a str enum)
            _log().info("application %r drained and deleted in %.1f s", name, time.monotonic() - started)
            break
        if time.monotonic() > deadline:
            _log().warning("application %r not deleted within %g s; stopping Serve", name, drain_seconds + DELETE_GRACE_S)
            break
        time.sleep(0.2)
    if not serve.status().applications:
        serve.shutdown()
    ray.shutdown()
