"""The bench's null model and request builders (bench/stack_cost.py, bench/v2_requests.py) and the Triton peer's
wiring: the null engine has the data plane's engine interface, the predictor started by bench/null_predictor.py
serves it (zero logits: uniform probabilities) with nothing else changed, and every request the benchmarks send
is one the predictor answers with 200 (so a benchmark never measures refusals by mistake)."""

import json
import os
import subprocess
import sys
import time

import grpc
import httpx
import numpy as np
import pytest

from bench.null_engine import NullEngine
from bench.peers import PEER_VENVS, PEERS
from bench.v2_requests import HTTP_KINDS, decoded, grpc_requests, http_load
from predictor.dataplane import Engine
from tests.conftest import IMAGES, MODEL_NAME, ROOT, free_port, stop_process

V2 = f"/v2/models/{MODEL_NAME}/infer"


def files(count: int = 3) -> list[bytes]:
    return [p.read_bytes() for p in sorted(IMAGES.glob("*.jpg"))[:count]]


def test_null_engine_has_the_engine_interface():
    engine = NullEngine(32)
    for name in Engine.__annotations__:
        assert hasattr(engine, name), name
    assert engine.device_type == "cpu" and engine.intra_op_threads() == 1
    for n in (1, 32, 40):
        out = engine.logits(np.zeros((n, 32, 32, 3), np.uint8))
        assert out.shape == (n, 10) and out.dtype == np.float32 and not out.any()


def test_every_request_kind_is_built():
    for kind in HTTP_KINDS:
        items, options = http_load(kind, files(2))
        assert len(items) == 2
        if options.get("prepared"):
            body, headers = items[0]
            if "inference-header-content-length" in headers:  # binary: JSON header, then exactly the declared bytes
                size = int(headers["inference-header-content-length"])
                header = json.loads(body[:size])
                assert len(body) - size == sum(i["parameters"]["binary_data_size"] for i in header["inputs"])
    with pytest.raises(ValueError):
        http_load("nope", files(1))


def test_peer_rows_name_known_request_kinds():
    for peer in PEERS:
        for _, path, kind in peer.rows:
            assert kind in HTTP_KINDS and path.startswith("/")
    triton = next(p for p in PEERS if p.venv == "triton")
    assert triton.name.startswith("Triton (PyTriton 0.7.0)")
    # The pixels pairing is the predictor's own v2 request: same path.
    assert ("v2 binary pixels", V2, "v2-binary-pixels") in triton.rows


def test_the_benchmarks_requests_are_answered(server):
    """What bench/run.py and bench/stack_cost.py send the predictor, over HTTP and gRPC: all 200/OK."""
    for kind in ("multipart", "v2-json-bytes", "v2-binary-pixels", "v2-binary-bytes"):
        items, options = http_load(kind, files(2))
        for item in items:
            if options.get("prepared"):
                response = server.client.post(V2, content=item[0], headers=item[1])
                assert response.status_code == 200, (kind, response.text)
                assert {o["name"] for o in response.json()["outputs"]} == {"probabilities", "label"}
            else:
                response = server.client.post("/classify/image", files={"file": ("a.jpg", item, "image/jpeg")})
                assert response.status_code == 200, (kind, response.text)
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = GRPCInferenceServiceStub(channel)
        for request in grpc_requests(MODEL_NAME, files=files(2)) + grpc_requests(MODEL_NAME, pixels=decoded(files(2)),
                                                                                   name="pixels"):
            assert stub.ModelInfer(request, timeout=30).outputs


def _wait(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"exited with {process.returncode}"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} not ready")


@pytest.mark.slow
def test_null_predictor_serves_zero_logits():
    port = free_port()
    process = subprocess.Popen([sys.executable, "bench/null_predictor.py", "--http_port", str(port), "--enable_grpc",
                                "false", "--rate_limit_per_minute", "0"], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait(f"{base}/health", process)
        assert httpx.get(f"{base}/v2/models/{MODEL_NAME}").json()["parameters"]["engine"] == "null"
        answer = httpx.post(f"{base}/classify/image", files={"file": ("a.jpg", files(1)[0], "image/jpeg")}).json()
        assert set(answer["all_probabilities"].values()) == {0.1}
        # Decoding is still the stack's: a file that is no image is refused as by the predictor.
        assert httpx.post(f"{base}/classify/image", files={"file": ("a.jpg", b"nope", "image/jpeg")}).status_code == 415
    finally:
        stop_process(process)


@pytest.mark.slow
@pytest.mark.skipif(not (PEER_VENVS / "triton" / ".installed").exists(), reason="make bench-peers makes Triton's environment")
def test_triton_peer_answers_tritonclient():
    """The Triton peer (null engine: seconds to start) answers tritonclient's default requests on both models."""
    import tritonclient.http as triton_http

    triton = next(p for p in PEERS if p.venv == "triton")
    port = free_port()
    process = subprocess.Popen(triton.command(port), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, **triton.environment(), "BENCH_NULL_ENGINE": "1"})
    try:
        _wait(f"http://127.0.0.1:{port}{triton.ready_path}", process, timeout=180)
        client = triton_http.InferenceServerClient(f"127.0.0.1:{port}")
        image = triton_http.InferInput("image", [1, 1], "BYTES")
        image.set_data_from_numpy(np.array([[files(1)[0]]], dtype=np.object_), binary_data=True)
        result = client.infer("cifar10-resnet18-jpeg", [image])
        assert result.as_numpy("probabilities").shape == (1, 10) and result.as_numpy("label").shape == (1, 1)
        pixels = triton_http.InferInput("pixels", [2, 32, 32, 3], "UINT8")
        pixels.set_data_from_numpy(np.stack(decoded(files(2))))
        assert np.allclose(client.infer("cifar10-resnet18", [pixels]).as_numpy("probabilities"), 0.1)
        # The benchmark's raw v2 binary pixels request, byte for byte the predictor's, is answered too.
        body, headers = http_load("v2-binary-pixels", files(1))[0][0]
        assert httpx.post(f"http://127.0.0.1:{port}{V2}", content=body, headers=headers).status_code == 200
    finally:
        stop_process(process, grace=30)
