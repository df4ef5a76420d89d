"""Shared fixtures: real server processes (`python -m predictor ...`) on free ports, and test images."""

import io
import os
import re
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
IMAGES = Path(__file__).resolve().parent / "images"
HOLDOUT = Path(__file__).resolve().parent / "data" / "holdout.tar.gz"
MODEL_NAME = "cifar10-resnet18"


def read_http_response(sock: socket.socket) -> tuple[int, bytes, bytes]:
    """(status, head, body) of one whole HTTP/1.1 response read from a raw socket (head and body may
    arrive in separate segments); fails if the connection closes with no answer."""
    data = b""
    while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), f"the connection closed with no answer: {data[:200]!r}"
    length = int(re.search(rb"(?im)^content-length:\s*(\d+)", head).group(1))
    while len(body) < length and (chunk := sock.recv(65536)):
        body += chunk
    return int(head.split()[1]), head, body


def error_fields(body: object, path: str | None = None) -> tuple[str, str]:
    """(code, message) of an error body: {"error": {"code", "message"}}, or on the Open Inference
    Protocol's /v2/ routes {"error": "<message>", "code": "<code>"} (OIP's `error` is a string). With
    `path`, the form must be the one of that path; without, either form is accepted."""
    assert isinstance(body, dict), body
    oip = isinstance(body.get("error"), str) if path is None else path.startswith("/v2/")
    if oip:
        assert set(body) == {"error", "code"} and isinstance(body["error"], str) and isinstance(body["code"], str), body
        code, message = body["code"], body["error"]
    else:
        assert set(body) == {"error"} and isinstance(body["error"], dict), body
        assert set(body["error"]) == {"code", "message"}, body
        code, message = body["error"]["code"], body["error"]["message"]
    assert isinstance(code, str) and code and isinstance(message, str) and message, body
    return code, message


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running `python -m predictor` process, with the defaults that ship unless `args` say otherwise
    (on a CPU: the ONNX Runtime int8 engine), and an HTTP client bound to it."""

    def __init__(self, *args: str, env: dict | None = None, timeout: float = 180):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"predictor-test-{self.port}.log"
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "predictor", "--http_port", str(self.port), "--enable_grpc", "false", *args],
            cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )
        self.client = httpx.Client(base_url=self.url, timeout=60)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if self.client.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        self.client.close()
        stop_process(self.process)
        self._log.close()


def stop_process(process: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM, then SIGKILL if the process has not exited within `grace` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="session")
def server():
    """The predictor with its shipped weights and default settings, gRPC on as well.

    The per-caller rate limit is off: the whole suite calls from one address (test_hardening
    tests the limit on a server of its own).
    """
    grpc_port = free_port()
    srv = Server("--enable_grpc", "true", "--grpc_port", str(grpc_port), "--rate_limit_per_minute", "0")
    srv.grpc_port = grpc_port
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def strict_server():
    """The predictor with small limits, to exercise every limit quickly."""
    srv = Server("--max_body_bytes", "200000", "--max_batch_files", "4", "--max_image_side", "512", "--max_batch_size", "8",
                 "--rate_limit_per_minute", "0")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def cifar_jpegs() -> dict[str, bytes]:
    """Real CIFAR-10 training JPEGs shipped in tests/images, by file name."""
    return {p.name: p.read_bytes() for p in sorted(IMAGES.glob("*.jpg"))}


@pytest.fixture(scope="session")
def holdout() -> list[tuple[bytes, int]]:
    """2,000 held-out CIFAR-10 JPEGs (validation split, never trained or calibrated on) with their labels."""
    from predictor.cifar import CLASSES

    with tarfile.open(HOLDOUT) as tar:
        return [(tar.extractfile(member).read(), CLASSES.index(member.name.split("/")[0]))
                for member in tar.getmembers() if member.isfile()]


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def multipart(files: list[bytes]) -> list[tuple]:
    """httpx's `files=` for a /classify/batch or /classify/jobs upload of these JPEG bytes."""
    return [("files", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(files)]


def calls_in_flight(base_url: str) -> float:
    """predictor_in_flight_requests as the server's /metrics shows it now: the calls it has admitted."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    return float(re.search(r"^predictor_in_flight_requests (\S+)$", text, re.M).group(1))


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    """The response is an error of `status` (and `code`), in the shape its path uses; its body."""
    assert response.status_code == status, response.text
    body = response.json()
    found, _ = error_fields(body, response.request.url.path)
    if code:
        assert found == code, body
    return body


def scraped_total(url: str, endpoint: str) -> float:
    """api_requests_total of `endpoint`, summed over statuses (and worker processes)."""
    # A new connection per scrape, so scrapes land on either worker.
    text = httpx.get(f"{url}/metrics", headers={"Connection": "close"}, timeout=30).text
    return sum(float(value) for value in re.findall(
        rf'^api_requests_total\{{[^}}]*endpoint="{re.escape(endpoint)}"[^}}]*\}} (\S+)$', text, re.M))


def wait_until(condition, timeout: float, what: str, interval: float = 0.1):
    """Poll `condition` until it returns something true and return that; fail after `timeout` seconds (a
    bound, not a pace) with its last value, or the connection or parse error it last raised."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            if found := condition():
                return found
            last = found
        except (httpx.TransportError, ValueError) as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"not within {timeout} s: {what} (last: {last!r})")


def wait_for_job(server: "Server", job_id: str, statuses: tuple[str, ...], headers: dict | None = None,
                 timeout: float = 120, **params) -> dict:
    """The job's status page once its status is one of `statuses` (each read must be a 200)."""
    def page() -> dict | None:
        response = server.client.get(f"/classify/jobs/{job_id}", params=params, headers=headers)
        assert response.status_code == 200, response.text
        return response.json() if response.json()["status"] in statuses else None

    return wait_until(page, timeout, f"job {job_id} to be {' or '.join(statuses)}", interval=0.2)


# -- tiers -----------------------------------------------------------------------------------------
# `make test` runs every test but the image suite: the whole truth. `make test-fast` (-m "not slow")
# is the edit-run loop: unit and in-process tests only. Slow: a module whose tests start real server
# processes, Redis, a browser or training; a test that uses a real process's fixture or the 2,000
# held-out images; checkov; and tests marked `slow` by hand (compilation, subprocess starts).
SLOW_MODULES = {"test_api", "test_cache", "test_explain", "test_hardening", "test_hostile", "test_jobs", "test_training",
                "test_ui", "test_workers", "test_deploy_runtime"}
SLOW_FIXTURES = {"server", "strict_server", "predictor", "prometheus", "two_workers", "holdout"}


def is_slow(item) -> bool:
    return (item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES or bool(SLOW_FIXTURES & set(item.fixturenames))
            or "checkov" in item.name or item.get_closest_marker("slow") is not None)


# -- the image suite -------------------------------------------------------------------------------
# Tests marked `image` run the built container image (tests/test_image.py, `make test-image`). They
# are deselected unless the -m expression names them, so `make test` / plain `pytest` never need an
# image, podman or root.
def pytest_configure(config):
    config.addinivalue_line("markers", "image: runs the built container image (make test-image; selected by -m image)")
    config.addinivalue_line("markers", "slow: real processes, compilation or the held-out set (deselected by make test-fast)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if is_slow(item):
            item.add_marker(pytest.mark.slow)
    if "image" in (config.getoption("markexpr") or ""):
        return
    deselected = [item for item in items if item.get_closest_marker("image")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("image")]
