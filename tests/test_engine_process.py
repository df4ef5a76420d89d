"""`--workers N`: N front-end processes feeding one engine process (the server's first process, which
loads the model once). Its life on real processes: readiness only once every front end has connected,
a forward pass joining two front ends' calls, the engine's death (waiting calls get 503, readiness 503
at once, the front ends stop), a front end's death (only its own calls lost; it is restarted), and
SIGTERM (the front ends drain first while the engine still serves them)."""

import asyncio
import concurrent.futures
import os
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from predictor.config import PACKAGED_DIR
from predictor.engines.engine_server import EngineServer
from predictor.engines.link import Layout
from predictor.engines.onnx_int8 import OnnxEngine, onnx_int8_path
from predictor.engines.reference import ReferenceNetwork
from predictor.engines.remote import RemoteEngine
from predictor.weights import verified_weights

from .conftest import Server, wait_until

IMAGES = sorted((Path(__file__).parent / "images").glob("*.jpg"))


def front_ends(server: Server) -> set[int]:
    """The server's front-end processes (its children, forked: they share its command line)."""
    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children").read_text().split()
    return {int(pid) for pid in children if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()}


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class Load:
    """`clients` threads sending /classify/image in a loop, each on its own keep-alive connection,
    recording (time sent, time answered, status, error code or the exception's type)."""

    def __init__(self, url: str, clients: int = 8):
        self.url, self.results, self._stop = url, [], threading.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(clients)
        self._futures = [self._pool.submit(self._client, i) for i in range(clients)]

    def _client(self, i: int) -> None:
        with httpx.Client(base_url=self.url, timeout=20) as client:
            while not self._stop.is_set():
                sent = time.monotonic()
                try:
                    answer = client.post("/classify/image", files={"file": IMAGES[i % len(IMAGES)].read_bytes()})
                    code = answer.json().get("error", {}).get("code") if answer.status_code != 200 else None
                    self.results.append((sent, time.monotonic(), answer.status_code, code))
                except httpx.TimeoutException as exc:  # a call left hanging: what must never happen
                    self.results.append((sent, time.monotonic(), None, type(exc).__name__))
                except httpx.TransportError as exc:  # the process stopped: connection refused or closed
                    self.results.append((sent, time.monotonic(), None, type(exc).__name__))
                    time.sleep(0.05)

    def stop(self) -> list[tuple]:
        self._stop.set()
        for future in self._futures:
            future.result(timeout=60)
        self._pool.shutdown()
        return self.results


@pytest.fixture(scope="module")
def onnx_engine() -> OnnxEngine:
    _, card = verified_weights(PACKAGED_DIR)
    return OnnxEngine(onnx_int8_path(PACKAGED_DIR, card), max_batch_size=32, threads=1)


