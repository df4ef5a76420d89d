"""`--workers 2`: every route is served by the front-end processes (feeding one engine process:
tests/test_engine_process.py), the load spreads over them, and `/metrics` counts the whole replica
whichever worker answers the scrape."""

import base64
import concurrent.futures
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from .conftest import MODEL_NAME, Server, scraped_total

WAVE = 60  # classify calls sent at a time
MAX_REQUESTS = 600


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    metrics_dir = tmp_path_factory.mktemp("metrics")
    # The result cache off: every call computes, as the load the workers share does.
    server = Server("--workers", "2", "--rate_limit_per_minute", "0", "--cache_ttl_s", "0",
                    env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}, timeout=300)
    server.metrics_dir = metrics_dir
    yield server
    server.stop()


def test_every_route_is_served_by_the_workers(two_workers, cifar_jpegs):
    url, (name, data) = two_workers.url, next(iter(cifar_jpegs.items()))
    pixels = np.zeros((1, 32, 32, 3), np.uint8).ravel().tolist()
    with httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/health").json()["status"] == "healthy"
        assert client.get("/docs").status_code == 200
        assert client.post("/classify/image", files={"file": (name, data, "image/jpeg")}).json()["predicted_class"]
        assert len(client.post("/classify/batch", files=[("files", data), ("files", data)]).json()["results"]) == 2
        assert client.post(f"/v1/models/{MODEL_NAME}:predict",
                           json={"instances": [{"image": {"b64": base64.b64encode(data).decode()}}]}
                           ).status_code == 200
        v2 = client.post(f"/v2/models/{MODEL_NAME}/infer", json={"inputs": [
            {"name": "input-0", "shape": [1, 32, 32, 3], "datatype": "UINT8", "data": pixels}]})
        assert v2.status_code == 200, v2.text
        assert client.post("/classify/image", files={"file": ("x.jpg", b"not an image", "image/jpeg")}).status_code == 415
        # Grad-CAM's fp32 pass runs in the engine process too: the front ends hold no weights.
        explained = client.post(f"/v1/models/{MODEL_NAME}:explain",
                                json={"instances": [{"image": {"b64": base64.b64encode(data).decode()}}]})
        assert explained.status_code == 200 and len(explained.json()["explanations"][0]["heatmap"]) == 32, explained.text


def counted(path, endpoint: str) -> float:
    """The classify calls one process's counter file holds."""
    return sum(sample.value for metric in MultiProcessCollector.merge([str(path)]) for sample in metric.samples
               if sample.name == "api_requests_total" and sample.labels.get("endpoint") == endpoint)


def test_metrics_count_every_worker(two_workers, cifar_jpegs):
    images = list(cifar_jpegs.values())
    before = scraped_total(two_workers.url, "classify_image")

    def one(i: int) -> int:  # a connection per call: the kernel spreads the accepts over the workers
        return httpx.post(f"{two_workers.url}/classify/image", files={"file": images[i % len(images)]},
                          headers={"Connection": "close"}, timeout=60).status_code

    def served_by() -> list:
        """The workers whose counter file holds classify calls (each process writes its own)."""
        return [path for path in two_workers.metrics_dir.glob("counter_*.db") if counted(path, "classify_image")]

    # Which worker accepts a connection is the kernel's choice: send waves until both have served some.
    sent = 0
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        while sent < MAX_REQUESTS and (sent == 0 or len(served_by()) < 2):
            assert set(pool.map(one, range(sent, sent + WAVE))) == {200}
            sent += WAVE
    assert len(served_by()) >= 2, f"one worker accepted all {sent} connections"
    # So one worker's count alone is short; every scrape, whichever worker answers it, has them all.
    for _ in range(6):
        assert scraped_total(two_workers.url, "classify_image") - before == sent


def test_torch_workers_keep_their_thread_count_and_leave_no_metrics_files():
    """--intra_op_threads reaches every spawned worker (torch's thread count is per process), and the
    metrics directory the server made for its workers is gone once it stops."""
    made_before = set(Path(tempfile.gettempdir()).glob("predictor-metrics-*"))
    server = Server("--workers", "2", "--engine", "torch", "--precision", "fp32", "--compile", "false",
                    "--intra_op_threads", "1", "--rate_limit_per_minute", "0", timeout=300)
    try:
        assert set(Path(tempfile.gettempdir()).glob("predictor-metrics-*")) - made_before, "no metrics directory made"
        # A new connection per call: the kernel spreads them over both workers.
        answers = [httpx.get(f"{server.url}/v2/models/{MODEL_NAME}", headers={"Connection": "close"}, timeout=30).json()
                   for _ in range(12)]
        assert {a["parameters"]["intra_op_threads"] for a in answers} == {1}, answers
    finally:
        server.stop()
    assert set(Path(tempfile.gettempdir()).glob("predictor-metrics-*")) <= made_before
