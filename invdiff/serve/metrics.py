"""The service's Prometheus metrics (GET /metrics).

One Metrics object per service: the HTTP app counts requests by status, the worker sets the queue,
slot and throughput gauges and observes step and request times. An engine process drives the
parent's metrics over its pipe (engine_process.py), so that /metrics reads one registry.
"""
from __future__ import annotations


class Metrics:
    """The service's Prometheus metrics, in a registry of its own (several services, as in the
    tests, do not collide in the global one)."""

    def __init__(self, max_batch: int):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("invdiff_queue_depth", "images accepted and waiting for an engine slot", registry=r)
        self.slots_occupied = Gauge("invdiff_slots_occupied", "engine slots sampling an image now", registry=r)
        self.slots_total = Gauge("invdiff_slots_total", "engine slots (--max-batch)", registry=r)
        self.slots_total.set(max_batch)
        self.images_per_second = Gauge("invdiff_images_per_second", "images finished per second over the last 10 s", registry=r)
        self.images = Counter("invdiff_images", "images delivered", registry=r)
        self.requests = Counter("invdiff_requests", "requests answered, by HTTP status", ["status"], registry=r)
        buckets = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
        self.latency = Histogram("invdiff_request_latency_seconds", "accepted request to its last image", buckets=buckets, registry=r)
        self.queue_wait = Histogram("invdiff_queue_wait_seconds", "accepted request to its first image taking a slot",
                                    buckets=buckets, registry=r)
        self.engine_restarts = Counter("invdiff_engine_restarts", "engine processes started again after the engine died or "
                                       "failed to start (engine_process.py)", registry=r)
        self.step_seconds = Histogram("invdiff_step_seconds", "one engine step (UNet batch and the fused update)",
                                      buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5), registry=r)

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
