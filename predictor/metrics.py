"""Prometheus metrics: the seed's api_* names plus batching internals (KServe adds its own)."""

from prometheus_client import Counter, Gauge, Histogram

# 1 ms .. 10 s, roughly x2 per step, so p50..p99 resolve from a fast CPU hit to a queued GPU batch.
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)

REQUESTS = Counter(
    "api_requests_total", "Prediction requests by endpoint and outcome (status: success|error; code: HTTP status)",
    ["endpoint", "status", "code"],
)
LATENCY = Histogram(
    "api_request_latency_seconds", "Prediction request latency, from first byte in to response", ["endpoint"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "predictor_batch_size", "Images per forward pass", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
QUEUE_DEPTH = Gauge("predictor_queue_depth", "Images admitted and waiting for a forward pass")
FORWARD_FAILURES = Counter("predictor_forward_failures_total", "Forward passes that raised (their requests got 500)")
SHED = Counter("predictor_shed_requests_total", "Requests refused with 503 because the replica was saturated (calls in flight or batch queue at their limit)")
