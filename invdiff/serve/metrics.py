"""The service's Prometheus metrics (GET /metrics).

One Metrics object per service: the HTTP app counts requests by status, the worker sets the queue,
slot and throughput gauges and observes step and request times. An engine process drives the
parent's metrics over its pipe (engine_process.py), so that /metrics reads one registry.

Under Ray Serve (ray_serve.py) one service runs per replica, and a scrape through Ray's proxy
reaches whichever replica the proxy picks. There each replica's Metrics is made with
`labels={"replica": ...}`, so that /metrics names the replica on every series (two scrapes that
reach different replicas give different series, never one counter that goes down), and with a
`mirror`, which records every change in Ray's own metrics too (ray.serve.metrics): Ray's metrics
agent exports those of every replica on each node's metrics export port, the place a Prometheus
server scrapes.
"""
from __future__ import annotations

import threading
from typing import Callable, Dict, List, Optional, Sequence

# mirror(kind, name, documentation, labelnames, buckets) -> a metric with inc(value, tags),
# set(value, tags) and observe(value, tags) (kind "counter", "gauge" or "histogram"; buckets for a
# histogram): the same metric in another system (ray_serve.py: Ray Serve's metrics).
Mirror = Callable[[str, str, str, Sequence[str], Optional[Sequence[float]]], object]
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
STEP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metrics:
    """The service's Prometheus metrics, in a registry of its own (several services, as in the
    tests, do not collide in the global one).

    labels: label values added to every series /metrics exposes (Ray Serve: {"replica": its id}).
    mirror: also record every change there (the module docstring); None: Prometheus alone."""

    def __init__(self, max_batch: int, labels: Optional[Dict[str, str]] = None, mirror: Optional[Mirror] = None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.labels = dict(labels or {})
        self._mirrored_gauges: List[_Mirrored] = []
        kinds = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}

        def make(kind: str, name: str, documentation: str, labelnames: Sequence[str] = (), buckets=None):
            options = {"buckets": buckets} if buckets is not None else {}
            metric = kinds[kind](name, documentation, labelnames, registry=self.registry, **options)
            if mirror is None:
                return metric
            mirrored = _Mirrored(metric, mirror(kind, name, documentation, labelnames, buckets), labelnames)
            if kind == "gauge":
                self._mirrored_gauges.append(mirrored)
            return mirrored

        self.queue_depth = make("gauge", "invdiff_queue_depth", "images accepted and waiting for an engine slot")
        self.slots_occupied = make("gauge", "invdiff_slots_occupied", "engine slots sampling an image now")
        self.slots_total = make("gauge", "invdiff_slots_total", "engine slots (--max-batch)")
        self.slots_total.set(max_batch)
        self.images_per_second = make("gauge", "invdiff_images_per_second", "images finished per second over the last 10 s")
        self.images = make("counter", "invdiff_images", "images delivered")
        self.requests = make("counter", "invdiff_requests", "requests answered, by HTTP status", ["status"])
        self.latency = make("histogram", "invdiff_request_latency_seconds", "accepted request to its last image",
                            buckets=LATENCY_BUCKETS)
        self.queue_wait = make("histogram", "invdiff_queue_wait_seconds", "accepted request to its first image taking a slot",
                               buckets=LATENCY_BUCKETS)
        self.engine_restarts = make("counter", "invdiff_engine_restarts", "engine processes started again after the engine "
                                    "died or failed to start (engine_process.py)")
        self.step_seconds = make("histogram", "invdiff_step_seconds", "one engine step (UNet batch and the fused update)",
                                 buckets=STEP_BUCKETS)

    def refresh_mirror(self) -> None:
        """Record every gauge's current value in the mirror again. Ray's metrics agent drops a
        gauge that was not set in its last two export intervals (Ray 2.60; 2 s at the shortest),
        so that an idle replica's queue depth and slots would vanish from Ray's export: a replica
        calls this every second (ray_serve.py)."""
        for gauge in self._mirrored_gauges:
            gauge.refresh()

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(_Labelled(self.registry, self.labels) if self.labels else self.registry)


class _Labelled:
    """A registry's samples with `labels` added to each (prometheus_client has no constant labels)."""

    def __init__(self, registry, labels: Dict[str, str]):
        self.registry, self.labels = registry, labels

    def collect(self):
        for family in self.registry.collect():
            family.samples = [sample._replace(labels={**sample.labels, **self.labels}) for sample in family.samples]
            yield family


class _Mirrored:
    """A prometheus_client metric (or one of its labelled children) whose every change is also
    recorded in its mirror, with the label values as the mirror's tags."""

    def __init__(self, metric, mirror, labelnames: Sequence[str] = (), tags: Optional[Dict[str, str]] = None):
        self.metric, self.mirror, self.labelnames, self.tags = metric, mirror, tuple(labelnames), tags
        # A gauge's set and its refresh from another thread, one at a time: a refresh must not
        # put back a value that a set has just replaced.
        self._lock = threading.Lock()

    def labels(self, *values) -> "_Mirrored":
        return _Mirrored(self.metric.labels(*values), self.mirror, (), dict(zip(self.labelnames, map(str, values))))

    def inc(self, amount: float = 1) -> None:
        self.metric.inc(amount)
        if amount > 0:  # Ray's counters refuse 0; nothing to record either
            self.mirror.inc(amount, tags=self.tags)

    def set(self, value: float) -> None:
        with self._lock:
            self.metric.set(value)
            self.mirror.set(value, tags=self.tags)

    def refresh(self) -> None:
        """Set the mirror to the metric's current value(s) again (a gauge: Metrics.refresh_mirror)."""
        with self._lock:
            for family in self.metric.collect():
                for sample in family.samples:
                    self.mirror.set(sample.value, tags={**sample.labels} or self.tags)

    def observe(self, value: float) -> None:
        self.metric.observe(value)
        self.mirror.observe(value, tags=self.tags)
