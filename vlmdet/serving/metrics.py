"""Prometheus metrics of one server, in their own registry (two apps in a process never clash)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

# Seconds: a tiny model on a CPU answers in tens of ms, a 7B batch of 32 on a GPU in seconds.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("vlmdet_serve_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.latency = Histogram("vlmdet_serve_request_seconds", "Time from request to response, by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("vlmdet_serve_batch_size", "Images per generate call", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.batch_seconds = Histogram("vlmdet_serve_batch_seconds", "Time of one batched generate call",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("vlmdet_serve_rejected", "Requests answered 4xx/503 before the model, by reason",
                                ["reason"], registry=r)
        self.queue_depth = Gauge("vlmdet_serve_queue_depth", "Requests holding a place of serve.max_queue: "
                                 "waiting for a batch or decoding their image", registry=r)
        self.body_bytes = Counter("vlmdet_serve_request_body_bytes", "Bytes of /detect request bodies read (the "
                                  "unread rest of a refused body is not)", registry=r)
        self.uploads = Gauge("vlmdet_serve_uploads", "Request bodies being read now (at most serve.max_uploads)",
                             registry=r)
        self.reloads = Counter("vlmdet_serve_reloads", "Reload checks by outcome (unchanged, changed, failed)",
                               ["outcome"], registry=r)
        self.model = Info("vlmdet_serve_model", "The model being served", registry=r)

    def on_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)