def test_front_ends_are_ready_only_once_every_one_has_connected(onnx_engine):
    reference = ReferenceNetwork.from_file(verified_weights(PACKAGED_DIR)[0], threads=1)
    server = EngineServer(onnx_engine, reference, front_ends=2, max_batch_images=64)
    server.start()
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), np.uint8)

    async def scenario() -> None:
        first, second = (RemoteEngine.describing(onnx_engine, server.address, Layout(32), reference.fc_weight)
                         for _ in range(2))
        await first.connect()
        # Served already (start-up traffic, the engine's own checks), but not ready: one front end is missing.
        np.testing.assert_allclose(await first.logits_async(images), onnx_engine.logits(images), rtol=1e-5, atol=1e-5)
        assert not first.available()
        await second.connect()
        for _ in range(100):
            if first.available() and second.available():
                break
            await asyncio.sleep(0.01)
        assert first.available() and second.available()
        logits, features = await second.reference_async(images)  # :explain's pass, also in the engine process
        expected_logits, expected_features = reference.run(images)
        np.testing.assert_allclose(logits, expected_logits, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(features, expected_features, rtol=1e-4, atol=1e-4)

    asyncio.run(scenario())


def test_a_forward_pass_joins_the_calls_of_two_front_ends():
    # Each front end's batcher passes one image at a time: a pass of two images can only hold both's.
    server = Server("--workers", "2", "--max_batch_size", "1", "--engine_max_batch_size", "2",
                    "--rate_limit_per_minute", "0", "--cache_ttl_s", "0", timeout=300)
    try:
        def one(i: int) -> int:  # a connection per call: the kernel spreads the accepts over the front ends
            return httpx.post(f"{server.url}/classify/image", files={"file": IMAGES[i % len(IMAGES)].read_bytes()},
                              headers={"Connection": "close"}, timeout=60).status_code

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            assert set(pool.map(one, range(400))) == {200}
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
        mixed = float(re.search(r'^predictor_engine_passes_total\{front_ends="several"\} (\S+)$', metrics, re.M).group(1))
        passes = float(re.search(r"^predictor_engine_pass_images_count (\S+)$", metrics, re.M).group(1))
        one_image = float(re.search(r'^predictor_engine_pass_images_bucket\{le="1.0"\} (\S+)$', metrics, re.M).group(1))
        front_end_largest = float(re.search(r'^predictor_batch_size_bucket\{le="1.0"\} (\S+)$', metrics, re.M).group(1))
        front_end_passes = float(re.search(r"^predictor_batch_size_count (\S+)$", metrics, re.M).group(1))
        assert front_end_largest == front_end_passes  # no front end ever sent more than one image at a time
        assert mixed > 0 and one_image < passes, (mixed, one_image, passes)
    finally:
        server.stop()


def test_the_engines_death_fails_waiting_calls_with_503_and_stops_the_front_ends():
    server = Server("--workers", "2", "--rate_limit_per_minute", "0", "--cache_ttl_s", "0", timeout=300)
    try:
        children = front_ends(server)
        assert len(children) == 2
        load = Load(server.url)
        wait_until(lambda: len(load.results) > 50, 60, "calls served before the kill")
        os.kill(server.process.pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: not any(alive(pid) for pid in children), 30, "the front ends to stop")
        results = load.stop()
    finally:
        server.stop()
    after = [r for r in results if r[1] > killed]
    assert not [r for r in results if r[3] in ("ReadTimeout", "WriteTimeout", "PoolTimeout")], "a call was left hanging"
    assert not [r for r in results if r[2] is not None and r[2] >= 500 and r[2] != 503], "a 5xx other than 503"
    refused = {r[3] for r in after if r[2] == 503}
    assert "engine_unavailable" in refused or "model_not_ready" in refused, after[:20]
    assert refused <= {"engine_unavailable", "model_not_ready", "shutting_down"}, refused
    # Unready at once: nothing sent a moment after the kill was served.
    assert not [r for r in after if r[2] == 200 and r[0] > killed + 0.5], "served without an engine"


def test_a_front_ends_death_loses_only_its_own_calls_and_it_is_restarted():
    server = Server("--workers", "2", "--rate_limit_per_minute", "0", "--cache_ttl_s", "0", timeout=300)
    try:
        victim, survivor = sorted(front_ends(server))
        os.kill(victim, signal.SIGKILL)
        # The other front end serves on meanwhile: every new connection goes to a live process.
        for image in IMAGES[:40]:
            answer = httpx.post(f"{server.url}/classify/image", files={"file": image.read_bytes()},
                                headers={"Connection": "close"}, timeout=30)
            assert answer.status_code == 200, answer.text
        replacement = wait_until(lambda: front_ends(server) - {victim, survivor}, 60, "a new front end")
        wait_until(lambda: f"front end {next(iter(replacement))} connected" in server.log(), 30, "its link")
        assert alive(survivor)
        assert f"front end {victim} closed its link" in server.log()
        # The new front end serves too (readiness stayed: start-up was over).
        def one(i: int) -> int:
            return httpx.post(f"{server.url}/classify/image", files={"file": IMAGES[i % len(IMAGES)].read_bytes()},
                              headers={"Connection": "close"}, timeout=30).status_code

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert set(pool.map(one, range(80))) == {200}
    finally:
        server.stop()


def test_sigterm_drains_the_front_ends_while_the_engine_still_serves_them():
    server = Server("--workers", "2", "--rate_limit_per_minute", "0", "--cache_ttl_s", "0", timeout=300)
    children = front_ends(server)
    load = Load(server.url)
    wait_until(lambda: len(load.results) > 50, 60, "calls served before SIGTERM")
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(60)
    results = load.stop()
    log = server.log()
    server.stop()
    assert not any(alive(pid) for pid in children)
    # New calls are refused (503 shutting_down; or, once the front ends close, their connections), and
    # no call lost its engine: the engine process served until every front end had finished.
    assert {r[2] for r in results} <= {200, 503, None}
    assert {r[3] for r in results if r[2] == 503} <= {"shutting_down"}, "a call lost its engine while draining"
    assert log.count("drained: 0 admitted request(s) still in flight at exit") == 2, log[-3000:]
    # The engine may stop before it reads the last front end's close: each close it logged dropped nothing.
    dropped = re.findall(r"front end \d+ closed its link; (\d+) of its request\(s\) dropped", log)
    assert dropped and set(dropped) == {"0"}, dropped
    # Drain order: each front end finished before the engine process stopped.
    stopped = log.index("Stopping parent process")
    assert all(log.index(f"Finished server process [{pid}]") < stopped for pid in children)
