"""Prometheus metrics: the seed's api_* names, drift signals and batching internals (KServe adds its own).

With `--workers N` (N > 1) every worker process counts in files under PROMETHEUS_MULTIPROC_DIR (set by
`python -m predictor` before prometheus_client is imported), and `/metrics` sums them: a scrape sees
the replica, whichever worker answers it.
"""

import os

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, exposition, multiprocess

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
QUEUE_DEPTH = Gauge("predictor_queue_depth", "Images admitted and waiting for a forward pass",
                    multiprocess_mode="livesum")
IN_FLIGHT = Gauge("predictor_in_flight_requests", "Prediction calls admitted (HTTP and gRPC) and not yet answered; "
                  "--max_in_flight is its limit per process", multiprocess_mode="livesum")
FORWARD_FAILURES = Counter("predictor_forward_failures_total", "Forward passes that raised (their requests got 500)")
SHED = Counter("predictor_shed_requests_total", "Requests refused with 503 because the replica was saturated (calls in flight or batch queue at their limit)")
# What the model answers, not only how fast: the class mix and confidence per model version show
# data drift and let a canary be compared with the stable version.
PREDICTIONS = Counter("predictor_predictions_total", "Classified images by predicted class and model version",
                      ["predicted_class", "model_version"])
CONFIDENCE = Histogram("predictor_confidence", "Confidence (calibrated probability) of the predicted class",
                       ["model_version"], buckets=(0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0))


# The api_* series of each (endpoint, status) seen, looked up once: `labels()` validates and locks on
# every call, and recording itself was a tenth of a refusal's cost at the front door. Bounded: a fixed
# set of endpoints and statuses.
_CALL_SERIES: dict[tuple[str, int], tuple] = {}


def record_call(endpoint: str, status: int, seconds: float) -> None:
    """Count one prediction call (HTTP or gRPC) under the seed's api_* names, with the HTTP status its
    outcome corresponds to."""
    series = _CALL_SERIES.get((endpoint, status))
    if series is None:
        series = _CALL_SERIES[endpoint, status] = (
            REQUESTS.labels(endpoint, "success" if status < 400 else "error", str(status)), LATENCY.labels(endpoint))
    series[0].inc()
    series[1].observe(seconds)


def record_prediction(predicted_class: str, confidence: float, model_version: str) -> None:
    """Count one classified image for the drift and A/B signals."""
    PREDICTIONS.labels(predicted_class, model_version).inc()
    CONFIDENCE.labels(model_version).observe(confidence)


def exposition_of(accept: str | None) -> tuple[bytes, str]:
    """(body, content type) of a scrape: this process's registry, or every worker's files summed."""
    registry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    encoder, content_type = exposition.choose_encoder(accept)
    return encoder(registry), content_type
